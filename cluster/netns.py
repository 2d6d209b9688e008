"""Network namespaces for local clusters: each node gets its own namespace and address on a
private bridge, so partitions cut real links (routes), not just what the node chooses to send.

Belongs here: creating and removing the bridge, the namespaces and their veth links, and cutting
or healing links between namespaces. Needs root and iproute2 (`ip netns`); `available()` says
whether this machine can. Used by cluster/launcher.py (network="netns") and cluster/nemesis.py.

Layout for a cluster whose base port is P (P = 256*a + b, so each cluster has its own subnet):

    bridge  kvb<P>             10.a.b.1/24 in the root namespace (where clients and tests run)
    netns   kv<P>-<name>       eth0 = 10.a.b.<i+2>/24 for the node of index i, lo up
    veth    kv<P><name>        the bridge end of that namespace's link

A cut from node X to node Y is a blackhole route to Y's address inside X's namespace: X can no
longer send to Y (connects fail, established streams break), Y's packets still reach X (whose
answers cannot leave), and the root namespace keeps reaching everyone, as Jepsen's clients do.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
from typing import Iterable

IP_TIMEOUT_S = 10.0     # one `ip` command; they finish in milliseconds
TEARDOWN_WAIT_S = 5.0   # for the kernel to free the links of deleted namespaces


class NetnsError(Exception):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def available() -> tuple[bool, str]:
    """(True, "") when this process can create namespaces, else (False, why not)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 (`ip`) is not installed"
    probe = f"kvprobe{os.getpid()}"[:15]
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return False, f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


class Network:
    """The bridge and namespaces of one cluster (identified by its base port)."""

    def __init__(self, base_port: int) -> None:
        if not 1024 <= base_port <= 65535:
            raise ValueError(f"base_port: {base_port} is not in 1024..65535")
        self.base_port = base_port
        self.subnet = ipaddress.ip_network(f"10.{base_port >> 8}.{base_port & 255}.0/24")
        self.bridge = f"kvb{base_port}"
        self.gateway = str(self.subnet.network_address + 1)

    def namespace(self, name: str) -> str:
        return f"kv{self.base_port}-{name}"

    def host_of(self, index: int) -> str:
        """Address of the node with this index (0-based), .2 upwards."""
        if not 0 <= index < 250:
            raise ValueError(f"index: {index} is not in 0..249 (one /24 per cluster)")
        return str(self.subnet.network_address + 2 + index)

    def _veth(self, name: str) -> str:
        veth = f"kv{self.base_port}{name}"
        if len(veth) > 15:
            raise ValueError(f"name: {name!r} too long for an interface name (kv<port><name> <= 15 chars)")
        return veth

    def _exists(self, link: str) -> bool:
        return _ip("link", "show", link, check=False).returncode == 0

    def ensure_bridge(self) -> None:
        if self._exists(self.bridge):
            return
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def ensure_node(self, name: str, host: str) -> None:
        """The namespace of node `name` with address `host`, linked to the bridge (idempotent)."""
        self.ensure_bridge()
        ns, veth = self.namespace(name), self._veth(name)
        if ns not in self.namespaces():
            _ip("netns", "add", ns)
        if _ip("-n", ns, "link", "show", "eth0", check=False).returncode != 0:
            if self._exists(veth):  # left from a namespace being deleted: the kernel frees it soon
                _ip("link", "del", veth, check=False)
            peer = f"{veth[:14]}p"
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("link", "set", peer, "netns", ns)
            _ip("-n", ns, "link", "set", peer, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{host}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def exec_prefix(self, name: str) -> list[str]:
        """Prefix for a command to run inside the node's namespace (`ip netns exec` execs, so
        the pid the launcher records is the node's own)."""
        return ["ip", "netns", "exec", self.namespace(name)]

    def cut(self, name: str, hosts: Iterable[str]) -> None:
        """Node `name` can send to none of `hosts` and to every other address (replaces earlier cuts)."""
        ns = self.namespace(name)
        want = {str(ipaddress.ip_address(h)) for h in hosts}
        have = set(self.cuts(name))
        for host in sorted(have - want):
            _ip("-n", ns, "route", "del", "blackhole", f"{host}/32", check=False)
        for host in sorted(want - have):
            _ip("-n", ns, "route", "add", "blackhole", f"{host}/32")

    def cuts(self, name: str) -> list[str]:
        """Addresses node `name` cannot send to."""
        out = _ip("-n", self.namespace(name), "route", "show", "type", "blackhole", check=False).stdout
        return [line.split()[1].split("/")[0] for line in out.splitlines() if line.startswith("blackhole")]

    def namespaces(self) -> list[str]:
        out = _ip("netns", "list", check=False).stdout
        prefix = f"kv{self.base_port}-"
        return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]

    def teardown(self) -> None:
        """Remove every namespace and link of this cluster (the veths go with their namespaces)."""
        for ns in self.namespaces():
            _ip("netns", "del", ns, check=False)
        if self._exists(self.bridge):
            _ip("link", "del", self.bridge, check=False)
        # the kernel frees a deleted namespace's veths asynchronously: wait, so that a cluster
        # started right after this one ends does not find them half gone
        deadline = time.monotonic() + TEARDOWN_WAIT_S
        while self._links() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _links(self) -> list[str]:
        out = _ip("-o", "link", "show", check=False).stdout
        prefix = f"kv{self.base_port}n"  # node names are n<index>
        return [name for line in out.splitlines()
                if (name := line.split(":")[1].strip().split("@")[0]).startswith(prefix)]
