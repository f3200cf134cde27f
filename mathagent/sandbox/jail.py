"""The jail of one session: what the sandbox asks of the kernel so that a trajectory's cells reach nothing
outside it.

Each mechanism is applied by the process the sandbox's chain puts in charge of it (see `supervisor`):

    launcher    enter_namespaces: pid, mount, IPC and network namespaces (a user namespace first where we
                are not root), each tried alone where the OS refuses them together; the memory cgroup
    supervisor  isolate: every mount read-only, a private tmpfs for /tmp and /dev/shm, a /proc of our own
    holder      drop_privileges: a uid of its own, no capabilities, no_new_privs, the rlimits

and one memory budget per session, the kernel's (MemoryCgroup) or the supervisor's poll (PolledBudget).
`isolate` returns the report the caller reads as `Sandbox.isolation`.
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
    elif drop_uid and any(_closed_ancestor(path) for path in _python_paths()):
        report["imports"] = "only what the zygote imported: the Python installation is closed to others"
    if drop_uid:
        report["uid"] = uid
    if not namespaces & CLONE_NEWPID:
        prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of cells come to us, so we can find and kill them
    return report, workdir


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
    the rlimits, and the audit hook where there is no network namespace."""
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


# -- one memory budget per session ----------------------------------------------------------------------------


class MemoryCgroup:
    """One session's memory budget as a kernel memory cgroup: every process of the holder chain, whatever
    it forks, its memfds and the files it writes to its tmpfs are charged to one counter, and past the limit
    the kernel's OOM killer stops a process of the session, not the machine.

    Made by the launcher before it enters the session's mount namespace, where every mount is read-only
    afterwards: the files it needs later are opened now, through the host's mounts."""

    OOM_SCORE_CELL, OOM_SCORE_HOLDER = 1000, -500

    def __init__(self, parent: str, version: int, name: str, limit: int):
        self.version, self.name = version, name
        self.parent = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.mkdir(name, 0o700, dir_fd=self.parent)
        except FileExistsError:  # left by a launcher killed before its clean-up
            os.rmdir(name, dir_fd=self.parent)
            os.mkdir(name, 0o700, dir_fd=self.parent)
        path = os.path.join(parent, name)
        try:
            limits = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes") if version == 1 else (
                "memory.max", "memory.swap.max")
            with open(os.path.join(path, limits[0]), "w") as f:
                f.write(str(limit))
            try:
                with open(os.path.join(path, limits[1]), "w") as f:  # no swap past the budget either
                    f.write(str(limit) if version == 1 else "0")
            except OSError:
                pass  # no swap accounting on this kernel
            self.procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
            self.events = os.open(os.path.join(path, "memory.oom_control" if version == 1 else "memory.events"),
                                  os.O_RDONLY)
            if self.oom_kills() is None:
                raise OSError(errno.ENOTSUP, "this kernel does not count OOM kills per cgroup")
        except OSError:
            self.remove()
            raise

    def join(self) -> None:
        """Move the calling process (a new holder, still root) into the cgroup; its descendants follow.
        Its OOM score is set as root too, which makes it the lowest a process of the session may set itself;
        while a cell runs the holder raises it (`OOM_SCORE_CELL`), and what the cell starts inherits that."""
        os.write(self.procs, b"0")
        set_oom_score(self.OOM_SCORE_HOLDER)

    def oom_kills(self) -> int | None:
        """How many processes of the session the kernel's OOM killer has stopped so far."""
        os.lseek(self.events, 0, os.SEEK_SET)
        for line in os.read(self.events, 4096).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def close_files(self, *which: str) -> None:
        """Close what this process does not need: the supervisor the parent directory, the launcher the
        cgroup's files, a holder (and so every cell) all of them."""
        for name in which or ("procs", "events", "parent"):
            if getattr(self, name, None) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)

    def remove(self) -> None:
        """Delete the cgroup once its processes are gone (the session ended)."""
        self.close_files("procs", "events")
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
        os.close(self.parent)
        self.parent = None


def set_oom_score(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:  # lowering it needs CAP_SYS_RESOURCE (a user namespace's root has none on the host)
        pass


def memory_cgroup_parent() -> tuple[str, int] | None:
    """The directory of our own memory cgroup, and the cgroup version, if we may create sessions' cgroups
    with a memory limit under it: root (or a delegated cgroup) and the memory controller available."""
    with open("/proc/self/cgroup") as f:
        memberships = [line.rstrip("\n").split(":", 2) for line in f]
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for version in (2, 1):
        for fields in mounts:
            dash = fields.index("-")
            fstype, options = fields[dash + 1], fields[dash + 3].split(",")
            if (fstype, version) not in (("cgroup2", 2), ("cgroup", 1)) or (version == 1 and "memory" not in options):
                continue
            own = [path for _, controllers, path in memberships
                   if (version == 2 and controllers == "") or (version == 1 and "memory" in controllers.split(","))]
            root, mountpoint = fields[3], fields[4]
            if not own or not (own[0] + "/").startswith(root.rstrip("/") + "/"):
                continue
            directory = os.path.join(mountpoint, own[0][len(root.rstrip("/")) :].lstrip("/"))
            if version == 2:  # a child has a memory limit only where this cgroup hands the controller down
                try:
                    with open(os.path.join(directory, "cgroup.subtree_control")) as f:
                        if "memory" not in f.read().split():
                            continue
                except OSError:
                    continue
            if os.access(directory, os.W_OK):
                return directory, version
    return None


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

    def start(self, processes: dict[int, tuple[int, bool]]) -> None:
        """Before a cell: a session already over the budget (files an earlier cell left before it was stopped)
        may still run cells that do not grow it, one that deletes them say, as under a cgroup."""
        self.allowed = max(self.limit, self.used(processes) + self.SLACK)

    def over(self, processes: dict[int, tuple[int, bool]]) -> bool:
        return self.used(processes) > self.allowed

    def used(self, processes: dict[int, tuple[int, bool]]) -> int:
        total, memfds = 0, {}
        for pid, (_, alive) in processes.items():
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


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
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
