"""The replica namespace on the restore path: ``ip`` processes (before) vs netlink from a thread (now).

Every replica start (cold or restored, CRIU or runsc) makes a network namespace with a veth pair before the
engine's first instruction can run; this is that step alone, the part of "restore -> engine's first
instruction" that issue 18 moved off processes. Rows, side by side in one run (medians over --runs, each
namespace deleted after):
- ``ip`` + ``iptables``: what each start ran before: seven ``ip`` processes, one more to list addresses,
  and the firewall's four ``iptables`` checks;
- ``ip``: the same without the firewall checks (now done once per launcher);
- ``netlink``: now: no process, netlink requests from a short-lived thread (``netns._Netlink``).

    sudo .venv/bin/python bench/netns.py --runs 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from coldstart.launcher.sandboxes import firewall, netns


@contextmanager
def mode(name: str) -> Iterator[None]:
    with mock.patch.object(netns._Netlink, "usable", staticmethod(lambda: name == "netlink")):
        yield


def measure(name: str, runs: int, firewall_each_time: bool) -> tuple[float, float]:
    create, delete = [], []
    with mode(name):
        for _ in range(runs):
            if firewall_each_time:
                firewall._base_checked = False
            t = time.perf_counter()
            ns = netns.NetNamespace.create()
            create.append(time.perf_counter() - t)
            t = time.perf_counter()
            ns.delete()
            delete.append(time.perf_counter() - t)
    return statistics.median(create), statistics.median(delete)


def table(runs: int) -> str:
    """The rows side by side, measured now (as root)."""
    firewall.ensure_replica_subnet_guarded()
    rows = [
        ("ip + iptables (before)", measure("ip", runs, True)),
        ("ip", measure("ip", runs, False)),
        ("netlink (now)", measure("netlink", runs, False)),
    ]
    lines = [f"replica network namespace, median of {runs} (ms)", f"{'how':<24}{'create':>10}{'delete':>10}"]
    lines += [f"{name:<24}{create * 1000:>10.1f}{delete * 1000:>10.1f}" for name, (create, delete) in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    print(table(parser.parse_args().runs))


if __name__ == "__main__":
    main()
