"""The zygote: the first process of a sandbox, started by the caller (`client.Sandbox`) with `python -I` and an
empty environment. It imports the math modules once and keeps `workers` sessions started ahead of need, more
when the caller reserves them. For each session it takes a uid from the machine's pool and makes the session's
cgroups (memory budget, CPU quota, CPU time). As root with cgroups that hold every session's processes and CPU
time, the process the caller started stays small and is the one supervisor of every session
(`supervisor.serve_sessions`); its child, forked before the imports, is the zygote, which forks each session's
holder straight into new namespaces as the init of its pid namespace. Elsewhere the zygote is that process and
forks each session's own supervisor S (`supervisor.NamespaceSupervisor`) as the init of a new pid namespace,
or a launcher that does so where a user namespace has to come first. Either way, when the init exits every
process of the trajectory is gone; the zygote collects it at once (SIGCHLD) and removes its cgroups.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import json
import os
import select
import shutil
import signal
import socket
import time
import traceback

from mathagent.sandbox.budgets import SessionCgroup, cgroup_parent, remove_stale_cgroups
from mathagent.sandbox.jail import (
    CLONE_NEWPID,
    PR_SET_PDEATHSIG,
    SESSION_UID_BASE,
    UidPool,
    enter_namespaces,
    host_workdir,
    isolate,
    keep_only_fds,
    libc_call,
    prctl,
    read_only_template,
    reap,
    set_process_name,
    setns,
)
from mathagent.sandbox.cell import Holder, cell_environment, output_memfd, prepare_cell_process
from mathagent.sandbox.supervisor import NamespaceSupervisor, chain_sockets, serve_sessions
from mathagent.sandbox.syscalls import CompiledFilter, install_syscall_filter, syscall_filter

# Imported once in the zygote so that a cell does not pay for them (sympy alone takes ~0.5 s).
PRELOADED_MODULES = (
    "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "random",
    "statistics", "re", "json", "numpy", "sympy", "encodings.idna",
)  # fmt: skip
_MADV_COLLAPSE = 25


def zygote_main(config: dict) -> None:
    """Import the math modules once, then fork one session (or launcher) per session the caller asks for.
    Where the shared supervisor serves the sessions, this process becomes it first, and its child, forked
    before the imports, is the zygote."""
    control = socket.socket(fileno=config["control_fd"])
    set_process_name(b"sandbox-zygote")
    # Sessions' cgroups are named by this process, the one the caller started: remove_stale_cgroups finds
    # those of a sandbox that is gone by it.
    config["zygote"] = os.getpid()
    # As root with every namespace granted, a session's first process is forked straight into them (no
    # launcher); and where cgroups hold every session's processes and CPU time, one supervisor serves them
    # all and the first process is the holder itself.
    direct = _namespaces_granted(config["network"])
    found = _hierarchies(config, cpu_time=direct)
    shared = direct and _cgroups_hold_sessions(found)
    if not shared:
        found = _hierarchies(config, cpu_time=False)
    link = to_supervisor = None  # shared: new sessions and ended holders go out on one, the other is asked
    if shared:
        to_supervisor, supervisor_sessions = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        link, supervisor_link = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        zygote = os.fork()
        if zygote != 0:  # the caller's child supervises; the zygote is its child, small until it imports
            control.close()
            to_supervisor.close()
            link.close()
            try:
                serve_sessions(config, supervisor_sessions, supervisor_link)
            except BaseException:
                traceback.print_exc()
            os.waitpid(zygote, 0)  # its CPU time, and its holders', counts in the caller's children's
            os._exit(0)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        supervisor_sessions.close()
        supervisor_link.close()
        if os.getppid() != config["zygote"]:
            os._exit(0)
    started = time.perf_counter()
    preload()
    try:
        control.send(json.dumps({"import_seconds": round(time.perf_counter() - started, 3)}).encode())
    except (BrokenPipeError, ConnectionResetError):
        os._exit(0)  # the caller closed the sandbox before its first cell (e.g. a rollout without code)
    program, note = syscall_filter()
    compiled = CompiledFilter(program) if program is not None else None
    if compiled is not None and not _filter_accepted(compiled):
        compiled, note = None, "off (the kernel refused the filter)"
    config["syscall_filter"], config["syscall_filter_note"] = compiled, note
    # One directory fd per cgroup hierarchy, the parent of every session's cgroup in it: the zygote's alone
    # (a session closes it), not one per session, which every later session's cells inherited.
    hierarchies = []
    for hierarchy in found:
        remove_stale_cgroups(hierarchy[0])
        try:
            hierarchies.append((hierarchy, os.open(hierarchy[0], os.O_RDONLY | os.O_DIRECTORY)))
        except OSError:
            continue
    config["cgroups"] = [hierarchy for hierarchy, _ in hierarchies]
    uids = UidPool() if os.geteuid() == 0 else None  # only root gives each session a uid of its own
    config["uid_source"] = uids.source if uids is not None else None
    sessions = itertools.count()
    # unshare(CLONE_NEWPID) works once per pid namespace we are in: after each fork we go back to our own
    # (setns), or the next unshare fails and every later session would share the first one's namespace.
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY) if direct else None
    # Each session's mount namespace a copy of one made read-only here once, not remounted mount by mount;
    # config["read_only_template"]: whether every mount of it took read-only, None where there is none.
    template, config["read_only_template"] = None, None
    if direct:
        try:
            template, config["read_only_template"] = read_only_template()
        except OSError:
            pass  # each session remounts its own
    if shared:  # every holder's work directory is the /tmp of its own mount namespace: its environment, set once
        os.environ.clear()
        os.environ.update(cell_environment(config["mark"], "/tmp"))
    owned: dict[int, list[SessionCgroup]] = {}  # S's pid -> its session's cgroups, removed when S is collected
    live: dict[int, tuple[int, list[SessionCgroup]]] = {}  # shared: session -> (uid, cgroups)
    holders: set[int] = set()  # shared: the holders alive or not yet collected
    # A session that ends (its trajectory forgotten) is collected at once, not at the next request: SIGCHLD
    # wakes the loop below through this pipe.
    wake_up, wake_up_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_up_write, warn_on_full_buffer=False)

    def fork_holder(n: int) -> tuple[dict, list[int]]:
        """A new holder for shared session `n`, the init of a new pid namespace: what the supervisor is told
        of it, and the fds it gets (commands, results, output memfd, pidfd)."""
        uid, cgroups = live[n]
        commands, chain_commands, results, chain_results = chain_sockets()
        printed = output_memfd()
        for cgroup in cgroups:
            cgroup.open_procs()
        enter_namespaces(config["network"], only=CLONE_NEWPID, strict=True)  # our next child is its init
        pid = None
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                setns(own_pid_namespace, CLONE_NEWPID)
        if pid == 0:
            try:
                _holder_main(config, uid, cgroups, template, chain_commands, chain_results, printed)
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        holders.add(pid)
        pidfd = os.pidfd_open(pid)
        for cgroup in cgroups:
            cgroup.close_files()
        fds = [commands.detach(), results.detach(), printed, pidfd]
        holder = {"pid": pid, "commands_fd": chain_commands.fileno()}
        chain_commands.close()
        chain_results.close()
        return holder, fds

    def send_holder(message: dict, fds: list[int], channel: socket.socket) -> None:
        try:
            socket.send_fds(channel, [json.dumps(message).encode()], fds)
        finally:
            for fd in fds:
                os.close(fd)

    def launch() -> socket.socket:
        caller_end, session_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        n = next(sessions)
        uid = uids.take() if uids is not None else SESSION_UID_BASE + n
        cgroups, notes = [], []
        if direct:
            cgroups, notes = _session_cgroups(config, hierarchies, n)
        if shared:
            if len(cgroups) < len(hierarchies):
                raise OSError(f"a session's cgroups could not be made: {notes}")
            live[n] = (uid, cgroups)
            holder, fds = fork_holder(n)
            described = [{"dir": os.path.join(hierarchy[0], cgroup.name), "version": cgroup.version,
                          "controllers": list(hierarchy[2]), "quota": cgroup.cpus is not None}
                         for (hierarchy, _), cgroup in zip(hierarchies, cgroups)]  # fmt: skip
            send_holder(dict(holder, kind="session", session=n, cgroups=described, notes=notes),
                        [session_end.detach(), *fds], to_supervisor)  # fmt: skip
            return caller_end
        if direct:
            enter_namespaces(config["network"], only=CLONE_NEWPID, strict=True)  # our next child is its init
        try:
            pid = os.fork()
        except OSError:
            pid = None
            raise
        finally:
            if direct and pid != 0:  # in the parent only: the child may not leave its new namespace
                setns(own_pid_namespace, CLONE_NEWPID)
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                control.close()
                for spare in spares:
                    spare.close()
                caller_end.close()
                if not direct:
                    _launcher_main(config, session_end, uid, n)
                namespaces = CLONE_NEWPID | enter_namespaces(config["network"], exclude=CLONE_NEWPID,
                                                             template=template)
                NamespaceSupervisor(config, session_end, uid, namespaces, None, cgroups, notes).serve()
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        session_end.close()
        for cgroup in cgroups:
            cgroup.close_files()
        if cgroups:
            owned[pid] = cgroups
        return caller_end

    def collect() -> None:
        """Collect every session (or launcher, or holder) that has exited: remove the cgroups we made for a
        session, tell the supervisor how a holder ended."""
        for pid, status in reap():
            for cgroup in owned.pop(pid, []):
                cgroup.remove()
            if pid in holders:
                holders.discard(pid)
                try:
                    to_supervisor.send(json.dumps({"kind": "died", "pid": pid, "status": status}).encode())
                except OSError:
                    pass

    def woken() -> None:
        """SIGCHLD came (through the wake-up pipe): empty the pipe, collect what exited."""
        while True:
            try:
                os.read(wake_up, 4096)
            except BlockingIOError:
                break
        collect()

    def answer_supervisor() -> None:
        """A new holder for a session whose last one failed, or the end of a session (its holder is dead)."""
        try:
            message = link.recv(1 << 16)
        except OSError:
            message = b""
        if not message:
            os._exit(0)  # the supervisor is gone
        request = json.loads(message)
        n = request["session"]
        if request["kind"] == "holder":  # answered always: the supervisor's thread waits for it
            holder, fds = fork_holder(n) if n in live else ({"error": f"no session {n}"}, [])
            send_holder(holder, fds, link)
        elif request["kind"] == "end" and n in live:
            collect()
            for cgroup in live.pop(n)[1]:
                cgroup.remove()

    # Sessions started ahead of need, so that a new trajectory does not wait for namespaces and forks: always
    # `spares` of them, and as many as the caller said it will soon ask for (b"reserve N"), built one at a
    # time between the caller's requests, while the caller does something else (its engine generates). A
    # request waits for one launch at most, never for the whole set (the first cells, for `spares` of them).
    spares: collections.deque[socket.socket] = collections.deque()
    reserved = 0
    inputs = [control, wake_up] + ([link] if shared else [])
    while True:
        short = len(spares) < max(config["spares"], reserved)
        ready = select.select(inputs, [], [], 0 if short else None)[0]
        if wake_up in ready:
            woken()
        if link is not None and link in ready:
            answer_supervisor()
            continue
        if control not in ready:
            if short:
                spares.append(launch())
            continue
        try:
            message = control.recv(1 << 16)
        except ConnectionResetError:  # the caller closed with our ready message unread: the same as EOF
            message = b""
        if message.startswith(b"reserve "):
            reserved = int(message.split()[1])  # the caller keeps it within its max_sessions
            continue
        if not message:  # the caller closed us (or died): end the spares, wait for every session to end
            for spare in spares:
                spare.close()
            signal.alarm(10)  # a session that does not exit by then is killed with us (parent-death signal)
            if shared:  # the supervisor ends each session as the caller closes it, and tells us
                while live:
                    if link in select.select([link, wake_up], [], [])[0]:
                        answer_supervisor()
                    woken()
                os._exit(0)
            while True:
                try:
                    pid, _ = os.waitpid(-1, 0)
                except ChildProcessError:
                    os._exit(0)
                for cgroup in owned.pop(pid, []):
                    cgroup.remove()
        collect()
        reserved = max(reserved - 1, 0)
        caller_end = spares.popleft() if spares else launch()
        socket.send_fds(control, [b"session"], [caller_end.fileno()])
        caller_end.close()


def preload() -> None:
    """Make this process what sessions are forked from: the math modules imported and warmed up, the objects
    frozen out of the collector's reach (forked sessions then do not copy pages for its bookkeeping), the
    heap in huge pages."""
    import gc

    for name in PRELOADED_MODULES:
        __import__(name)
    _warm_up()
    gc.freeze()
    _huge_pages()


def _warm_up() -> None:
    # sympy imports and caches a lot lazily on first use; pay for it once here, not in every session.
    import numpy
    import sympy

    x, y = sympy.symbols("x y")
    sympy.solve([x + y - 3, x - y - 1], [x, y])
    sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
    sympy.factor(x**2 - 1), sympy.expand((x + 1) ** 3), sympy.Rational(1, 3) + 1
    sympy.integrate(x**2, (x, 0, 1)), sympy.diff(sympy.exp(x), x), sympy.N(sympy.pi, 20)
    sympy.isprime(97), sympy.factorint(360), sympy.binomial(10, 3), sympy.Matrix([[1, 2], [3, 4]]).det()
    str(sympy.sqrt(8)), repr(x**2 + 1)
    numpy.linalg.solve(numpy.eye(2), numpy.ones(2)), numpy.arange(10).sum()


def _huge_pages() -> None:
    """Back the zygote's heap (its anonymous private mappings) with 2 MB pages where the kernel can (madvise's
    MADV_COLLAPSE, Linux 6.1 and later; elsewhere nothing changes). Each session's fork then copies one
    page-table entry per 2 MB of it instead of 512, and a session's exit tears down as few, where the session
    has not written there; what it writes is still copied 4 KB at a time (the kernel splits a shared huge
    page at a copy-on-write fault since Linux 5.8). What a session can read or reach is the same. Best
    effort: a region the kernel cannot collapse (no free huge page) stays as it is."""
    huge = 1 << 21
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    for fields in regions:
        if fields[1] != "rw-p" or len(fields) > 5 and fields[5] != "[heap]":
            continue  # read-only or file-backed: not copied at a fork
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        low, high = -(-low // huge) * huge, high // huge * huge
        if high > low:
            try:
                libc_call("madvise", ctypes.c_void_p(low), ctypes.c_size_t(high - low), ctypes.c_int(_MADV_COLLAPSE))
            except OSError:
                pass  # an older kernel (EINVAL), or no huge page to be had (EAGAIN, ENOMEM)


def _namespaces_granted(network: bool) -> bool:
    """Whether we are root and a child of ours may enter every namespace a session wants, together."""
    if os.geteuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        try:
            enter_namespaces(network, strict=True)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _filter_accepted(program: CompiledFilter) -> bool:
    """Whether the kernel takes the system-call filter (a child tries it, as a holder will)."""
    pid = os.fork()
    if pid == 0:
        try:
            prctl(38, 1)  # PR_SET_NO_NEW_PRIVS: what an unprivileged filter needs
            install_syscall_filter(program)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _hierarchies(config: dict, cpu_time: bool) -> list[tuple[str, int, tuple[str, ...]]]:
    """The cgroup hierarchies sessions get a cgroup in: (our cgroup's directory, version, the controllers
    of the session's it carries). cgroup v2 carries memory and cpu in one, v1 one hierarchy each; `cpu_time`:
    also v1's cpuacct, which counts the CPU time of a cgroup's processes (v2's cpu.stat always does)."""
    wanted = (["memory"] if config["cgroup"] else []) + (["cpu"] if config["cpus"] else [])
    wanted += ["cpuacct"] if cpu_time else []
    found: dict[tuple[str, int], list[str]] = {}
    for controller in wanted:
        parent = cgroup_parent(controller)
        if parent is not None:
            found.setdefault(parent, []).append(controller)
    return [(path, version, tuple(controllers)) for (path, version), controllers in found.items()]


def _cgroups_hold_sessions(hierarchies: list[tuple[str, int, tuple[str, ...]]]) -> bool:
    """Whether sessions' cgroups can stand in for a supervisor in each session's pid namespace: a memory
    cgroup (the budget, and the list of every process of the session) and a count of their CPU time."""
    memory = any("memory" in controllers for _, _, controllers in hierarchies)
    return memory and any(version == 2 or "cpuacct" in controllers for _, version, controllers in hierarchies)


def _holder_main(config: dict, uid: int, cgroups: list[SessionCgroup], template: int | None,
                 commands: socket.socket, results: socket.socket, printed: int) -> None:  # fmt: skip
    """A shared session's holder, just forked as the init of a new pid namespace: join the session's
    cgroups, enter the other namespaces, mount the session's view, then serve the supervisor as a holder.
    As the init, it collects the orphans of its cells, and whatever it leaves dies with it."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    set_process_name(b"sandbox-holder")
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote died: so do we, and our namespace
    os.setsid()  # kill(0) from a cell reaches nobody outside
    keep = {0, 1, 2, commands.fileno(), results.fileno(), printed, *(fd for c in cgroups for fd in c.fds())}
    keep_only_fds(keep | ({template} if template is not None else set()))
    for cgroup in cgroups:
        cgroup.join()
        cgroup.close_files()
    namespaces = CLONE_NEWPID | enter_namespaces(config["network"], exclude=CLONE_NEWPID, template=template)
    if template is not None:
        os.close(template)
    isolation, workdir = isolate(config, uid, namespaces, None)
    isolation["seccomp"], isolation["uids"] = config["syscall_filter_note"], config["uid_source"]
    prepare_cell_process(config["mark"], workdir, printed)
    holder = Holder(commands, results, printed=printed, cgroups=[], polled=False, config=config, uid=uid,
                    isolation=isolation)  # fmt: skip
    holder.send_ready(isolation)
    holder.serve()


def _session_cgroups(config: dict, hierarchies: list, n: int) -> tuple[list[SessionCgroup], list[str]]:
    """The session's cgroups, one per hierarchy (made before the namespaces: afterwards every mount is
    read-only), and why any could not be made."""
    cgroups, notes = [], []
    for (_, version, controllers), parent in hierarchies:
        try:
            name = f"mathagent-{config['zygote']}-{n}"  # remove_stale_cgroups goes by the zygote's pid
            cgroups.append(SessionCgroup(parent, version, name,
                                         memory=config["memory_mb"] << 20 if "memory" in controllers else None,
                                         cpus=config["cpus"] if "cpu" in controllers else None))  # fmt: skip
        except OSError as e:
            notes.append(f"no {'/'.join(controllers)} cgroup: {e}")
    return cgroups, notes


def _launcher_main(config: dict, session_end: socket.socket, uid: int, n: int) -> None:
    """Between the zygote and the session: enter new namespaces, fork the session into them, wait for it."""
    set_process_name(b"sandbox-launch")
    keep_only_fds({0, 1, 2, session_end.fileno()})
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the zygote died: so do we, and our session after us
    if os.getppid() == 1:
        os._exit(0)
    hierarchies, notes = [], []
    for hierarchy in config["cgroups"]:
        try:
            hierarchies.append((hierarchy, os.open(hierarchy[0], os.O_RDONLY | os.O_DIRECTORY)))
        except OSError as e:
            notes.append(f"no {'/'.join(hierarchy[2])} cgroup: {e}")
    cgroups, more = _session_cgroups(config, hierarchies, n)
    namespaces = enter_namespaces(config["network"])
    workdir = host_workdir(namespaces, uid)  # None where the session gets a private tmpfs
    pid = os.fork()
    if pid == 0:
        try:
            NamespaceSupervisor(config, session_end, uid, namespaces, workdir, cgroups, notes + more).serve()
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    session_end.close()
    for cgroup in cgroups:
        cgroup.close_files()
    os.waitpid(pid, 0)  # S is the init of the session's pid namespace: its processes are gone with it
    for cgroup in cgroups:
        cgroup.remove()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    os._exit(0)
