"""Run a command with ``io_uring_setup`` failing (ENOSYS): ``python -m ...no_io_uring -- ARGV...``.

Why: CRIU cannot dump a process that holds an io_uring ("Unknown shit 600 (anon_inode:[io_uring])", no
io_uring support in CRIU 4.2). uvicorn picks uvloop when it is installed, and uvloop's libuv creates an
io_uring on the first request even with ``UV_USE_IO_URING=0``; vLLM calls uvloop directly. Every library
we know falls back to epoll/threads when the syscall answers ENOSYS, as on kernels without io_uring.

How: a two-instruction seccomp filter (io_uring_setup is syscall 425 on every architecture since the
numbers were unified), installed here and inherited by the engine through ``exec``; CRIU saves and restores
seccomp filters with the process. No host-wide setting is touched (``kernel.io_uring_disabled`` would be).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

_IO_URING_SETUP = 425
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06


def deny_io_uring() -> None:
    """Install the filter on this process (and everything it execs or forks from now on)."""
    program = [
        (_LD_W_ABS, 0, 0, 0),  # A = seccomp_data.nr
        (_JEQ_K, 0, 1, _IO_URING_SETUP),  # io_uring_setup? next : skip one
        (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in program)
    filters = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(len(program), ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def argv_prefix() -> list[str]:
    return [sys.executable, "-m", "coldstart.launcher.checkpointers.no_io_uring", "--"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(
            "usage: python -m coldstart.launcher.checkpointers.no_io_uring -- COMMAND [ARGS...]",
            file=sys.stderr,
        )
        return 2
    deny_io_uring()
    os.execvp(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
