"""cluster/launcher.py against real node processes: start, agree, kill, restart, refuse, clean up."""
from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from cluster.launcher import ClusterError, ClusterRunning, LocalCluster, NodeFailed, free_base_port, processes_under

pytestmark = pytest.mark.slow


def cluster_at(tmp_path: Path, **kw: Any) -> LocalCluster:
    return LocalCluster(tmp_path / "cluster", base_port=free_base_port(), profile="test", **kw)


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    with trio.move_on_after(timeout_s):
        while not check():
            await trio.sleep(0.1)
        return
    raise AssertionError(f"not within {timeout_s} s: {what}")


def views(c: LocalCluster) -> dict[str, dict[str, Any]]:
    return {row["name"]: row["view"] for row in c.status() if "view" in row}


def sees_up(view: dict[str, Any]) -> set[str]:
    return {m["node_id"] for m in view["members"] if m["up"] and m["status"] == "normal"}


async def test_up_starts_nodes_that_agree_on_members_and_ring(tmp_path: Path) -> None:
    with cluster_at(tmp_path) as c:
        addresses = await trio.to_thread.run_sync(c.up, 3)

        assert addresses == [f"127.0.0.1:{c.base_port + i}" for i in range(3)]
        rows = c.status()
        assert [r["name"] for r in rows] == ["n1", "n2", "n3"]
        assert all(r["alive"] and not r["paused"] for r in rows)
        assert [r["view"]["node_id"] for r in rows] == ["n1", "n2", "n3"]
        assert all(sees_up(r["view"]) == {"n1", "n2", "n3"} for r in rows)
        assert len({r["view"]["ring_digest"] for r in rows}) == 1
        doc = json.loads((c.root / "cluster.json").read_text())
        assert doc["format"] == 1
        assert [(n["name"], n["node_id"], n["port"], n["pid"]) for n in doc["nodes"]] == [
            (r["name"], r["node_id"], c.base_port + i, r["pid"]) for i, r in enumerate(rows)
        ]
        assert all((c.root / n / "data" / "node.json").exists() and (c.root / n / "node.log").exists()
                   for n in c.names())


async def test_killed_node_is_dead_and_restart_brings_back_the_same_node(tmp_path: Path) -> None:
    with cluster_at(tmp_path) as c:
        await trio.to_thread.run_sync(c.up, 3)
        digest = views(c)["n1"]["ring_digest"]
        old_pid = c.pid("n2")
        assert old_pid is not None

        c.kill("n2")

        assert not Path(f"/proc/{old_pid}").exists()
        row = {r["name"]: r for r in c.status()}["n2"]
        assert (row["alive"], row["state"], row["pid"], "view" in row) == (False, "killed", None, False)
        await eventually(lambda: "n2" not in sees_up(views(c)["n1"]), "n1 sees n2 down")

        await trio.to_thread.run_sync(c.restart, "n2")

        assert c.pid("n2") not in (None, old_pid)
        after = views(c)
        assert after["n2"]["node_id"] == "n2"
        assert all(sees_up(v) == {"n1", "n2", "n3"} for v in after.values())
        assert {v["ring_digest"] for v in after.values()} == {digest}  # same data dir, same tokens


async def test_paused_node_is_seen_down_and_rejoins_on_resume(tmp_path: Path) -> None:
    with cluster_at(tmp_path) as c:
        await trio.to_thread.run_sync(c.up, 2)

        c.pause("n2")

        row = {r["name"]: r for r in c.status()}["n2"]
        assert (row["alive"], row["paused"], row["state"]) == (True, True, "paused")
        await eventually(lambda: "n2" not in sees_up(views(c)["n1"]), "n1 sees paused n2 down")

        c.resume("n2")

        converged = await trio.to_thread.run_sync(c.wait_converged)
        assert sees_up(converged["n1"]) == {"n1", "n2"}


async def test_second_up_in_a_running_cluster_dir_refuses(tmp_path: Path) -> None:
    with cluster_at(tmp_path) as c:
        await trio.to_thread.run_sync(c.up, 2)
        pids = [c.pid(n) for n in c.names()]

        with pytest.raises(ClusterRunning, match="already running"):
            await trio.to_thread.run_sync(LocalCluster.open(c.root).up, 2)
        reused = await trio.to_thread.run_sync(lambda: LocalCluster.open(c.root).up(2, reuse=True))

        assert reused == c.addresses()
        assert [c.pid(n) for n in c.names()] == pids


