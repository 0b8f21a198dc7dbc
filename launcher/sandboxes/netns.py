"""Per-replica network namespaces: a veth pair, a /30 of 10.88.0.0/16, the engine on 0.0.0.0 inside.

Why: several replicas restored from ONE snapshot all listen on the port they listened on at checkpoint
time; each gets its own network namespace so they never collide, and the launcher reaches replica N at
``http://10.88.x.y+2:PORT`` through the host end of its veth.

    host netns                         replica netns (/run/netns/cs-<launcher pid>-<token>)
    csh<token> 10.88.x.(4k+1)/30  <->  eth0 10.88.x.(4k+2)/30, lo up

Subnets are handed out round-robin (a counter under a file lock in /run/coldstart), not lowest-free: an
HTTP client may still pool a keep-alive connection to a stopped replica's address, and an address reused
at once would send its next request into a namespace that no longer exists.

Names carry the launcher's PID so ``cleanup_stale()`` can remove what a killed launcher left behind
(processes still in the namespace included). Only root may connect to 10.88.0.0/16 (``firewall.py``).

How (``_Netlink``): on the restore path, without a process. Each replica start ran seven ``ip`` processes
(netns add, link add, addr add, link up, lo up, eth0 up, addr replace) plus one to list addresses and four
``iptables`` checks; now a short-lived thread of the launcher does what ``ip netns add`` does in-process --
``unshare(CLONE_NEWNET)`` (a network namespace is per thread), bind-mount ``/proc/thread-self/ns/net`` on
``/run/netns/NAME``, open a netlink socket there, ``setns`` back -- and pyroute2 netlink requests make the
veth pair, addresses and links (the socket opened inside configures the inside). A fresh thread each time:
a thread whose ``setns`` back failed dies instead of serving other work in the wrong namespace. Measured by
``bench/netns.py``. ``ip`` remains the way where pyroute2 is missing or ``/run/netns`` has not been set up
as ``ip netns`` sets it up (a mount point; ``ip netns add`` makes it one), and for the cleanup of leftovers.
The namespace is deleted (and its veth with it) by ``delete()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from coldstart.launcher.errors import NetnsError
from coldstart.launcher.process import file_lock, signal_listed
from coldstart.launcher.sandboxes.firewall import ensure_replica_subnet_guarded

log = logging.getLogger("coldstart.netns")

NETNS_DIR = Path("/run/netns")
STATE_DIR = Path("/run/coldstart")
SUBNET = ipaddress.IPv4Network("10.88.0.0/16")
_SLOTS = SUBNET.num_addresses // 4
_NAME = re.compile(r"^cs-(\d+)-([0-9a-f]{8})$")
T = TypeVar("T")


def _ip(*args: str) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)} failed: {exc} (install iproute2; run as root)") from exc
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {done.stderr.strip()} (run as root)")
    return done.stdout


@dataclass
class NetNamespace:
    name: str
    host_if: str
    host_ip: str
    guest_ip: str
    prefix: int = 30
    deleted: bool = False

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    def enter_argv(self) -> list[str]:
        """Prefix that runs a command inside this namespace (network only: same mount namespace, so
        CRIU sees no foreign mount namespace to dump)."""
        return ["nsenter", f"--net={self.path}", "--"]

    @classmethod
    def create(cls) -> NetNamespace:
        token = secrets.token_hex(4)
        name, host_if = f"cs-{os.getpid()}-{token}", f"csh{token}"
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with file_lock(STATE_DIR / "netns.lock"):
            ensure_replica_subnet_guarded()  # only root (the launcher) may connect to replicas
            host_ip, guest_ip = _next_subnet()
            ns = cls(name, host_if, host_ip, guest_ip)
            with contextlib.ExitStack() as undo:
                undo.callback(ns.delete)
                if _Netlink.usable():
                    _Netlink.create(ns)
                else:
                    _ip("netns", "add", name)
                    _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
                    _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
                    _ip("link", "set", host_if, "up")
                    _ip("-n", name, "link", "set", "lo", "up")
                    _ip("-n", name, "link", "set", "eth0", "up")
                    ns.set_guest_address()
                undo.pop_all()
        return ns

    def set_guest_address(self) -> None:
        """(Re)assign the guest address; runsc moves it into its own network stack at every start."""
        if _Netlink.usable():
            _Netlink.set_guest_address(self)
        else:
            _ip("-n", self.name, "addr", "replace", f"{self.guest_ip}/30", "dev", "eth0")

    def delete(self) -> None:
        """Remove the namespace (its veth goes with it once no process holds it). Idempotent."""
        if self.deleted:
            return
        self.deleted = True
        if _Netlink.usable():
            _Netlink.delete(self)
            return
        with contextlib.suppress(NetnsError):
            _ip("link", "del", self.host_if)
        with contextlib.suppress(NetnsError):
            _ip("netns", "del", self.name)

    async def adelete(self) -> None:
        await asyncio.to_thread(self.delete)


def _mount_point(path: str) -> bool:
    """True when something is mounted on ``path`` (``os.path.ismount`` misses a bind mount of a folder of
    the same file system, which is what ``ip netns`` makes of /run/netns)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except (OSError, IndexError):
        return False


