"""Run a command under systemd's ``MemoryDenyWriteExecute=yes``, without systemd.

``python -m tests.deploy.deploy_mdwe CMD ARGS...`` installs the seccomp filter
systemd 252 (Debian 12) installs for that setting, then execs CMD: mmap with
PROT_WRITE and PROT_EXEC together, mprotect/pkey_mprotect with PROT_EXEC and
shmat with SHM_EXEC fail with EPERM (systemd's ``SystemCallErrorNumber=EPERM``
shape). The filter survives exec and is inherited by children, as in a unit.
Newer systemd uses the kernel's PR_SET_MDWE instead, which allows strictly more
(an mprotect to R+X of a mapping that never was writable), so passing this
filter passes both. x86-64 only; other architectures are let through.
"""

from __future__ import annotations

import ctypes
import os
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
NR_MMAP, NR_MPROTECT, NR_SHMAT, NR_PKEY_MPROTECT = 9, 10, 30, 329
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
LD_ABS_W, JEQ_K, AND_K, RET_K = 0x20, 0x15, 0x54, 0x06
RET_ALLOW, RET_EPERM = 0x7FFF0000, 0x00050000 | 1
OFF_NR, OFF_ARCH, OFF_ARG2 = 0, 4, 16 + 2 * 8  # struct seccomp_data (low word of args[2])
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Insn))]


def program() -> list[tuple[int, int, int, int]]:
    """The BPF program; jumps are relative to the next instruction."""
    return [
        (LD_ABS_W, 0, 0, OFF_ARCH),
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (RET_K, 0, 0, RET_ALLOW),  # 2: another ABI: not ours to judge
        (LD_ABS_W, 0, 0, OFF_NR),
        (JEQ_K, 4, 0, NR_MMAP),  # -> 9
        (JEQ_K, 7, 0, NR_MPROTECT),  # -> 13
        (JEQ_K, 6, 0, NR_PKEY_MPROTECT),  # -> 13
        (JEQ_K, 9, 0, NR_SHMAT),  # -> 17
        (RET_K, 0, 0, RET_ALLOW),  # 8
        (LD_ABS_W, 0, 0, OFF_ARG2),  # 9: mmap(prot)
        (AND_K, 0, 0, PROT_WRITE | PROT_EXEC),
        (JEQ_K, 9, 0, PROT_WRITE | PROT_EXEC),  # -> 21
        (RET_K, 0, 0, RET_ALLOW),
        (LD_ABS_W, 0, 0, OFF_ARG2),  # 13: mprotect(prot)
        (AND_K, 0, 0, PROT_EXEC),
        (JEQ_K, 5, 0, PROT_EXEC),  # -> 21
        (RET_K, 0, 0, RET_ALLOW),
        (LD_ABS_W, 0, 0, OFF_ARG2),  # 17: shmat(flags)
        (AND_K, 0, 0, SHM_EXEC),
        (JEQ_K, 1, 0, SHM_EXEC),  # -> 21
        (RET_K, 0, 0, RET_ALLOW),
        (RET_K, 0, 0, RET_EPERM),  # 21
    ]


def install() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    insns = (_Insn * len(program()))(*[_Insn(*i) for i in program()])
    prog = _Prog(len(insns), insns)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
