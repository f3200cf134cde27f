"""The jail of one session: what the sandbox asks of the kernel so that a trajectory's cells reach nothing
outside it.

Each mechanism is applied by the process the sandbox's chain puts in charge of it (see `supervisor`):

    zygote      the session's cgroups (memory budget, CPU quota) and its uid, from a machine-wide pool
    launcher    enter_namespaces: pid, mount, IPC and network namespaces (a user namespace first where we
                are not root), each tried alone where the OS refuses them together
    supervisor  isolate: every mount read-only, a private tmpfs for /tmp and /dev/shm, a /proc and a devpts
                of our own
    holder      drop_privileges: a uid of its own, no capabilities, no_new_privs, the rlimits, the seccomp
                filter (socket families, keys, io_uring, file locks)

and every one of them first closes each file it did not open for itself (`keep_only_fds`): an fd that
crosses a fork is a way out of the namespaces it was opened in. `isolate` returns the report the caller reads
as `Sandbox.isolation`.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import resource
import signal
import socket
import sys
import time

_CLONE_NEWNS, _CLONE_NEWUSER, CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_CLONE_NEWIPC = 0x08000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME, _PR_CAPBSET_DROP = 1, 4, 15, 24
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
MAX_PTYS = 16  # the ptys a session's own devpts instance holds at once
_MOUNT_OPTIONS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
                  "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}  # fmt: skip

_libc = None


def _libc_call(name: str, *args) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result = getattr(_libc, name)(*args)
    if result == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return result


def _unshare(flags: int) -> None:
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(flags)
    else:
        _libc_call("unshare", ctypes.c_int(flags))


def setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, nstype)
    else:
        _libc_call("setns", ctypes.c_int(fd), ctypes.c_int(nstype))


def set_process_name(name: bytes) -> None:
    """The name `ps` and `top` show (15 bytes at most): what each process of the sandbox is."""
    _libc_call("prctl", ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name[:15]), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))


def prctl(option: int, value: int) -> None:
    _libc_call("prctl", ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
               ctypes.c_ulong(0))  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """capset(2) with empty sets (64-bit capabilities: version 3, two data structs)."""
    _libc_call("capset", ctypes.byref(_CapHeader(0x20080522, 0)), (_CapData * 2)())


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _libc_call("mount", encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))


def keep_only_fds(keep: set[int]) -> None:
    """Close every file descriptor of this process but `keep`: an allow-list, so that nothing a parent held
    (another session's cgroup directory, the zygote's sockets, a host directory) reaches a session through a
    fork, whatever the parent opened."""
    low = 0
    for fd in sorted(keep) + [2**31 - 1]:
        if fd > low:
            os.closerange(low, fd)  # close_range(2): one system call per gap
        low = fd + 1


# -- namespaces: the launcher ---------------------------------------------------------------------------------


def enter_namespaces(network: bool, *, only: int | None = None, exclude: int = 0, strict: bool = False) -> int:
    """Move the calling process into new namespaces (its next child is the first process of the pid one);
    the CLONE_NEW* flags of those the OS allowed. `only`/`exclude`: of the namespaces a session wants, just
    these / all but these; `strict`: raise OSError unless the OS allows them all."""
    # IPC: SysV shared memory, semaphores and message queues and POSIX message queues are per namespace, so
    # no session reads another's segment by key, and all of them go when the session's last process exits.
    wanted = [CLONE_NEWPID, _CLONE_NEWNS, _CLONE_NEWIPC] + ([] if network else [_CLONE_NEWNET])
    if os.geteuid() != 0:
        wanted.insert(0, _CLONE_NEWUSER)  # lets an unprivileged caller still make the namespaces below
    wanted = [flag for flag in wanted if (only is None or flag & only) and not flag & exclude]
    namespaces = 0
    real_uid, real_gid = os.getuid(), os.getgid()  # inside a new user namespace they read as 65534
    try:
        _unshare(sum(wanted))
        namespaces = sum(wanted)
    except OSError:
        if strict:
            raise
        for flag in wanted:  # take what the OS allows, one by one
            try:
                _unshare(flag)
                namespaces |= flag
            except OSError:
                pass
    if namespaces & _CLONE_NEWUSER:
        for path, text in (("uid_map", f"0 {real_uid} 1"), ("setgroups", "deny"), ("gid_map", f"0 {real_gid} 1")):
            fd = os.open(f"/proc/self/{path}", os.O_WRONLY)  # not open(): O_TRUNC is refused here
            os.write(fd, text.encode())
            os.close(fd)
    return namespaces


def host_workdir(namespaces: int, uid: int) -> str | None:
    """Without a mount namespace (no private tmpfs), the session's working directory on the host, owned by
    its uid; the launcher removes it when the session ends. None where there is a mount namespace."""
    if namespaces & _CLONE_NEWNS:
        return None
    import tempfile

    workdir = tempfile.mkdtemp(prefix="mathagent-sandbox-")
    if os.geteuid() == 0 and not namespaces & _CLONE_NEWUSER:
        os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)
    return workdir


# -- session uids: the zygote -----------------------------------------------------------------------------------

SESSION_UID_BASE = 1_000_000_000  # session uids are taken from here up; none of them has a passwd entry
_SESSION_UID_END = 4_000_000_000  # below 2**32 - 1, which means "no uid" to the kernel
UID_COUNTER = "/run/mathagent-sandbox/next-uid"


class UidPool:
    """Session uids, each handed out once on this machine: every zygote takes blocks of BLOCK from one
    counter file under /run (root's, locked while it is read and advanced), so no two sessions, of one
    sandbox or of independent ones, share a uid, now or later (what a uid leaves in the kernel, a key say,
    cannot reach another trajectory). Where /run cannot hold the counter, blocks start at random."""

    BLOCK = 1024

    def __init__(self):
        self.next = self.end = 0
        self.source = "machine-wide counter"

    def take(self) -> int:
        if self.next == self.end:
            try:
                self.next = _advance_counter(self.BLOCK)
            except OSError as e:
                import secrets

                blocks = (_SESSION_UID_END - SESSION_UID_BASE) // self.BLOCK
                self.next = SESSION_UID_BASE + secrets.randbelow(blocks) * self.BLOCK
                self.source = f"random blocks of {self.BLOCK} ({UID_COUNTER}: {e.strerror})"
            self.end = self.next + self.BLOCK
        self.next += 1
        return self.next - 1


def _advance_counter(count: int) -> int:
    """Take `count` uids from the machine's counter file; the first."""
    import fcntl
    import stat

    directory = os.path.dirname(UID_COUNTER)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise OSError(errno.EPERM, "not a directory of ours alone")
    fd = os.open(UID_COUNTER, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = os.pread(fd, 64, 0).decode().strip()
        first = int(text) if text.isdigit() else SESSION_UID_BASE
        if not SESSION_UID_BASE <= first <= _SESSION_UID_END - count:
            first = SESSION_UID_BASE  # wrapped around: ~3 billion sessions later
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(first + count).encode(), 0)
        return first
    finally:
        os.close(fd)  # and with it the lock


# -- the file system: the supervisor, inside the namespaces ---------------------------------------------------


def isolate(config: dict, uid: int, namespaces: int, workdir: str | None) -> tuple[dict, str]:
    """Mount the session's view of the machine in the namespaces we are in: (what is in force, the working
    directory of the cells)."""
    report = {
        "user_namespace": bool(namespaces & _CLONE_NEWUSER),
        "pid_namespace": bool(namespaces & CLONE_NEWPID),
        "mount_namespace": bool(namespaces & _CLONE_NEWNS),
        "ipc_namespace": bool(namespaces & _CLONE_NEWIPC),
        "network": "allowed" if config["network"] else "none",
        "read_only_root": False,
        "uid": None,
    }
    if not config["network"] and not namespaces & _CLONE_NEWNET:
        report["network"] = "blocked by an audit hook (best effort: Python sockets only)"
    drop_uid = os.geteuid() == 0 and not namespaces & _CLONE_NEWUSER
    if namespaces & _CLONE_NEWNS:
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing we mount reaches the host
        if drop_uid:
            _expose_python()
        report["read_only_root"] = _remount_read_only()
        workdir = "/tmp"
        owner = f",uid={uid},gid={uid}" if drop_uid else ""
        size = 4 * config["max_file_mb"]
        _mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size}m,mode=0700{owner}")
        if os.path.isdir("/dev/shm"):  # POSIX semaphores and shared memory live there
            _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size}m,mode=0700{owner}")
        if namespaces & CLONE_NEWPID:
            # A /proc of our pid namespace: cells see only their own processes, not the caller's.
            _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
        report["ptys"] = _own_devpts()
    elif drop_uid and any(_closed_ancestor(path) for path in _python_paths()):
        report["imports"] = "only what the zygote imported: the Python installation is closed to others"
    if drop_uid:
        report["uid"] = uid
    if not namespaces & CLONE_NEWPID:
        prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of cells come to us, so we can find and kill them
    return report, workdir