class _Netlink:
    """Namespaces and veths through netlink and three syscalls, no process (see the module docstring)."""

    CLONE_NEWNET = 0x40000000
    MS_BIND = 4096
    MNT_DETACH = 2
    _libc: Any = None

    @classmethod
    def usable(cls) -> bool:
        """pyroute2 importable and /run/netns a mount point (what ``ip netns add`` makes it)."""
        try:
            import pyroute2  # noqa: F401
        except ImportError:
            return False
        return _mount_point(str(NETNS_DIR))

    @classmethod
    def _check(cls, result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"{what} failed: {os.strerror(err)} (run as root)")

    @classmethod
    def _libc_(cls) -> Any:
        if cls._libc is None:
            cls._libc = ctypes.CDLL(None, use_errno=True)
        return cls._libc

    @staticmethod
    def _in_own_thread(fn: Callable[[], T]) -> T:
        """Run ``fn`` in a fresh thread (it changes that thread's network namespace) and return its result
        or raise its exception."""
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                out["error"] = exc

        thread = threading.Thread(target=run, name="netns", daemon=True)
        thread.start()
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    @classmethod
    def _enter(cls, path: str) -> Any:
        """In this (fresh) thread: enter the namespace at ``path`` (a new one, bind-mounted there, when
        ``path`` does not exist yet), open a netlink socket in it, and come back to the host namespace.
        Returns the socket's ``IPRoute``: requests on it act inside the namespace."""
        from pyroute2 import IPRoute

        libc = cls._libc_()
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            if os.path.exists(path):
                target = os.open(path, os.O_RDONLY)
                try:
                    cls._check(libc.setns(target, cls.CLONE_NEWNET), f"setns {path}")
                finally:
                    os.close(target)
            else:
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
                cls._check(libc.unshare(cls.CLONE_NEWNET), "unshare(CLONE_NEWNET)")
                cls._check(
                    libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, cls.MS_BIND, None),
                    f"bind mount of the namespace on {path}",
                )
            inside = IPRoute()
            # Back home; if this failed the thread would be in the wrong namespace: it ends here anyway.
            cls._check(libc.setns(home, cls.CLONE_NEWNET), "setns back to the host namespace")
            return inside
        finally:
            os.close(home)

    @classmethod
    def create(cls, ns: NetNamespace) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        def run() -> None:
            inside = cls._enter(ns.path)
            try:
                nsfd = os.open(ns.path, os.O_RDONLY)
                try:
                    with IPRoute() as host:
                        peer = {"ifname": "eth0", "net_ns_fd": nsfd}
                        host.link("add", ifname=ns.host_if, kind="veth", peer=peer)
                        index = host.link_lookup(ifname=ns.host_if)[0]
                        host.addr("add", index=index, address=ns.host_ip, prefixlen=ns.prefix)
                        host.link("set", index=index, state="up")
                finally:
                    os.close(nsfd)
                inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
                eth0 = inside.link_lookup(ifname="eth0")[0]
                inside.addr("replace", index=eth0, address=ns.guest_ip, prefixlen=ns.prefix)
                inside.link("set", index=eth0, state="up")
            finally:
                inside.close()

        try:
            cls._in_own_thread(run)
        except (NetlinkError, OSError) as exc:
            raise NetnsError(f"network namespace {ns.name}: {exc} (run as root)") from exc

    @classmethod
    def set_guest_address(cls, ns: NetNamespace) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        def run() -> None:
            with cls._enter(ns.path) as inside:
                eth0 = inside.link_lookup(ifname="eth0")[0]
                inside.addr("replace", index=eth0, address=ns.guest_ip, prefixlen=ns.prefix)

        try:
            cls._in_own_thread(run)
        except (NetlinkError, OSError, IndexError) as exc:
            raise NetnsError(f"network namespace {ns.name}: guest address: {exc}") from exc

    @classmethod
    def delete(cls, ns: NetNamespace) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with contextlib.suppress(NetlinkError, OSError), IPRoute() as host:
            host.link("del", ifname=ns.host_if)
        libc = cls._libc_()
        if _mount_point(ns.path):
            libc.umount2(ns.path.encode(), cls.MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ns.path)

    @classmethod
    def addresses(cls) -> set[str]:
        """IPv4 addresses of the host namespace in 10.88.0.0/16."""
        import socket as socket_

        from pyroute2 import IPRoute

        with IPRoute() as host:
            found = {a.get_attr("IFA_ADDRESS") for a in host.get_addr(family=socket_.AF_INET)}
        return {a for a in found if a and ipaddress.IPv4Address(a) in SUBNET}


