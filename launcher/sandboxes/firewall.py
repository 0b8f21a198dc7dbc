"""Only the launcher may open a connection to an engine or its hooks channel.

Engines have no authentication of their own (``transformers serve`` none at all; vLLM's ``--api-key``
covers ``/v1`` only, not ``/sleep`` or ``/collective_rpc``), and the hooks channel runs an engine's
before-checkpoint hooks for whoever asks. The proxy is the door with the API key; nothing may go around it.

How: an iptables owner match. The launcher runs as root (network namespaces and CRIU need it), so in the
host's OUTPUT path a connection to a replica address (``10.88.0.0/16``, every replica's veth) from any other
user is rejected, and FORWARD drops anything routed there (containers, other namespaces). A plain sandbox
(``--snapshot off``) listens on loopback: its two ports (engine, hooks) get the same owner rule, tagged with
the launcher's PID so that ``cleanup_stale_rules()`` can drop the rules of a launcher that was killed.

    iptables -N COLDSTART;  -I OUTPUT -j COLDSTART;  -I FORWARD -d 10.88.0.0/16 -j DROP
    -A COLDSTART -d 10.88.0.0/16 -m owner ! --uid-owner 0 -j REJECT
    -A COLDSTART -o lo -p tcp -d 127.0.0.1 --dport P:P+1 -m owner ! --uid-owner 0 \
        -m comment --comment coldstart-<launcher pid> -j REJECT --reject-with tcp-reset

Rejected: binding engines to a Unix socket only root can open (engines take ``--host/--port``, and gVisor
does not pass Unix sockets out of the sandbox); a per-replica secret only (the engine's own routes would
stay open). Without root (plain sandbox as a normal user) rules cannot be set: the launcher says so once.
``iptables -w`` waits for the xtables lock, so concurrent launchers do not collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from coldstart.launcher.errors import FirewallError

log = logging.getLogger("coldstart.netns")

CHAIN = "COLDSTART"
REPLICA_SUBNET = "10.88.0.0/16"
_BASE = [
    ("OUTPUT", ["-j", CHAIN]),
    ("FORWARD", ["-d", REPLICA_SUBNET, "-j", "DROP"]),
    (CHAIN, ["-d", REPLICA_SUBNET, "-m", "owner", "!", "--uid-owner", "0", "-j", "REJECT"]),
]
_TAG = re.compile(r"--comment (?:\")?coldstart-(\d+)")
_warned = False
_base_checked = False  # the base rules were found or installed by this process


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("iptables") is not None


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"iptables {' '.join(args)} failed: {exc}") from exc
    if check and done.returncode != 0:
        raise FirewallError(f"iptables {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _ensure(chain: str, rule: list[str]) -> None:
    if _iptables("-C", chain, *rule, check=False).returncode != 0:
        _iptables("-I", chain, "1", *rule)


def ensure_replica_subnet_guarded() -> None:
    """Install the base rules once per host (idempotent), checked once per launcher process: the check
    is four ``iptables`` processes, which every replica start used to run on the restore path."""
    global _base_checked
    if _base_checked:
        return
    if not available():
        _warn_once("not root: engines' addresses cannot be firewalled from other local users")
        return
    if _iptables("-n", "-L", CHAIN, check=False).returncode != 0:
        _iptables("-N", CHAIN, check=False)  # a concurrent launcher may have created it meanwhile
    for chain, rule in _BASE:
        _ensure(chain, rule)
    _base_checked = True


def _loopback_rule(port: int) -> list[str]:
    return [
        "-o", "lo", "-p", "tcp", "-d", "127.0.0.1", "--dport", f"{port}:{port + 1}",
        "-m", "owner", "!", "--uid-owner", "0",
        "-m", "comment", "--comment", f"coldstart-{os.getpid()}",
        "-j", "REJECT", "--reject-with", "tcp-reset",
    ]  # fmt: skip


def guard_loopback(port: int) -> bool:
    """Only root may connect to 127.0.0.1:port and :port+1 (a plain sandbox's engine and hooks).
    Returns False (after one warning) where rules cannot be set."""
    if not available():
        _warn_once(
            "not root: engine ports on 127.0.0.1 are reachable by other local users "
            "(run coldstart-serve as root to firewall them)"
        )
        return False
    ensure_replica_subnet_guarded()
    _iptables("-I", CHAIN, "1", *_loopback_rule(port))
    return True


def unguard_loopback(port: int) -> None:
    with contextlib.suppress(FirewallError):
        _iptables("-D", CHAIN, *_loopback_rule(port), check=False)


def cleanup_stale_rules() -> list[str]:
    """Delete loopback rules of launchers that are gone; returns what was removed."""
    if not available() or _iptables("-n", "-L", CHAIN, check=False).returncode != 0:
        return []
    removed = []
    for line in _iptables("-S", CHAIN).stdout.splitlines():
        match = _TAG.search(line)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            args = line.split()[2:]  # "-A COLDSTART <rule>"
            args = [a.strip('"') for a in args]
            if _iptables("-D", CHAIN, *args, check=False).returncode == 0:
                removed.append(f"firewall rule of dead launcher {match.group(1)}")
    return removed


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(message, extra={"event": "firewall_unavailable"})
