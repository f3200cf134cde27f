"""The system-call filter of a session: a seccomp program each holder installs after it drops its privileges,
inherited by everything a cell starts and never removed. It refuses the calls that reach past the session's
namespaces: socket families other than unix and IP, the kernel's key store, io_uring and file locks.
"""

from __future__ import annotations

import ctypes
import errno
import socket

from mathagent.sandbox.jail import libc_call


# System-call numbers of the calls the filter looks at, per architecture (asm/unistd.h), and the AUDIT_ARCH
# value the kernel gives a call made through that architecture's ABI. A call through another ABI (32-bit
# int 0x80 on x86_64, x32) is refused whole: its numbers mean other calls.
_SYSCALLS = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "fcntl": 72, "flock": 73, "add_key": 248,
                            "request_key": 249, "keyctl": 250, "io_uring_setup": 425, "io_uring_enter": 426,
                            "io_uring_register": 427}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "fcntl": 25, "flock": 32, "add_key": 217,
                             "request_key": 218, "keyctl": 219, "io_uring_setup": 425, "io_uring_enter": 426,
                             "io_uring_register": 427}),
}  # fmt: skip
SOCKET_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)  # what a cell may open; the network
# namespace leaves AF_INET* nothing to reach. Every other family is refused: vsock (the machine's one port
# space, outside any network namespace), netlink (the kernel's configuration), packet, alg, bluetooth, ...
_LOCK_COMMANDS = (6, 7, 37, 38)  # fcntl F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW (F_GETLK stays open)
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def syscall_filter() -> tuple[list[tuple[int, int, int, int]] | None, str]:
    """The seccomp program a holder installs (classic BPF over struct seccomp_data), and what it does; None
    where this architecture's call numbers are not known here.

    Refused: sockets of any family but SOCKET_FAMILIES (socket, socketpair; EAFNOSUPPORT), the kernel's key
    store (add_key, request_key, keyctl; ENOSYS: nothing a cell stores outlives it or reaches the next owner
    of its uid), io_uring (ENOSYS: its requests open sockets and files without passing this filter) and file
    locks (flock, fcntl's F_SETLK family; ENOLCK: a lock on a file the cell may only read, /etc/passwd say,
    would block other sessions and the host's tools, since locks belong to the file, not the namespace)."""
    import platform

    if platform.machine() not in _SYSCALLS:
        return None, f"off (no system-call table for {platform.machine()})"
    arch, nr = _SYSCALLS[platform.machine()]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    program: list = []  # instructions; a jump's targets are labels, resolved below

    def refuse(code: int) -> tuple:
        return (ret, 0, 0, _SECCOMP_RET_ERRNO | code)

    program += [(load, 0, 0, 4), (jeq, 0, "foreign", arch), (load, 0, 0, 0), (jge, "foreign", 0, 0x40000000)]
    program += [(jeq, "family", 0, nr["socket"]), (jeq, "family", 0, nr["socketpair"])]
    program += [(jeq, "lock", 0, nr["flock"]), (jeq, "fcntl", 0, nr["fcntl"])]
    for name in ("add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter", "io_uring_register"):
        program.append((jeq, "unavailable", 0, nr[name]))
    program.append((ret, 0, 0, _SECCOMP_RET_ALLOW))
    program += ["family", (load, 0, 0, 16)]  # args[0], low word (little-endian)
    program += [(jeq, "allow", 0, family) for family in SOCKET_FAMILIES]
    program += [refuse(errno.EAFNOSUPPORT)]
    program += ["fcntl", (load, 0, 0, 24)]  # args[1]: the command
    program += [(jeq, "lock", 0, command) for command in _LOCK_COMMANDS]
    program += ["allow", (ret, 0, 0, _SECCOMP_RET_ALLOW)]
    program += ["lock", refuse(errno.ENOLCK), "unavailable", refuse(errno.ENOSYS), "foreign", refuse(errno.ENOSYS)]
    labels, position = {}, 0
    for item in program:
        if isinstance(item, str):
            labels[item] = position
        else:
            position += 1
    instructions = [item for item in program if not isinstance(item, str)]
    resolved = []
    for i, (code, jt, jf, k) in enumerate(instructions):
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        resolved.append((code, jt, jf, k))
    families = "/".join(socket.AddressFamily(f).name for f in SOCKET_FAMILIES)
    return resolved, f"on: sockets {families} only; no keys, io_uring or file locks"


class CompiledFilter:
    """A program as the kernel takes it (struct sock_fprog), built once: the zygote's, so that each holder
    only installs it."""

    def __init__(self, program: list[tuple[int, int, int, int]]):
        self.filters = (_SockFilter * len(program))(*(_SockFilter(*instruction) for instruction in program))
        self.fprog = _SockFprog(len(program), self.filters)


def install_syscall_filter(program: list[tuple[int, int, int, int]] | CompiledFilter) -> None:
    """Install the filter for this process and everything it starts, for good (needs no_new_privs)."""
    compiled = program if isinstance(program, CompiledFilter) else CompiledFilter(program)
    libc_call("prctl", ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER),
              ctypes.byref(compiled.fprog), ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip
