"""First process of a CRIU sandbox: ``python -m ...criu_init -- ENGINE ARGV...`` (then ``exec`` ENGINE).

Started by ``CriuSandbox`` as ``unshare --pid --mount --fork --propagation private``, so it runs as PID 1
of a fresh PID namespace in a private copy of the host's mounts. Before it becomes the engine it:

1. mounts a private tmpfs on ``/dev/shm`` and on ``PRIVATE_TMPDIR``, and points ``TMPDIR`` there.
   Multi-process engines keep state in both that must travel in the snapshot and must never be shared
   between replicas restored from one image: vLLM's ``psm_*`` shared-memory rings and ``sem.*`` semaphores
   (``/dev/shm``), its ZMQ IPC sockets and ``vllm_dist_*`` file store (``tempfile.gettempdir()``). CRIU
   dumps a tmpfs of a dumped mount namespace with its contents, so each restored replica gets its own
   copy; two restores sharing the host's ``/dev/shm`` corrupted each other and killed an engine, and two
   restored engines would bind the same IPC socket path. When the namespace ends, both tmpfs go with it:
   nothing is left on the host after a replica stops (vLLM leaks a 160 MB ``psm_*`` file on SIGTERM and
   its sockets and file store in /tmp otherwise). ``/tmp`` itself stays the host's: models and files
   under it must stay visible to the engine. One cache under TMPDIR stays the host's, bind-mounted into
   the private one: torch's ``torchinductor_<user>`` (its precompiled headers ignore
   ``TORCHINDUCTOR_CACHE_DIR``): 155 MB that would otherwise be rebuilt at every cold boot and travel,
   gzipped, in every snapshot (+23 MB image, ~0.5 s of every restore).
2. unmounts what CRIU cannot dump in a mount namespace: namespace files (``nsfs``, e.g. under
   ``/run/netns``) and FUSE mounts (other replicas' image mounts), except the ones given with ``--keep``
   (this deployment's imagefs mount: the engine's files; CRIU dumps it as an external mount and binds the
   host's mount back at restore, ``CriuCheckpointer(external_mounts=...)``).
3. mounts a /proc of its own PID namespace: on the host's /proc, ``/proc/<os.getpid()>`` is another
   process or none (vLLM's engine core reads ``/proc/<its pid>/status`` and died at boot, now and then,
   with "No such file or directory"); ``/proc/self`` hid the problem for single-process engines.
4. reopens stdin on ``/dev/null`` inside the namespace (a descriptor inherited from the host's mount
   namespace fails the dump: "Can't lookup mount=N for fd=0 path=/dev/null");
5. leads its own session (CRIU refuses a tree whose session leader lives outside its PID namespace) and
   denies io_uring (``no_io_uring``), then execs the engine, which thus stays PID 1.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import tempfile

from coldstart.launcher.checkpointers.no_io_uring import deny_io_uring

PRIVATE_TMPDIR = "/run/coldstart/replica-tmp"  # an empty folder on the host; each replica mounts over it
PRIVATE_TMPFS = ("/dev/shm", PRIVATE_TMPDIR)
HOST_TMP = tempfile.gettempdir()  # the launcher's, before TMPDIR is pointed at the private one


def _host_caches() -> list[str]:
    return [f"torchinductor_{getpass.getuser()}"]


UNDUMPABLE_FSTYPES = ("nsfs", "fuse", "fuseblk", "fusectl")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of this mount namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((fields[4].replace("\\040", " "), fields[sep + 1]))
    return out


def _undumpable(fstype: str) -> bool:
    return fstype.split(".")[0] in UNDUMPABLE_FSTYPES


def prepare_mounts(keep: tuple[str, ...] = ()) -> None:
    for target, fstype in reversed(_mounts()):  # deepest first
        if target in keep:
            continue
        if _undumpable(fstype) or target == "/run/netns":
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    for target in PRIVATE_TMPFS:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "coldstart-replica", target],
            check=True,
            capture_output=True,
        )
    for name in _host_caches():
        host, private = os.path.join(HOST_TMP, name), os.path.join(PRIVATE_TMPDIR, name)
        os.makedirs(host, exist_ok=True)
        os.makedirs(private, exist_ok=True)
        subprocess.run(["mount", "--bind", host, private], check=True, capture_output=True)
    subprocess.run(
        ["mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", "/proc"], check=True, capture_output=True
    )


def argv_prefix(keep: tuple[str, ...] = ()) -> list[str]:
    kept = [arg for path in keep for arg in ("--keep", path)]
    return [sys.executable, "-m", "coldstart.launcher.checkpointers.criu_init", *kept, "--"]


def main(argv: list[str]) -> int:
    keep: list[str] = []
    while argv[:1] == ["--keep"] and len(argv) >= 2:
        keep.append(argv[1])
        argv = argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(
            "usage: python -m coldstart.launcher.checkpointers.criu_init -- COMMAND [ARGS...]",
            file=sys.stderr,
        )
        return 2
    try:
        prepare_mounts(tuple(keep))
    except subprocess.CalledProcessError as exc:
        print(f"criu_init: {exc}: {exc.stderr.decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    os.environ["TMPDIR"] = PRIVATE_TMPDIR
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if os.getsid(0) != os.getpid():
        os.setsid()
    deny_io_uring()
    os.execvp(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