async def test_down_leaves_no_node_process_and_up_restarts_on_the_same_data(tmp_path: Path) -> None:
    with cluster_at(tmp_path) as c:
        await trio.to_thread.run_sync(c.up, 3)
        digest = views(c)["n1"]["ring_digest"]
        assert len(processes_under(c.root)) == 3

        await trio.to_thread.run_sync(c.down)

        assert processes_under(c.root) == []
        assert [r["state"] for r in c.status()] == ["stopped"] * 3

        await trio.to_thread.run_sync(c.up, 3)

        assert {v["ring_digest"] for v in views(c).values()} == {digest}
    assert processes_under(c.root) == []


async def test_leaving_the_with_block_on_an_exception_stops_every_node(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    with pytest.raises(RuntimeError, match="test body failed"):
        with cluster_at(tmp_path) as c:
            await trio.to_thread.run_sync(c.up, 2)
            assert len(processes_under(root)) == 2
            raise RuntimeError("test body failed")

    assert processes_under(root) == []


async def test_a_reused_pid_is_not_taken_for_a_node(tmp_path: Path) -> None:
    c = cluster_at(tmp_path)
    c.root.mkdir()
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        doc = {"format": 1, "base_port": c.base_port, "profile": "test", "storage": "sqlite", "extra_args": [],
               "nodes": [{"name": "n1", "node_id": "n1", "port": c.base_port, "data_dir": str(c.root / "n1" / "data"),
                          "log": str(c.root / "n1" / "node.log"), "pid": bystander.pid, "profile": "test",
                          "storage": "sqlite", "extra_args": [], "state": "running"}]}
        (c.root / "cluster.json").write_text(json.dumps(doc))
        recorded = LocalCluster.open(c.root)

        assert [r["alive"] for r in recorded.status()] == [False]
        recorded.down()
        recorded.kill("n1")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def test_a_node_that_fails_to_start_is_named_with_its_log(tmp_path: Path) -> None:
    with cluster_at(tmp_path, extra_args=["--replication-factor", "99"]) as c:
        with pytest.raises(NodeFailed) as failed:
            await trio.to_thread.run_sync(c.up, 2)

    message = str(failed.value)
    assert "n1" in message and "code 2" in message and str(c.root / "n1" / "node.log") in message
    assert "replication_factor: must be in 1..16" in message
    assert processes_under(c.root) == []


async def test_a_taken_port_is_refused_before_starting_a_node_there(tmp_path: Path) -> None:
    with cluster_at(tmp_path) as c, socket.socket() as squatter:
        squatter.bind(("127.0.0.1", c.base_port + 1))
        squatter.listen(1)

        with pytest.raises(ClusterError, match=f"port {c.base_port + 1} .* is taken"):
            await trio.to_thread.run_sync(c.up, 2)
    assert processes_under(c.root) == []


async def test_mtls_by_default_and_plaintext_only_when_insecure(tmp_path: Path) -> None:
    import grpc

    from cluster.launcher import status_of

    with LocalCluster(tmp_path / "tls", base_port=free_base_port(), profile="test") as c:
        await trio.to_thread.run_sync(c.up, 1)
        address = c.addresses()[0]
        assert status_of(address, credentials=c.credentials())["node_id"] == "n1"
        with pytest.raises(grpc.RpcError) as refused:
            status_of(address)  # plaintext
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert c.tls().identity.roles == {"read", "write", "admin"}
        assert (c.root / "certs" / "n1.key").stat().st_mode & 0o777 == 0o600
        env = c.write_env_file().read_text()
        assert f"KVSTORE_ADDRESS={address}" in env and f"KVSTORE_CLUSTER_DIR={c.root}" in env
        assert LocalCluster.open(c.root).insecure is False
    with LocalCluster(tmp_path / "plain", base_port=free_base_port(), profile="test", insecure=True) as c:
        await trio.to_thread.run_sync(c.up, 1)
        assert status_of(c.addresses()[0])["node_id"] == "n1"
        assert c.tls() is None and not (c.root / "certs").exists()
        assert LocalCluster.open(c.root).insecure is True
