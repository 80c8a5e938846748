"""Run model-written Python programs (HumanEval/MBPP completions plus their tests) in a sandbox.

``run_program(source, cfg)`` runs one program and says whether it passed (exit status 0), failed
(exception, assertion, nonzero exit, a limit hit), timed out, or could not be run (``error``: the
sandbox itself failed). ``run_many`` does the same for a list of programs on a thread pool.

Two layers. The kernel layer is the boundary; the Python-level guards are a second layer that turns
ordinary misbehaviour into a clear error message.

Kernel layer (``elmkit.eval.bubblewrap``; ``tests/test_sandbox_hostile.py`` attacks each point with
ctypes, re-imported C modules and raw syscalls):

- Namespaces: every program runs under bubblewrap in user, PID, network, IPC, UTS and cgroup
  namespaces of its own, as uid/gid 65534 with no capabilities, no_new_privs and no nested user
  namespaces. The network namespace has only a loopback interface: no connection to the host's
  127.0.0.1 or anywhere else, no DNS.
- Files: a root file system of its own: /usr, the loader's files of /etc and the interpreter's folders
  read-only; private size-limited tmpfs at /box (the working directory, holding program.py), /tmp and
  /dev/shm; fresh /proc and /dev. The caller's home, working tree, temp dir and everything else on the
  host are not there at all, so neither reads nor writes can reach them.
- Processes: PID 1 of the namespace is bwrap's init. After every run (and at the wall-time limit) it
  is SIGKILLed, which makes the kernel kill every process in the namespace (double-forked daemons,
  setsid, ignored SIGTERM, threads outliving the main one), and ``run_program`` returns only once
  PID 1 is gone, which the kernel allows only after all the others. ``max_processes`` caps tasks
  (processes plus threads) through RLIMIT_NPROC, which in the sandbox's own user namespace counts
  only the sandbox's tasks. The sandbox's uid outside is never root: a root caller runs bwrap as a
  fresh unprivileged uid per run (see ``elmkit.eval.bubblewrap``).
- Limits: RLIMIT_AS (``memory_mb``), RLIMIT_CPU (backs up the wall-time limit), RLIMIT_FSIZE (16 MB per
  file), no core dumps; each tmpfs holds 64 MB.

Fail closed: when bwrap is missing or cannot create the namespaces (probed once per process),
``run_program`` and ``run_many`` raise ``SandboxUnavailable`` saying why and how to enable it, unless
``SandboxConfig(allow_weak=True)`` (``elmkit eval --sandbox.allow-weak true``) accepts the risk. Then
the weak sandbox below runs instead, with a one-time RuntimeWarning.

Weak sandbox (no kernel layer): a throw-away directory (``elmkit-sandbox-*`` under the temp dir) and a
fresh ``python -I -B`` in its own session; at the limit and after every run the process group, session
and uid are swept with SIGKILL. The same rlimits. As root, each run drops to a fresh unprivileged uid
(RLIMIT_NPROC and file permissions then hold) in an empty network namespace, when the interpreter is
readable by other users. Native code (ctypes) gets around everything else.

Python-level guards (both modes; installed before the program runs; they stop ordinary code, not a
determined attacker: ``ctypes``, re-importing ``posix``, ``_io.FileIO`` and similar get around them):

- processes: os.fork/forkpty/system/popen/exec*/spawn*/posix_spawn*, subprocess and multiprocessing
  (their common primitive ``_posixsubprocess.fork_exec``), os.setsid/setpgid (leaving the group),
  os.setuid and friends, os.kill/killpg of other processes, raising resource limits; threads beyond
  ``max_processes``.
- files: open/io.open/io.open_code/os.open and the os functions that create, change or delete paths
  (remove, unlink, rmdir, mkdir, rename, replace, link, symlink, chmod, chown, truncate, utime, ...;
  shutil.rmtree/move and pathlib go through them) are refused outside the working directory; reading
  is allowed only there and from Python's own installation (prefixes and sys.path), so imports work.
  Directory listings follow the read rule; os.stat and similar metadata calls are not guarded.
- network: creating a socket (other than wrapping an existing one, e.g. asyncio's socketpair) and
  DNS lookups raise PermissionError.

Not limited: CPU share (use ``workers`` <= cores). A program that calls ``sys.exit(0)`` or
``os._exit(0)`` before its tests run "passes" here; ``elmkit.eval.code`` runs candidates so that
exiting early fails.
"""

