"""One memory budget and one CPU quota per session: the kernel's cgroups where the machine lets us make them
(`SessionCgroup`), else the supervisor's poll of the memory a session holds (`PolledBudget`). The zygote (or
the launcher) makes a session's cgroups before the session enters its namespaces; the holder joins them.
"""

from __future__ import annotations

import errno
import os
import signal
import time


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
        return _counter(self.events, "oom_kill")

    def open_procs(self) -> None:
        """Open the cgroup's process list again, for the next holder to join."""
        self.procs = os.open(f"{self.name}/cgroup.procs", os.O_WRONLY, dir_fd=self.parent)

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


class CgroupReader:
    """A session's cgroups as the shared supervisor reads them from outside (`supervisor.CgroupSupervisor`):
    its processes, whatever they forked (no process of a session can leave its cgroups), the CPU time they
    used, ended ones included, and the OOM kills. `cgroups`: one {"dir", "version", "controllers", "quota"}
    per hierarchy, as the zygote made them."""

    def __init__(self, cgroups: list[dict]):
        self.name = os.path.basename(cgroups[0]["dir"])
        self.memory_version = self.quota_version = None
        self.events = self.usage = None
        self.usage_in_stat = False  # cgroup v2's cpu.stat (usage_usec) rather than v1's cpuacct.usage (ns)
        self.procs = os.path.join(cgroups[0]["dir"], "cgroup.procs")
        for cgroup in cgroups:
            directory, version = cgroup["dir"], cgroup["version"]
            if "memory" in cgroup["controllers"]:
                self.memory_version = version
                events = "memory.oom_control" if version == 1 else "memory.events"
                self.events = os.open(os.path.join(directory, events), os.O_RDONLY)
            if cgroup["quota"]:
                self.quota_version = version
            usage = "cpu.stat" if version == 2 else "cpuacct.usage"
            if self.usage is None and os.path.exists(os.path.join(directory, usage)):
                self.usage, self.usage_in_stat = os.open(os.path.join(directory, usage), os.O_RDONLY), version == 2

    def pids(self) -> list[int]:
        # Opened for each look: cgroup v1 keeps the list an open file read first for a second, however often
        # it is read again from the start.
        with open(self.procs, "rb") as f:
            return [int(pid) for pid in f.read().split()]

    def cpu_seconds(self) -> float:
        if self.usage_in_stat:
            return (_counter(self.usage, "usage_usec") or 0) / 1e6
        return int(os.pread(self.usage, 64, 0)) / 1e9

    def oom_kills(self) -> int | None:
        return _counter(self.events, "oom_kill")

    def kill(self, pid: int) -> None:
        """SIGKILL `pid`, a process listed in the cgroup, unless it has gone and its pid was reused outside the
        session since (through a pidfd: the process checked is the one signalled)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                if any(line.rstrip("\n").endswith("/" + self.name) for line in f):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass  # gone meanwhile
        finally:
            os.close(pidfd)

    def close(self) -> None:
        for fd in (self.events, self.usage):
            if fd is not None:
                os.close(fd)
        self.events = self.usage = None


def _counter(fd: int, key: str) -> int | None:
    """The value of `key` in a cgroup file of "key value" lines."""
    for line in os.pread(fd, 4096, 0).decode().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


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