def _own_devpts() -> str:
    """Mount a devpts instance of the session's own on /dev/pts, with room for MAX_PTYS: opening /dev/ptmx
    then takes a pty from it (the kernel looks up the pts directory beside the ptmx node), not from the
    host's pool, whose last `kernel.pty.reserve` ptys no other instance may take. What is in force."""
    if not os.path.isdir("/dev/pts"):
        return "none (no /dev/pts)"
    try:
        _mount("devpts", "/dev/pts", "devpts", _MS_NOSUID | _MS_NOEXEC,
               f"newinstance,ptmxmode=0666,mode=0600,max={MAX_PTYS}")
    except OSError as e:
        return f"the host's (a devpts of our own was refused: {e.strerror})"
    return f"own devpts, at most {MAX_PTYS}"


def _remount_read_only() -> bool:
    """Make every mount of our mount namespace read-only; False where one refused."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    everything = True
    for fields in mounts:
        target = fields[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        options = fields[5].split(",")
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        # Flags the mount has must be repeated: in a user namespace they are locked, and a remount
        # that drops one is refused.
        flags |= sum(flag for name, flag in _MOUNT_OPTIONS.items() if name in options)
        try:
            _mount(None, target, None, flags, None)
        except OSError:
            everything = False
    return everything


def _python_paths() -> set[str]:
    """The directories the interpreter imports from and runs out of, none inside another."""
    paths = {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    paths |= {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    return {p for p in paths if not any(p.startswith(q + "/") for q in paths)}


def _closed_ancestor(path: str) -> str | None:
    """The first directory above `path` that users other than its owner may not enter, if any."""
    import stat

    ancestor = "/"
    for part in path.strip("/").split("/")[:-1]:
        ancestor = os.path.join(ancestor, part)
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def _expose_python() -> None:
    """Let an unprivileged uid reach the Python installation, in our mount namespace only.

    A Python under a directory only root may enter (pyenv in /root, mode 0700) would leave a cell unable to
    import anything the zygote did not import already. The closed directory is covered by an empty tmpfs
    into which just the installation is bind-mounted, so nothing else of it becomes visible.
    """
    closed: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(_python_paths()):
        ancestor = _closed_ancestor(path)
        if ancestor is not None:
            closed[ancestor].append(path)
    for ancestor, paths in closed.items():
        originals = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in paths]
        _mount("tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
        for path, fd in zip(paths, originals):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
            os.close(fd)


# -- privileges: each holder, before it runs a cell -----------------------------------------------------------


def drop_privileges(config: dict, uid: int, isolation: dict) -> None:
    """Give up, for good, what a cell must not have: the session's uid (or no capabilities), no_new_privs,
    the rlimits, the audit hook where there is no network namespace, and the system-call filter."""
    limits = (
        (resource.RLIMIT_AS, config["memory_mb"] << 20),
        (resource.RLIMIT_FSIZE, config["max_file_mb"] << 20),
        (resource.RLIMIT_NPROC, config["max_processes"]),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    )  # CPU: a timer per cell in the holder (cell.Holder), whose process runs every cell of the session
    if isolation["uid"] is not None:
        # A uid of its own per session: it cannot write what it does not own, cannot signal or trace
        # the caller, and RLIMIT_NPROC (not enforced for root) counts this trajectory's processes only.
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:
        # Root of a user namespace (or an unprivileged caller): no capabilities, now or after an exec,
        # so a cell cannot undo the read-only mounts.
        for cap in range(64):
            try:
                prctl(_PR_CAPBSET_DROP, cap)
            except OSError:
                break
        _drop_capabilities()
    prctl(_PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries do not give a cell its privileges back
    for which, value in limits:
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    if isolation["network"].startswith("blocked by an audit hook"):
        sys.addaudithook(_no_network)
    if config["syscall_filter"] is not None:
        install_syscall_filter(config["syscall_filter"])


# -- the system-call filter: each holder, after drop_privileges -------------------------------------------------

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


def install_syscall_filter(program: list[tuple[int, int, int, int]]) -> None:
    """Install the filter for this process and everything it starts, for good (needs no_new_privs)."""
    filters = (_SockFilter * len(program))(*(_SockFilter(*instruction) for instruction in program))
    fprog = _SockFprog(len(program), filters)
    _libc_call("prctl", ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog),
               ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip


def _no_network(event: str, args: tuple) -> None:
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg") and args:
        sock = args[0]
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            raise PermissionError(errno.EACCES, "network access is disabled in the sandbox")


# -- one memory budget and one CPU quota per session ---------------------------------------------------------


class SessionCgroup:
    """One session's cgroup in one hierarchy: with `memory`, its memory budget (every process of the holder
    chain, whatever it forks, its memfds and the files it writes to its tmpfs are charged to one counter, and
    past the limit the kernel's OOM killer stops a process of the session, not the machine); with `cpus`, its
    CPU quota (its processes together get that many cores' worth of time, so that a trajectory cannot take
    another's share). cgroup v2 keeps both in one directory, v1 in one hierarchy each.

    Made by the zygote (or the launcher) before the session enters its mount namespace, where every mount is
    read-only afterwards: the files it needs later are opened now, relative to `parent`, a directory fd of
    its maker's that no session process holds (`keep_only_fds`)."""

    OOM_SCORE_CELL, OOM_SCORE_HOLDER = 1000, -500
    CPU_PERIOD_US = 100_000

    def __init__(self, parent: int, version: int, name: str, *, memory: int | None = None,
                 cpus: float | None = None):  # fmt: skip
        self.version, self.name, self.parent = version, name, parent
        self.cpus = cpus  # the quota, where this cgroup has one
        self.procs = self.events = None  # events: the OOM-kill counter, where it holds the memory budget
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:  # left by a launcher killed before its clean-up
            os.rmdir(name, dir_fd=parent)
            os.mkdir(name, 0o700, dir_fd=parent)
        directory = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent)
        try:
            settings = []
            if memory is not None:
                settings += [("memory.limit_in_bytes", str(memory), True), ("memory.memsw.limit_in_bytes", str(memory),
                             False)] if version == 1 else [("memory.max", str(memory), True),
                                                           ("memory.swap.max", "0", False)]  # fmt: skip
            if cpus is not None:
                quota = int(cpus * self.CPU_PERIOD_US)
                settings += [("cpu.cfs_period_us", str(self.CPU_PERIOD_US), True), ("cpu.cfs_quota_us", str(quota),
                             True)] if version == 1 else [("cpu.max", f"{quota} {self.CPU_PERIOD_US}", True)]
            for file, value, required in settings:
                try:
                    fd = os.open(file, os.O_WRONLY, dir_fd=directory)
                    try:
                        os.write(fd, value.encode())
                    finally:
                        os.close(fd)
                except OSError:
                    if required:
                        raise  # optional: swap, where the kernel does not account it (no swap past the budget)
            self.procs = os.open("cgroup.procs", os.O_WRONLY, dir_fd=directory)
            if memory is not None:
                events = "memory.oom_control" if version == 1 else "memory.events"
                self.events = os.open(events, os.O_RDONLY, dir_fd=directory)
                if self.oom_kills() is None:
                    raise OSError(errno.ENOTSUP, "this kernel does not count OOM kills per cgroup")
        except OSError:
            self.remove()
            raise
        finally:
            os.close(directory)

    def fds(self) -> set[int]:
        """The files of the cgroup this process holds: the supervisor keeps them across `keep_only_fds`."""
        return {fd for fd in (self.procs, self.events) if fd is not None}

    def join(self) -> None:
        """Move the calling process (a new holder, still root) into the cgroup; its descendants follow."""
        os.write(self.procs, b"0")

    def oom_kills(self) -> int | None:
        """How many processes of the session the kernel's OOM killer has stopped so far."""
        os.lseek(self.events, 0, os.SEEK_SET)
        for line in os.read(self.events, 4096).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def close_files(self) -> None:
        """Close the cgroup's files: the zygote (or launcher) keeps only what `remove` needs, a holder none."""
        for name in ("procs", "events"):
            if getattr(self, name) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)

    def remove(self) -> None:
        """Delete the cgroup once its processes are gone (the session ended)."""
        self.close_files()
        for _ in range(100):  # the last processes may still be exiting
            try:
                os.rmdir(self.name, dir_fd=self.parent)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    break
                time.sleep(0.01)


