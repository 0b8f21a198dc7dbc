"""The one workaround runsc needs on this kernel, in one place.

Symptom: ``runsc --network=sandbox`` with a veth in a network namespace the launcher made fails with
"cannot run with network enabled in root network namespace". runsc decides "am I in the root netns?" by
whether ``/proc/sys/net/core/rmem_default`` exists; since Linux made that sysctl per-namespace it exists in
every namespace, so the check misfires everywhere (measured on 6.18; see shared/reference/this-machine.md).

Workaround: run runsc in a private mount namespace where ``/proc/sys`` is a small tmpfs with only ``vm/``,
``kernel/`` and ``fs/`` bound back in. Hiding only ``net/core`` is not enough (runsc looks further) and
hiding everything makes runsc panic on ``/proc/sys/vm/mmap_min_addr``. The mounts are private to that one
runsc process (and the sandbox it forks); nothing on the host changes.

Remove this module when runsc's check looks at the namespace itself (compare ``/proc/self/ns/net`` with
``/proc/1/ns/net``).
"""

from __future__ import annotations

_SCRIPT = r"""
set -e
staging=$(mktemp -d /run/coldstart-procsys.XXXXXX)
mount --bind /proc/sys "$staging"
mount -t tmpfs -o size=64k,mode=0555 coldstart-procsys /proc/sys
for d in vm kernel fs; do mkdir /proc/sys/$d; mount --bind "$staging/$d" /proc/sys/$d; done
umount -l "$staging"; rmdir "$staging"
exec "$@"
"""


def wrap(argv: list[str]) -> list[str]:
    """``argv`` (a runsc command line) run behind the /proc/sys mask described above."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        _SCRIPT,
        "runsc-rootns-quirk",
        *argv,
    ]
