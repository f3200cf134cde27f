"""The jail of one session: what the sandbox asks of the kernel so that a trajectory's cells reach nothing
outside it. Beside it: `budgets` (the memory budget and CPU quota) and `syscalls` (the seccomp filter).

Each mechanism is applied by the process the sandbox's chain puts in charge of it (see `zygote`, `supervisor`):

    zygote      the session's uid, from a machine-wide pool (`UidPool`), and its cgroups (`budgets`)
    zygote      read_only_template, once, as root: a mount namespace with every mount read-only (and the
                Python installation reachable), which each session's mount namespace starts as a copy of
    launcher    enter_namespaces: pid, mount, IPC and network namespaces (a user namespace first where we
                are not root), each tried alone where the OS refuses them together
    supervisor  isolate: every mount read-only (done already where the session copied the template), a
                private tmpfs for /tmp and /dev/shm, a /proc and a devpts of our own
    holder      drop_privileges: a uid of its own, no capabilities, no_new_privs, the rlimits; then the
                system-call filter (`syscalls`)

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


def libc_call(name: str, *args) -> int:
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
        libc_call("unshare", ctypes.c_int(flags))


def setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, nstype)
    else:
        libc_call("setns", ctypes.c_int(fd), ctypes.c_int(nstype))


def set_process_name(name: bytes) -> None:
    """The name `ps` and `top` show (15 bytes at most): what each process of the sandbox is."""
    libc_call("prctl", ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name[:15]), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))


def prctl(option: int, value: int) -> None:
    libc_call("prctl", ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
               ctypes.c_ulong(0))  # fmt: skip


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """capset(2) with empty sets (64-bit capabilities: version 3, two data structs)."""
    libc_call("capset", ctypes.byref(_CapHeader(0x20080522, 0)), (_CapData * 2)())


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    libc_call("mount", encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data))


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


def enter_namespaces(network: bool, *, only: int | None = None, exclude: int = 0, strict: bool = False,
                     template: int | None = None) -> int:
    """Move the calling process into new namespaces (its next child is the first process of the pid one);
    the CLONE_NEW* flags of those the OS allowed. `only`/`exclude`: of the namespaces a session wants, just
    these / all but these; `strict`: raise OSError unless the OS allows them all; `template`: a mount
    namespace (`read_only_template`) whose copy the new mount namespace is, instead of a copy of ours."""
    if template is not None:
        setns(template, _CLONE_NEWNS)  # unshare(CLONE_NEWNS) below then copies the template, not the host
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


def read_only_template() -> tuple[int, bool]:
    """A mount namespace in which every mount is read-only and the Python installation reachable by any uid,
    made once (by a child of ours, which exits): (an fd that holds it, whether every mount took read-only).

    A session copies it (`enter_namespaces(template=...)`) instead of remounting each of the host's mounts
    itself: the remounts are the larger part of a session's mount work, and a copy keeps their flags."""
    ready_read, ready_write = os.pipe()
    hold_read, hold_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        answer = b"-"
        try:
            os.close(ready_read)
            os.close(hold_write)
            _unshare(_CLONE_NEWNS)
            _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing we mount reaches the host
            answer = b"1" if _read_only_view(expose_python=os.geteuid() == 0) else b"0"
        except BaseException:
            pass
        try:
            os.write(ready_write, answer)
            os.read(hold_read, 1)  # until our parent holds the namespace
        finally:
            os._exit(0)
    os.close(ready_write)
    os.close(hold_read)
    try:
        answer = os.read(ready_read, 1)
        if answer not in (b"0", b"1"):
            raise OSError(errno.EPERM, "the read-only mount namespace could not be made")
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC), answer == b"1"
    finally:
        os.close(ready_read)
        os.close(hold_write)
        os.waitpid(pid, 0)


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
        if config.get("read_only_template") is not None:  # a copy of read_only_template's: done already
            report["read_only_root"] = config["read_only_template"]
        else:
            report["read_only_root"] = _read_only_view(expose_python=drop_uid)
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


def _read_only_view(expose_python: bool) -> bool:
    """In a private mount namespace: the Python installation reachable by any uid where `expose_python`,
    then every mount read-only; False where one refused."""
    if expose_python:
        _expose_python()
    return _remount_read_only()


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
    the rlimits, and the audit hook where there is no network namespace. The system-call filter comes after
    (`syscalls`), as no_new_privs lets an unprivileged process install it."""
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


def _no_network(event: str, args: tuple) -> None:
    if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg") and args:
        sock = args[0]
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            raise PermissionError(errno.EACCES, "network access is disabled in the sandbox")


# -- processes --------------------------------------------------------------------------------------------------


def kill(pid: int, signum: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def reap() -> list[tuple[int, int]]:
    """Collect every child that has exited so far, without waiting for those still running; their pids and
    wait statuses."""
    collected = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return collected
        if pid == 0:
            return collected
        collected.append((pid, status))