def set_oom_score(value: int, pid: int | str = "self") -> bool:
    """Set a process's OOM score adjustment; False where the kernel refused (lowering it needs
    CAP_SYS_RESOURCE, which a container's root may lack): the caller counts it."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(value))
        return True
    except OSError:
        return False


def cgroup_parent(controller: str) -> tuple[str, int] | None:
    """The directory of our own cgroup in the hierarchy that carries `controller` ("memory", "cpu"), and its
    version, if we may create sessions' cgroups with that controller under it: root (or a delegated cgroup)
    and the controller available to children."""
    with open("/proc/self/cgroup") as f:
        memberships = [line.rstrip("\n").split(":", 2) for line in f]
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for version in (2, 1):
        for fields in mounts:
            dash = fields.index("-")
            fstype, options = fields[dash + 1], fields[dash + 3].split(",")
            if (fstype, version) not in (("cgroup2", 2), ("cgroup", 1)) or (version == 1 and controller not in options):
                continue
            own = [path for _, controllers, path in memberships
                   if (version == 2 and controllers == "") or (version == 1 and controller in controllers.split(","))]
            root, mountpoint = fields[3], fields[4]
            if not own or not (own[0] + "/").startswith(root.rstrip("/") + "/"):
                continue
            directory = os.path.join(mountpoint, own[0][len(root.rstrip("/")) :].lstrip("/"))
            if version == 2:  # a child has the controller only where this cgroup hands it down
                try:
                    with open(os.path.join(directory, "cgroup.subtree_control")) as f:
                        if controller not in f.read().split():
                            continue
                except OSError:
                    continue
            if os.access(directory, os.W_OK):
                return directory, version
    return None


def memory_cgroup_parent() -> tuple[str, int] | None:
    return cgroup_parent("memory")


def remove_stale_cgroups(parent: str) -> None:
    """Sessions' cgroups left by sandboxes whose zygote was killed before it could remove them."""
    for name in os.listdir(parent):
        if name.startswith("mathagent-"):
            zygote = name.split("-")[1]
            if zygote.isdigit() and not os.path.exists(f"/proc/{zygote}"):
                try:
                    os.rmdir(os.path.join(parent, name))
                except OSError:
                    pass


