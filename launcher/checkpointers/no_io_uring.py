"""Run a command with ``io_uring_setup`` failing (ENOSYS): ``python -m ...no_io_uring -- ARGV...``.

Why: CRIU cannot dump a process that holds an io_uring ("Unknown shit 600 (anon_inode:[io_uring])", no
io_uring support in CRIU 4.2). uvicorn picks uvloop when it is installed, and uvloop's libuv creates an
io_uring on the first request even with ``UV_USE_IO_URING=0``; vLLM calls uvloop directly. Every library
we know falls back to epoll/threads when the syscall answers ENOSYS, as on kernels without io_uring.

How: a small seccomp filter (io_uring_setup is syscall 425 on every architecture since the numbers were
unified), installed here and inherited by the engine through ``exec``; CRIU saves and restores seccomp
filters with the process. No host-wide setting is touched (``kernel.io_uring_disabled`` would be).

The same filter also refuses (EPERM) the request for Intel AMX tile state, ``arch_prctl(
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` (x86-64 only). Why: that permission is per process and CRIU 4.2
does not restore it, so a restored engine that used AMX before the dump dies with SIGILL at its first
AMX instruction (seen: vLLM's CPU worker, "died unexpectedly (exit code: -4)", at the first request after
restore; torch/oneDNN and vLLM's CPU attention pick AMX for bf16 where the CPU has it). Refused, they
fall back to AVX-512 (torch ``_is_amx_tile_supported()`` is then false), and the image never holds AMX
state.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

_IO_URING_SETUP = 425
_ARCH_PRCTL_X86_64 = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06


def deny_io_uring() -> None:
    """Install the filter on this process (and everything it execs or forks from now on)."""
    # (code, jump if true, jump if false, k); a jump skips that many instructions after the next one.
    program = [
        (_LD_W_ABS, 0, 0, 0),  # 0: A = seccomp_data.nr
        (_JEQ_K, 7, 0, _IO_URING_SETUP),  # 1: io_uring_setup -> 9 (ENOSYS)
        (_JEQ_K, 0, 5, _ARCH_PRCTL_X86_64),  # 2: arch_prctl? else -> 8 (allow)
        (_LD_W_ABS, 0, 0, 4),  # 3: A = seccomp_data.arch
        (_JEQ_K, 0, 3, _AUDIT_ARCH_X86_64),  # 4: x86-64? else -> 8 (allow)
        (_LD_W_ABS, 0, 0, 16),  # 5: A = low word of args[0]
        (_JEQ_K, 0, 1, _ARCH_REQ_XCOMP_PERM),  # 6: AMX permission request? else -> 8 (allow)
        (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),  # 7
        (_RET_K, 0, 0, _RET_ALLOW),  # 8
        (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),  # 9
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