from __future__ import annotations

import errno
import functools
import inspect
import itertools
import json
import math
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal

from . import bubblewrap
from .bubblewrap import SandboxUnavailable

__all__ = ["ExecResult", "SandboxConfig", "SandboxUnavailable", "check_available", "run_many", "run_program"]


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one sandboxed program."""

    timeout_s: float = 10.0
    """Wall-time limit per program in seconds; its whole process tree is killed after it."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of the program in MiB."""
    max_processes: int = 16
    """Processes plus threads the program may have (RLIMIT_NPROC in the sandbox's user namespace)."""
    max_output_kb: int = 64
    """KiB of stdout and of stderr kept (the last ones); the rest is dropped while reading."""
    allow_weak: bool = False
    """Accept the risk of running untrusted code without the kernel layer (bubblewrap namespaces) when it
    cannot be set up here: only rlimits and Python-level guards, which native code gets around. Off:
    refuse instead."""

    def __post_init__(self):
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"--timeout-s must be a finite number > 0, got {self.timeout_s!r}")
        for name in ("memory_mb", "max_processes", "max_output_kb"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed program."""

    status: Literal["passed", "failed", "timeout", "error"]
    """failed: exception/nonzero exit/limit hit; timeout: killed at the limit; error: sandbox broke."""
    passed: bool
    """status == "passed"."""
    detail: str
    """Short reason: the last line of stderr, "exit status 3", "timed out after 10.0 s", ..."""
    wall_s: float
    """Seconds from starting the interpreter until it exited or was killed."""


# ---------------------------------------------------------------------------------------------
# Caller side
# ---------------------------------------------------------------------------------------------

_PYTHON = sys.executable  # the caller's interpreter, so packages installed with it (numpy) import
_DETAIL_CHARS = 300
_RUNS = itertools.count()
_warned_no_drop = False
_warned_weak = False


def check_available(cfg: SandboxConfig = SandboxConfig()) -> None:
    """Refuse early: raise SandboxUnavailable when the kernel layer cannot be set up here and ``cfg``
    does not allow the weak sandbox (bwrap is probed once per process)."""
    why = bubblewrap.unavailable()
    if why is not None and not cfg.allow_weak:
        raise SandboxUnavailable(
            f"elmkit sandbox: refusing to run untrusted code without its kernel layer: {why}. To enable "
            f"it, {bubblewrap.HOW_TO_ENABLE}. To accept the risk of rlimits and Python-level guards "
            "alone, pass SandboxConfig(allow_weak=True) (elmkit eval: --sandbox.allow-weak true).")


def run_program(program: str, cfg: SandboxConfig = SandboxConfig()) -> ExecResult:
    """Run one program in the sandbox; never raises for anything the program does.

    Raises:
        SandboxUnavailable: no kernel layer here, and ``cfg.allow_weak`` is False.
    """
    check_available(cfg)
    why = bubblewrap.unavailable()
    if why is None:
        return _run_jailed(program, cfg)
    _warn_weak(why)
    return _run_weak(program, cfg)


def _run_jailed(program: str, cfg: SandboxConfig) -> ExecResult:
    start = time.monotonic()
    proc = pipes = init = None
    try:
        jail = bubblewrap.jail(_PYTHON)
        proc, pipes, init = _spawn_jailed(program, jail, cfg)
        start = time.monotonic()
        timed_out = _wait(proc, pipes, start + cfg.timeout_s)
        wall = time.monotonic() - start
    except Exception as e:
        return ExecResult("error", False, _short(f"sandbox error: {e!r}"), time.monotonic() - start)
    finally:
        if proc is not None:  # every time: the program may have left processes behind
            _kill_jail(proc, init)
            pipes.drain(time.monotonic() + 1.0)
            pipes.close()
            proc.stdout.close()
            proc.stderr.close()
            _reap(proc)
    rc = proc.returncode
    if rc is not None and rc > 128 and (rc - 128) in signal.valid_signals():
        rc = 128 - rc  # bwrap exits with 128 + N when the program died of signal N
    return _verdict(rc, pipes, timed_out, wall, cfg, jailed=True)


def _spawn_jailed(program: str, jail: bubblewrap.Jail,
                  cfg: SandboxConfig) -> tuple[subprocess.Popen, _Pipes, int | None]:
    """Start bwrap; returns it, its output pipes and a pidfd of the sandbox's PID 1 (None when it is
    already gone or unknown)."""
    report_r, report_w = os.pipe()  # see _spawn
    info_r, info_w = os.pipe()  # bwrap writes the host pid of the sandbox's PID 1 here
    source = os.memfd_create("program.py")  # copied to /box/program.py by bwrap
    try:
        with open(source, "wb", closefd=False) as f:
            f.write(program.encode("utf-8", "surrogateescape"))
        os.lseek(source, 0, os.SEEK_SET)
        args = ["/box", -1, cfg.timeout_s, cfg.memory_mb, cfg.max_processes, report_w, 1]
        argv = [jail.python, "-I", "-B", "-c", _bootstrap_source(), *map(str, args)]
        uid = bubblewrap.fresh_uid() if jail.own_uid else None
        marker = f"elmkit-sandbox-{os.getpid()}-{next(_RUNS)}"  # finds a run's processes in /proc
        proc = subprocess.Popen(
            bubblewrap.command(jail, source, info_w, argv, uid), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(report_w, info_w, source),
            env=_environment("/box", "/tmp", marker), start_new_session=True,
            **bubblewrap.popen_user(jail, uid),
        )
    except BaseException:
        os.close(report_r)
        os.close(info_r)
        raise
    finally:
        for fd in (report_w, info_w, source):
            os.close(fd)
    try:
        init = _sandbox_init(info_r, time.monotonic() + max(cfg.timeout_s, 10.0))
        fds = {"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno(), "report": report_r}
        pipes = _Pipes(fds, cfg.max_output_kb * 1024, _pidfd(proc.pid), close_also=(report_r,))
        return proc, pipes, init
    except BaseException:  # not handed to the caller's cleanup yet: clean up here
        _kill_jail(proc, None)
        _reap(proc)
        os.close(report_r)
        raise
    finally:
        os.close(info_r)


def _sandbox_init(info_fd: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's PID 1, from bwrap's --info-fd JSON; None when bwrap failed first or
    PID 1 has already exited (then so has everything else in its namespace)."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([info_fd], [], [], left)[0]:
            return None
        chunk = os.read(info_fd, 4096)
        if not chunk:
            return None
        data += chunk
        try:
            info = json.loads(data)
            break
        except ValueError:
            continue
    pid = info["child-pid"]
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:  # the pid is still the sandbox's PID 1, not a process that reused the number
        if os.stat(f"/proc/{pid}/ns/pid").st_ino == info["pid-namespace"]:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _kill_jail(proc: subprocess.Popen, init: int | None) -> None:
    """SIGKILL the sandbox's PID 1, whose death makes the kernel kill everything in its PID namespace,
    and bwrap; then wait until PID 1 has exited, which the kernel lets happen only after the rest."""
    if init is not None:
        try:
            signal.pidfd_send_signal(init, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap (--die-with-parent takes PID 1 along as well)
    except OSError:
        pass
    if init is not None:
        gone = select.select([init], [], [], 10.0)[0]  # a pidfd reads ready once its process exited
        os.close(init)
        if not gone:
            warnings.warn("elmkit sandbox: the sandbox's PID 1 did not exit within 10 s of SIGKILL",
                          RuntimeWarning, stacklevel=3)


def _environment(home: str, tmp: str, marker: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": tmp, "LANG": "C.UTF-8",
        # One BLAS/OpenMP thread: parallel programs share the cores, and threads count as tasks.
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        # glibc reserves 64 MB of address space per thread for malloc arenas; under RLIMIT_AS a
        # handful of threads would exhaust the limit without this.
        "MALLOC_ARENA_MAX": "2",
        "ELMKIT_SANDBOX": marker,
    }


def _warn_weak(why: str) -> None:
    global _warned_weak
    if not _warned_weak:
        _warned_weak = True
        warnings.warn(
            f"elmkit sandbox: running programs WITHOUT the kernel layer (allow_weak=True): {why}. Only "
            "rlimits and Python-level guards hold, which native code (ctypes) gets around: a hostile "
            "program can read and write the caller's files, use the network and leave processes behind.",
            RuntimeWarning, stacklevel=3,
        )


def _run_weak(program: str, cfg: SandboxConfig) -> ExecResult:
    """The sandbox without its kernel layer (see the module docstring)."""
    start = time.monotonic()
    uid = bubblewrap.fresh_uid() if os.geteuid() == 0 else -1
    box = proc = pipes = None
    try:
        box = _make_box(program, uid)
        proc, pipes = _spawn(box, uid, cfg)
        start = time.monotonic()
        timed_out = _wait(proc, pipes, start + cfg.timeout_s)
        wall = time.monotonic() - start
    except Exception as e:
        return ExecResult("error", False, _short(f"sandbox error: {e!r}"), time.monotonic() - start)
    finally:
        # Every time, not only after a timeout: the program may have left children behind.
        if proc is not None:
            _kill_all(proc.pid, uid, box)
            if pipes is not None:
                pipes.drain(time.monotonic() + 1.0)  # the writers are dead: this is quick
                pipes.close()
            proc.stdout.close()
            proc.stderr.close()
            _reap(proc)
        if box is not None:
            _remove_tree(box)
    return _verdict(proc.returncode, pipes, timed_out, wall, cfg, jailed=False)


def run_many(
    programs: Sequence[str],
    cfg: SandboxConfig = SandboxConfig(),
    workers: int = 2,
    progress: bool = True,
) -> list[ExecResult]:
    """Run programs on ``workers`` threads (each drives one sandboxed process); results in input order."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be > 0, got {workers!r}")
    check_available(cfg)
    results: list[ExecResult | None] = [None] * len(programs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
    try:
        futures = {pool.submit(run_program, p, cfg): i for i, p in enumerate(programs)}
        with tqdm(total=len(programs), desc="sandbox", unit="prog", disable=not progress) as bar:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, do not start the queued ones
    return results  # type: ignore[return-value]


def _make_box(program: str, uid: int) -> str:
    box = tempfile.mkdtemp(prefix="elmkit-sandbox-")
    path = os.path.join(box, "program.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(program)
    os.chmod(path, 0o644)  # readable for tracebacks after the uid drop
    if uid >= 0:
        os.chown(box, uid, uid)  # the program may write here, and nowhere else the caller owns
    return box


def _spawn(box: str, uid: int, cfg: SandboxConfig) -> tuple[subprocess.Popen, _Pipes]:
    # The bootstrap reports "ready ..." on its own pipe once the layers are in place, then closes
    # it before the program runs: a program cannot fake a sandbox error, nor hide one.
    report_r, report_w = os.pipe()
    try:
        args = [box, uid, cfg.timeout_s, cfg.memory_mb, cfg.max_processes, report_w, 0]
        proc = subprocess.Popen(
            [_PYTHON, "-I", "-B", "-c", _bootstrap_source(), *map(str, args)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(report_w,), cwd=box, env=_environment(box, box, box), start_new_session=True,
        )
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    try:
        fds = {"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno(), "report": report_r}
        return proc, _Pipes(fds, cfg.max_output_kb * 1024, _pidfd(proc.pid), close_also=(report_r,))
    except BaseException:  # not handed to the caller's cleanup yet: clean up here
        _kill_all(proc.pid, uid, box)
        _reap(proc)
        os.close(report_r)
        raise


class _Pipes:
    """The child's output pipes, read without blocking; keeps only the last ``limit`` bytes of each,
    so a program printing in a loop cannot fill the caller's memory."""

    def __init__(self, fds: dict[str, int], limit: int, pidfd: int | None, close_also=()):
        self.data = {name: bytearray() for name in fds}
        self.limit = limit
        self.pidfd = pidfd
        self.owned = [*close_also] + ([pidfd] if pidfd is not None else [])
        self.sel = selectors.DefaultSelector()
        for name, fd in fds.items():
            self.sel.register(fd, selectors.EVENT_READ, name)
        if pidfd is not None:  # becomes readable when the process exits: wakes select() at once
            self.sel.register(pidfd, selectors.EVENT_READ, None)

    def text(self, name: str) -> str:
        return self.data[name].decode("utf-8", "replace")

    def read(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                continue
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                self.sel.unregister(key.fd)
                continue
            buf = self.data[key.data]
            buf += chunk
            del buf[: -self.limit]

    def drain(self, deadline: float) -> None:
        """Read until every pipe is closed (all writers gone) or the deadline."""
        if self.pidfd is not None:
            self.sel.unregister(self.pidfd)
            self.pidfd = None
        while self.sel.get_map() and time.monotonic() < deadline:
            self.read(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.sel.close()
        for fd in self.owned:
            os.close(fd)
        self.owned = []


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # Linux >= 5.3
    except (AttributeError, OSError):
        return None


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it: while it is an unreaped zombie its pid,
    which is also its process group and session id, cannot be reused by an unrelated process."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _wait(proc: subprocess.Popen, pipes: _Pipes, deadline: float) -> bool:
    """Read output until the program exits (False) or the deadline passes (True)."""
    tick = 0.05 if pipes.pidfd is not None else 0.005  # without a pidfd, poll for the exit
    while not _exited(proc.pid):
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        pipes.read(min(left, tick))
    return False


def _kill_all(pid: int, uid: int, box: str) -> None:
    """SIGKILL the program's process group, then any process left of the run (see _survivors)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for _ in range(400):  # SIGKILLed processes take a moment to disappear
        left = _survivors(uid, pid, box)
        if not left:
            return
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)
    warnings.warn(f"elmkit sandbox: could not kill processes {left}", RuntimeWarning, stacklevel=3)


def _survivors(uid: int, sid: int, box: str) -> list[int]:
    """Live (non-zombie) processes of the run: in its session ``sid``, running as its own ``uid``, or
    running as the caller with the sandbox dir in their environment (HOME/TMPDIR, kept across fork and
    exec). The last two find processes that native code moved to a session of their own."""
    me, marker, found = os.geteuid(), os.fsencode(box), []
    try:
        names = os.listdir("/proc")
    except OSError:  # no procfs: only the process-group kill applies
        return found
    for name in names:
        if not name.isdigit():
            continue
        status = _proc_status(name)
        if not status or status["State"].startswith(("Z", "X")):
            continue
        try:
            in_session = os.getsid(int(name)) == sid
        except OSError:
            continue
        proc_uid = int(status["Uid"].split()[0])
        if in_session or proc_uid == uid or (proc_uid == me and marker in _environ(name)):
            found.append(int(name))
    return found


def _environ(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # stuck in the kernel; Popen reaps it later
        pass


def _remove_tree(path: str) -> None:
    """Delete the sandbox dir even where the program took permissions away (matters for non-root)."""
    try:
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                p = os.path.join(root, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        warnings.warn(f"elmkit sandbox: could not remove {path}", RuntimeWarning, stacklevel=3)


def _verdict(rc: int | None, pipes: _Pipes, timed_out: bool, wall: float, cfg: SandboxConfig,
             jailed: bool) -> ExecResult:
    report = pipes.text("report").split(maxsplit=3)
    lines = [line.strip() for line in pipes.text("stderr").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if not report or report[0] != "ready":
        return ExecResult("error", False, _short(f"sandbox setup failed: {last or f'exit {rc}'}"), wall)
    if not jailed and os.geteuid() == 0 and report[1] == "0":
        _warn_no_drop(report[3] if len(report) > 3 else "")
    if timed_out:
        return ExecResult("timeout", False, f"timed out after {float(cfg.timeout_s)} s", wall)
    if rc is None:  # could not be reaped (see _reap)
        rc = -signal.SIGKILL
    if rc == 0:
        return ExecResult("passed", True, "exit status 0", wall)
    if rc < 0:
        why = {
            signal.SIGXCPU: "CPU time limit",
            signal.SIGKILL: "probably out of memory",
            signal.SIGSEGV: "crash: stack overflow or memory limit",
            signal.SIGABRT: "aborted: often the memory limit",
        }.get(-rc, "")
        detail = f"killed by {signal.Signals(-rc).name}" + (f" ({why})" if why else "")
    elif last.startswith("MemoryError"):
        detail = f"{last} (memory limit {cfg.memory_mb} MB)"
    else:
        detail = last or f"exit status {rc}"
    return ExecResult("failed", False, _short(detail), wall)


def _warn_no_drop(reason: str) -> None:
    global _warned_no_drop
    if not _warned_no_drop:
        _warned_no_drop = True
        warnings.warn(
            "elmkit sandbox: running as root, but programs could not switch to an unprivileged uid "
            f"({reason}); they run as root without RLIMIT_NPROC and file-permission protection. "
            "Use a Python installed in a world-readable place (e.g. /usr or /opt) to get this layer.",
            RuntimeWarning, stacklevel=4,
        )


def _short(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


@functools.cache
def _bootstrap_source() -> str:
    """The code the sandboxed interpreter runs (``-c``): the functions below, then ``_child_main``."""
    parts = [inspect.getsource(f) for f in (
        _proc_status, _set_limits, _kernel_isolation, _drop_privileges,
        _guard_processes, _guard_network, _guard_files, _child_main,
    )]
    head = "from __future__ import annotations\nimport errno, os, sys"
    return "\n\n".join([head, *parts, "_child_main(sys.argv[1:])\n"])


# ---------------------------------------------------------------------------------------------
# Sandbox side: these functions run inside the sandboxed interpreter, which receives their source
# (so it does not import elmkit). They may use only os, sys, errno and what they import themselves.
# ---------------------------------------------------------------------------------------------


def _proc_status(pid: str) -> dict[str, str]:
    """Fields of /proc/<pid>/status, {} when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


def _child_main(argv: list[str]) -> None:
    """Build the layers, report on the report pipe, then run program.py as __main__."""
    box, uid, timeout_s, memory_mb, max_processes, report_fd, jailed = argv
    uid, memory_mb, max_processes, report_fd = int(uid), int(memory_mb), int(max_processes), int(report_fd)
    jailed = jailed == "1"  # under bwrap: in a user namespace of its own
    try:
        os.chdir(box)
        with open("program.py", encoding="utf-8") as f:
            source = f.read()
        netns = _kernel_isolation()
        dropped, why = _drop_privileges(uid, box) if os.geteuid() == 0 and uid >= 0 else (False, "not root")
        # In the jail RLIMIT_NPROC counts only the namespace's tasks, bwrap's init among them.
        _set_limits(float(timeout_s), memory_mb, max_processes + jailed, dropped or jailed)
        _guard_processes(max_processes)
        _guard_network()
        _guard_files(box)
    except Exception as e:
        sys.stderr.write(f"{e!r}\n")
        os._exit(1)
    os.write(report_fd, f"ready {int(dropped)} {int(netns)} {why}\n".encode())
    os.close(report_fd)

    sys.argv = ["program.py"]
    main = type(sys)("__main__")  # a fresh module, so pickle/dataclasses see the program's __main__
    main.__file__ = "program.py"
    sys.modules["__main__"] = main
    exec(compile(source, "program.py", "exec"), main.__dict__)


def _kernel_isolation() -> bool:
    """no_new_privs (setuid binaries grant nothing) and, as root, an empty network namespace: no
    interface but a down loopback. Best effort; returns whether the namespace was made."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except Exception:
        libc = None
    if os.geteuid() != 0:
        return False
    if hasattr(os, "unshare"):  # Python >= 3.12
        try:
            os.unshare(os.CLONE_NEWNET)
            return True
        except OSError:
            return False
    return libc is not None and libc.unshare(0x40000000) == 0  # CLONE_NEWNET


def _drop_privileges(uid: int, box: str) -> tuple[bool, str]:
    """Switch to the run's own uid/gid, if the interpreter stays readable under it.

    Probed first by switching only the effective ids, which is reversible (the saved uid stays 0):
    a Python under a private home (/root/.pyenv, mode 0700) could import nothing after the switch.
    """
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    needed = [box] + [p for p in sys.path if p.startswith(prefixes) and os.path.isdir(p)]
    os.setgroups([])
    why = ""
    try:
        os.setegid(uid)
        os.seteuid(uid)
        for path in needed:
            why = path
            os.listdir(path)
        why = ""
    except OSError as e:
        why = f"{why or 'setuid'}: {e.strerror}"
    finally:
        os.seteuid(0)
        os.setegid(0)
    if why:
        return False, why
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    return True, ""


def _set_limits(timeout_s: float, memory_mb: int, max_processes: int, own_uid: bool) -> None:
    import math
    import resource

    def limit(res: int, soft: int, hard: int | None = None) -> None:
        hard = soft if hard is None else hard
        current = resource.getrlimit(res)[1]
        if current != resource.RLIM_INFINITY:  # never above an existing hard limit (fails unprivileged)
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(res, (soft, hard))

    limit(resource.RLIMIT_AS, memory_mb << 20)
    cpu = math.ceil(timeout_s) + 1  # the wall-time kill comes first; this catches a stuck parent
    limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    limit(resource.RLIMIT_FSIZE, 16 << 20)
    limit(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts all tasks (threads too) of the real uid, and root ignores it.
    if own_uid:
        limit(resource.RLIMIT_NPROC, max_processes)
    elif os.geteuid() != 0:
        me = os.getuid()
        tasks = sum(
            int(st["Threads"]) for st in map(_proc_status, os.listdir("/proc"))
            if st and "Threads" in st and int(st["Uid"].split()[0]) == me
        )
        limit(resource.RLIMIT_NPROC, tasks + max_processes)


def _guard_processes(max_processes: int) -> None:
    """No new processes, no leaving the process group, no signals to others, no raised limits, and
    at most ``max_processes`` threads (main thread included)."""
    import _posixsubprocess
    import _thread
    import posix
    import resource

    def refuse(name: str):
        def refused(*args, **kwargs):
            raise PermissionError(errno.EPERM, f"sandbox: {name} is not allowed")
        return refused

    names = ["fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "setsid", "setpgid",
             "setpgrp", "killpg", "plock", "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid",
             "setregid", "setresgid", "setgroups"]
    names += [n for n in dir(os) if n.startswith(("exec", "spawn"))]
    for name in names:
        for mod in (os, posix):  # posix is os's C twin; `import posix; posix.fork()` is just as easy
            if hasattr(mod, name):
                setattr(mod, name, refuse(f"os.{name}"))
    # subprocess and multiprocessing (spawn/forkserver) start processes through this one function.
    _posixsubprocess.fork_exec = refuse("starting a subprocess")

    real_kill = os.kill

    def kill(pid, sig):
        if pid != os.getpid():
            raise PermissionError(errno.EPERM, "sandbox: signals to other processes are not allowed")
        return real_kill(pid, sig)

    os.kill = posix.kill = kill

    real_setrlimit = resource.setrlimit

    def setrlimit(res, limits):
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY and any(v == resource.RLIM_INFINITY or v > hard for v in limits):
            raise ValueError("sandbox: raising a resource limit is not allowed")
        return real_setrlimit(res, limits)

    resource.setrlimit = setrlimit
    resource.prlimit = refuse("resource.prlimit")

    count = getattr(_thread, "_count", None)  # running threads besides the main one

    def capped(start):
        def start_thread(*args, **kwargs):
            if count is not None and count() + 1 >= max_processes:
                raise RuntimeError(f"sandbox: at most {max_processes} threads (main included)")
            return start(*args, **kwargs)
        return start_thread

    # threading binds these when it is imported, which happens after this point.
    for name in ("start_new_thread", "start_new", "start_joinable_thread"):
        if hasattr(_thread, name):
            setattr(_thread, name, capped(getattr(_thread, name)))


def _guard_network() -> None:
    """No new sockets (wrapping an existing fd stays allowed: socketpair, asyncio) and no DNS."""
    import _socket

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "sandbox: network access is not allowed")

    class Socket(_socket.socket):
        __slots__ = ()  # socket.socket, which subclasses this, adds its own __weakref__ slot

        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                refused()
            super().__init__(family, type, proto, fileno)

    # socket.py subclasses _socket.socket when it is imported, which happens after this point.
    _socket.socket = _socket.SocketType = Socket
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        setattr(_socket, name, refused)


def _guard_files(box: str) -> None:
    """Writes only inside ``box``; reads only there and from Python's installation."""
    import builtins
    import io
    import posix

    box = os.path.realpath(box)
    installed = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path}
    installed = {os.path.realpath(p) for p in installed if p and p != "/"}
    readable = (box, "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/usr/share/zoneinfo",
                *installed)
    writable = (box, "/dev/null")

    def allowed(path, write: bool, dir_fd=None) -> bool:
        if isinstance(path, int):  # a file descriptor: where it points to
            path, dir_fd = f"/proc/self/fd/{path}", None
        try:
            path = os.fsdecode(path)
        except TypeError:
            return True  # not a path at all: the real function raises its own error
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.path.realpath(f"/proc/self/fd/{dir_fd}"), path)
        # Both with every symlink followed (what open() reaches) and with only the parent resolved
        # (what unlink/rename act on), so a symlink leads neither out of the box nor into it.
        full = os.path.realpath(path)
        path = os.path.abspath(path)
        parent = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        tops = writable if write else readable
        return all(any(p == t or p.startswith(t.rstrip("/") + "/") for t in tops) for p in (full, parent))

    def check(path, write: bool, dir_fd=None) -> None:
        if not allowed(path, write, dir_fd):
            what = "writing" if write else "reading"
            message = f"sandbox: {what} outside the sandbox directory is not allowed"
            shown = path if isinstance(path, (str, bytes)) else str(path)
            raise PermissionError(errno.EACCES, message, shown)

    real_open, real_open_code, real_os_open = builtins.open, io.open_code, os.open

    def open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int):
            check(file, isinstance(mode, str) and any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def open_code(path):
        check(path, False)
        return real_open_code(path)

    def os_open(path, flags, *args, **kwargs):
        write = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        check(path, bool(write), kwargs.get("dir_fd"))
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = open
    io.open_code = open_code
    os.open = posix.open = os_open

    def guard(func, write: bool, params, default=None):
        """``func`` with its path arguments checked; params: (position, keyword, dir_fd keyword)."""
        def guarded(*args, **kwargs):
            for pos, key, dir_key in params:
                path = args[pos] if len(args) > pos else kwargs.get(key, default)
                if path is not None:
                    check(path, write, kwargs.get(dir_key) if dir_key else None)
            return func(*args, **kwargs)
        return guarded

    one = ((0, "path", "dir_fd"),)
    two = ((0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
    writes = {name: one for name in ("remove", "unlink", "rmdir", "mkdir", "mkfifo", "mknod", "chmod",
                                     "lchmod", "chown", "lchown", "utime", "truncate", "setxattr",
                                     "removexattr", "chroot")}
    writes |= {"rename": two, "replace": two, "link": two, "symlink": ((1, "dst", "dir_fd"),),
               "fchmod": ((0, "fd", None),), "fchown": ((0, "fd", None),)}
    for name, params in writes.items():
        if hasattr(os, name):
            os_func = guard(getattr(os, name), True, params)
            setattr(os, name, os_func)
            setattr(posix, name, os_func)
    for name in ("listdir", "scandir"):
        os_func = guard(getattr(os, name), False, one, default=".")
        setattr(os, name, os_func)
        setattr(posix, name, os_func)