async def create_netns() -> NetNamespace:
    return await asyncio.to_thread(NetNamespace.create)


def _next_subnet() -> tuple[str, str]:
    """The next free /30 after the last one handed out (round-robin), skipping addresses in use. Called
    with netns.lock held."""
    counter = STATE_DIR / "netns.next"
    try:
        start = int(counter.read_text().strip() or 0)
    except (OSError, ValueError):
        start = 0
    if _Netlink.usable():
        in_use = _Netlink.addresses()
    else:
        in_use = set(re.findall(r"inet (10\.88\.\d+\.\d+)/", _ip("-4", "-o", "addr", "show")))
    base = int(SUBNET.network_address)
    for step in range(_SLOTS):
        slot = (start + step) % _SLOTS
        if slot == 0:
            continue  # keep 10.88.0.0/30 unused (reads like a network address)
        host = str(ipaddress.IPv4Address(base + 4 * slot + 1))
        if host not in in_use:
            counter.write_text(str(slot + 1))
            return host, str(ipaddress.IPv4Address(base + 4 * slot + 2))
    raise NetnsError("no free /30 left in 10.88.0.0/16: stop some replicas (or run 'coldstart doctor')")


def cleanup_stale() -> list[str]:
    """Remove what launchers that are gone left behind: every process still running in one of their
    ``cs-PID-*`` namespaces (engines, their ``criu restore`` or ``unshare`` parents) is SIGKILLed and reaped
    by init, then the namespace and its veth are deleted; a ``csh*`` veth whose namespace is gone too.
    Returns one line per thing removed (said at launcher start and by ``coldstart doctor``)."""
    removed = []
    for entry in sorted(NETNS_DIR.glob("cs-*")) if NETNS_DIR.is_dir() else []:
        match = _NAME.match(entry.name)
        if not match or Path(f"/proc/{match.group(1)}").exists():
            continue
        pids = signal_listed(functools.partial(processes_in, entry), signal.SIGKILL)  # through pidfds
        if pids:
            removed.append(f"killed {len(pids)} process(es) of dead launcher {match.group(1)}: {pids}")
        _wait_gone(pids)
        NetNamespace(entry.name, f"csh{match.group(2)}", "", "").delete()
        removed.append(f"network namespace {entry.name} and veth csh{match.group(2)}")
    live_tokens = {m.group(2) for e in NETNS_DIR.glob("cs-*") if (m := _NAME.match(e.name))}
    with contextlib.suppress(NetnsError):
        links = _ip("-o", "link", "show", "type", "veth")
        for host_if in re.findall(r"^\d+: (csh[0-9a-f]{8})@", links, re.M):
            if host_if[3:] not in live_tokens:
                with contextlib.suppress(NetnsError):
                    _ip("link", "del", host_if)
                    removed.append(f"veth {host_if} without a namespace")
    from coldstart.launcher.sandboxes.firewall import cleanup_stale_rules

    removed += cleanup_stale_rules()
    return removed


def processes_in(netns_path: Path) -> list[int]:
    """Host PIDs of the processes whose network namespace is ``netns_path``."""
    try:
        inode = os.stat(netns_path).st_ino
    except OSError:
        return []
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(proc / "ns" / "net").st_ino == inode:
                    pids.append(int(proc.name))
    return sorted(pids)


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
