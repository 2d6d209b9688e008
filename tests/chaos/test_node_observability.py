"""`kvstore node --log-format json --metrics-listen ...` as a real process: every line it logs is
JSON, its metrics endpoint answers, health is SERVING, and SIGTERM drains it cleanly."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_node_process_logs_json_and_serves_metrics_and_health(tmp_path: Path) -> None:
    ready, log = tmp_path / "ready", tmp_path / "node.log"
    cmd = [sys.executable, "-m", "kvstore.cli.main", "node", "--profile", "test", "--node-id", "p1",
           "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--storage", "memory",
           "--encryption", "none", "--log-format", "json", "--metrics-listen", "127.0.0.1:0",
           "--ready-file", str(ready)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(30):
            while not ready.exists():
                assert proc.poll() is None, log.read_text()
                await trio.sleep(0.1)
        address = ready.read_text().strip()
        lines = _json_lines(log)
        assert all(doc["node"] == "p1" and {"ts", "level", "logger", "msg"} <= set(doc) for doc in lines)
        [metrics_line] = [doc["msg"] for doc in lines if doc["msg"].startswith("metrics on http://")]
        url = metrics_line.removeprefix("metrics on ")

        def scrape_and_check() -> tuple[str, int]:
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            return text, status

        text, status = await trio.to_thread.run_sync(scrape_and_check)
        assert status == health_pb2.HealthCheckResponse.SERVING
        info = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "kvstore_node_info"]
        assert [s.labels["node_id"] for s in info] == ["p1"]

        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            while proc.poll() is None:
                await trio.sleep(0.1)
        assert proc.returncode == 0, log.read_text()
        assert any("draining and stopping" in doc["msg"] for doc in _json_lines(log))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
