"""Hosts on one machine for the multi-host tests: Linux network namespaces joined by a bridge.

    with Network() as net:             # raises NetnsUnavailable (the test skips) unless root can
        net.add_host("fe", 10)         # make namespaces; everything is removed on exit
        net.hosts_file("fe", {"kiln-worker": ["10.213.77.11", ...]})
        net.popen("fe", [...])         # `ip netns exec <ns> ...`: the namespace's own /etc/hosts

Layout: a "switch" namespace holds a bridge; each host is a namespace with a veth into it
(10.213.77.<n>/24). The test process itself joins as 10.213.77.1 through one more veth, so it can
talk to every host. The bridge lives in its own namespace so that the machine's firewall rules
(bridge-nf-call-iptables) and routes are not involved.

Name resolution per host: `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts, so
getaddrinfo in that host reads the file written here. It is rewritten in place (same inode): a
process already running in the namespace sees the change, as it would see a DNS change.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SUBNET = "10.213.77"


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no `ip`, or the kernel refuses)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Network:
    def __init__(self, tag: str | None = None):
        self.tag = tag or f"k{os.getpid() % 100000}"  # interface names are at most 15 characters
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, str] = {}  # host name -> its address
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._root_link = f"{self.tag}-r"

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def __enter__(self) -> Network:
        if os.geteuid() != 0:
            raise NetnsUnavailable("needs root (ip netns add)")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("needs the `ip` command (Debian package iproute2)")
        if SUBNET + "." in _ip("-4", "addr", check=False).stdout:
            raise NetnsUnavailable(f"{SUBNET}.0/24 is already in use on this machine")
        try:
            self._add_ns(self.switch)
            self._exec(self.switch, "ip", "link", "add", "br0", "type", "bridge")
            self._exec(self.switch, "ip", "link", "set", "br0", "up")
            # The test process's own leg: 10.213.77.1 in the root namespace.
            _ip("link", "add", self._root_link, "type", "veth", "peer", "name", f"{self.tag}-rp")
            _ip("link", "set", f"{self.tag}-rp", "netns", self.switch)
            self._exec(self.switch, "ip", "link", "set", f"{self.tag}-rp", "master", "br0", "up")
            _ip("addr", "add", f"{SUBNET}.1/24", "dev", self._root_link)
            _ip("link", "set", self._root_link, "up")
        except (subprocess.CalledProcessError, OSError) as e:
            self.close()
            detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
            raise NetnsUnavailable(f"could not build the test network: {detail}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        self._exec(name, "ip", "link", "set", "lo", "up")

    def _exec(self, ns: str, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=True)

    def add_host(self, host: str, n: int) -> str:
        """A namespace `host` at 10.213.77.<n>, plugged into the switch; its address."""
        ns, address = self.ns(host), f"{SUBNET}.{n}"
        self._add_ns(ns)
        Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
        self.hosts_file(host, {})
        outside, inside = f"{self.tag}-{n}s", f"{self.tag}-{n}h"
        _ip("link", "add", inside, "netns", ns, "type", "veth", "peer", "name", outside, "netns", self.switch)
        self._exec(self.switch, "ip", "link", "set", outside, "master", "br0", "up")
        self._exec(ns, "ip", "addr", "add", f"{address}/24", "dev", inside)
        self._exec(ns, "ip", "link", "set", inside, "up")
        self.hosts[host] = address
        return address

    def unplug(self, host: str) -> None:
        """The host's cable is pulled: its link is deleted (both veth ends go)."""
        n = self.hosts[host].rsplit(".", 1)[1]
        self._exec(self.switch, "ip", "link", "del", f"{self.tag}-{n}s")

    def hosts_file(self, host: str, names: dict[str, list[str]]) -> None:
        """The host's /etc/hosts: localhost plus `names` (one line per address), written in place."""
        lines = ["127.0.0.1 localhost"] + [f"{a} {name}" for name, addresses in names.items() for a in addresses]
        with open(f"/etc/netns/{self.ns(host)}/hosts", "w") as f:  # truncate, same inode: see the docstring
            f.write("\n".join(lines) + "\n")

    def popen(self, host: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], **kwargs)
        self._processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for ns in reversed(self._namespaces):
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        self._namespaces.clear()
        _ip("link", "del", self._root_link, check=False)
