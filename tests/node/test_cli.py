"""The `kvstore` command against a real node: values from args, files and stdin, JSON output,
and exit codes scripts rely on."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio


async def kv_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return await trio.run_process(
        [sys.executable, "-m", "kvstore.cli.main", *args], stdin=stdin, capture_stdout=True,
        capture_stderr=True, check=False,
    )


async def test_put_get_delete_with_exit_codes(nodes, tmp_path: Path) -> None:
    node = await nodes.start()
    addr = ["--address", node.address]
    assert (await kv_cli("put", "color", "blue", *addr)).returncode == 0
    got = await kv_cli("get", "color", *addr)
    assert (got.returncode, got.stdout) == (0, b"blue")
    (tmp_path / "value.bin").write_bytes(b"\x00\xffbinary")
    assert (await kv_cli("put", "file", "--file", str(tmp_path / "value.bin"), *addr)).returncode == 0
    assert (await kv_cli("get", "file", *addr)).stdout == b"\x00\xffbinary"
    assert (await kv_cli("put", "piped", *addr, stdin=b"from stdin")).returncode == 0
    doc = json.loads((await kv_cli("get", "piped", "--json", *addr)).stdout)
    assert doc["found"] and doc["value"] == "from stdin" and doc["context"]
    assert (await kv_cli("delete", "color", *addr)).returncode == 0
    missing = await kv_cli("get", "color", *addr)
    assert missing.returncode == 1 and b"not found" in missing.stderr


async def test_conditional_put_with_stale_context_exits_4(nodes) -> None:
    node = await nodes.start()
    addr = ["--address", node.address]
    await kv_cli("put", "k", "v1", *addr)
    ctx = json.loads((await kv_cli("get", "k", "--json", *addr)).stdout)["context"]
    assert (await kv_cli("put", "k", "v2", "--context", ctx, "--if-current", *addr)).returncode == 0
    stale = await kv_cli("put", "k", "v3", "--context", ctx, "--if-current", *addr)
    assert stale.returncode == 4 and b"no longer current" in stale.stderr


async def test_usage_invalid_and_unavailable_exit_codes(nodes) -> None:
    node = await nodes.start()
    assert (await kv_cli("frobnicate")).returncode == 2
    bad = await kv_cli("put", "k" * 1025, "v", "--address", node.address)
    assert bad.returncode == 5 and b"key: 1025 bytes exceeds the limit of 1024 bytes" in bad.stderr
    down = await kv_cli("get", "k", "--address", "127.0.0.1:1", "--timeout", "1")
    assert down.returncode == 3


async def test_status_lists_members(nodes) -> None:
    cluster = await nodes.cluster(2)
    out = await kv_cli("status", "--json", "--address", cluster[0].address)
    doc = json.loads(out.stdout)
    assert sorted(m["node_id"] for m in doc["members"]) == sorted(n.node_id for n in cluster)
    assert all(m["up"] for m in doc["members"])
    text = await kv_cli("status", "--all", "--address", cluster[0].address)
    assert text.returncode == 0 and text.stdout.count(b"== as seen by") == 2