class PolledBudget:
    """One session's memory budget where no memory cgroup can be made (not root, a read-only cgroupfs): while
    a cell runs, its supervisor adds up every INTERVAL what the session holds and stops the cell past the
    limit. Counted: the private memory of every process of the chain, the memfds they hold and the files in
    the session's tmpfs. Memory the cell takes between two looks (at most one RLIMIT_AS per process) can
    pass the limit for that long; shared pages a process maps privately may be counted twice."""

    INTERVAL = 0.02
    NICE = 10  # added to the cells' scheduling niceness
    SLACK = 8 << 20  # what a cell that allocates nothing still takes (copies of the pages it writes)

    def __init__(self, limit: int, mounts: list[str], directories: list[str]):
        self.limit = limit
        self.mounts = mounts  # the session's own tmpfs mounts: their used blocks
        self.directories = directories  # host directories of the session's: the blocks of their files
        self.allowed = limit

    def start(self, processes: dict[int, tuple[int, bool, int]]) -> None:
        """Before a cell: a session already over the budget (files an earlier cell left before it was stopped)
        may still run cells that do not grow it, one that deletes them say, as under a cgroup."""
        self.allowed = max(self.limit, self.used(processes) + self.SLACK)

    def over(self, processes: dict[int, tuple[int, bool, int]]) -> bool:
        return self.used(processes) > self.allowed

    def used(self, processes: dict[int, tuple[int, bool, int]]) -> int:
        total, memfds = 0, {}
        for pid, (_, alive, _) in processes.items():
            if not alive:
                continue
            try:
                with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                    for line in f:
                        if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                            total += int(line.split()[1]) << 10
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                        info = os.stat(f"/proc/{pid}/fd/{fd}")
                        memfds[info.st_dev, info.st_ino] = info.st_blocks * 512  # allocated, not the sparse size
            except OSError:  # the process ended meanwhile
                continue
        total += sum(memfds.values())
        for path in self.mounts:
            info = os.statvfs(path)
            total += (info.f_blocks - info.f_bfree) * info.f_frsize
        for path in self.directories:
            for directory, _, names in os.walk(path):
                for name in names:
                    try:
                        total += os.lstat(os.path.join(directory, name)).st_blocks * 512
                    except OSError:
                        pass
        return total


# -- processes --------------------------------------------------------------------------------------------------


def kill(pid: int, signum: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def reap() -> list[int]:
    """Collect every child that has exited so far, without waiting for those still running; their pids."""
    collected = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return collected
        if pid == 0:
            return collected
        collected.append(pid)
