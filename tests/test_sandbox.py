"""The code-execution sandbox: ordinary outcomes first, then each containment layer.

Every test runs twice (autouse fixture ``layer``): under the kernel layer (bubblewrap; skipped where it
is unavailable) and in the weak sandbox that ``allow_weak`` falls back to. Every test also checks
(autouse fixture) that nothing is left behind: no process that carries a sandbox marker in its command
line or environment, and no sandbox dir in the temp dir. Attacks that get past the Python-level guards
are in test_sandbox_hostile.py.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings

import pytest

from elmkit.eval import bubblewrap, sandbox
from elmkit.eval.sandbox import ExecResult, SandboxConfig, run_many, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox (/proc, rlimits)")

FAST = SandboxConfig(timeout_s=2.0, memory_mb=256)
MARK = b"elmkit-sandbox-"  # in the environment (ELMKIT_SANDBOX) of every sandbox process


def sandbox_processes() -> list[int]:
    """Live processes that belong to some sandbox run."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            data = b""
            for part in ("cmdline", "environ"):
                with open(f"/proc/{name}/{part}", "rb") as f:
                    data += f.read()
        except (OSError, IndexError):
            continue
        if MARK in data:
            found.append(int(name))
    return found


def sandbox_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "elmkit-sandbox-*")))


@pytest.fixture(autouse=True, params=["kernel", "weak"])
def layer(request, monkeypatch) -> str:
    """Which sandbox the test's programs run in: the kernel layer, or the weak one (forced)."""
    if request.param == "kernel":
        why = bubblewrap.unavailable()
        if why is not None:
            pytest.skip(f"the kernel layer is unavailable here: {why}")
    else:
        monkeypatch.setattr(bubblewrap, "unavailable", lambda: "turned off by the test")
        monkeypatch.setattr(sandbox, "check_available", lambda cfg=None: None)
    return request.param


@pytest.fixture(autouse=True)
def leaves_nothing_behind(layer):
    dirs = sandbox_dirs()
    assert not sandbox_processes(), "a sandbox process was running before the test"
    yield
    left = sandbox_processes()
    for pid in left:  # do not let one failure spill into the next tests
        os.kill(pid, 9)
    assert not left, f"sandbox processes survived: {left}"
    assert sandbox_dirs() <= dirs, "a sandbox dir was not removed"


def run(program: str, cfg: SandboxConfig = FAST) -> ExecResult:
    with warnings.catch_warnings():  # the one-time "running as root without uid drop" warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return run_program(program, cfg)


_DROP_PYTHON = []


def drop_python() -> str | None:
    """An interpreter with which weak-sandbox programs do switch to their own uid (needs root and a
    Python whose files other users can read), or None. Found once."""
    if _DROP_PYTHON:
        return _DROP_PYTHON[0]
    found = None
    for cand in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if os.geteuid() != 0 or not cand or not os.path.exists(cand):
            continue
        ok = subprocess.run([cand, "-c", "import sys; assert sys.version_info >= (3, 10)"]).returncode == 0
        saved, sandbox._PYTHON = sandbox._PYTHON, cand
        try:
            if ok and run("import os\nassert os.getuid() != 0 and os.getgid() != 0").passed:
                found = cand
                break
        finally:
            sandbox._PYTHON = saved
    _DROP_PYTHON.append(found)
    return found


@pytest.fixture
def dropped(monkeypatch, layer):
    """Programs run with the kernel enforcing the limits: always under the kernel layer; in the weak
    sandbox only under their own uid (root and a Python readable by other users), else skip."""
    if layer == "kernel":
        return
    python = drop_python()
    if python is None:
        pytest.skip("needs root and a Python readable by other users to drop privileges")
    monkeypatch.setattr(sandbox, "_PYTHON", python)


# ---------------------------------------------------------------------------------------------
# API and ordinary outcomes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, flag", [("timeout_s", "--timeout-s"), ("memory_mb", "--memory-mb"),
                                         ("max_processes", "--max-processes"),
                                         ("max_output_kb", "--max-output-kb")])
def test_config_validation(field, flag):
    for bad in (0, -1):
        with pytest.raises(ValueError, match=flag):
            SandboxConfig(**{field: bad})
    with pytest.raises(ValueError, match="--timeout-s"):
        SandboxConfig(timeout_s=float("inf"))
    with pytest.raises(ValueError, match="workers"):
        run_many(["pass"], workers=0)


def test_config_fields_have_docs():
    from elmkit.cli import field_docs

    docs = field_docs(SandboxConfig)
    assert set(docs) == {"timeout_s", "memory_mb", "max_processes", "max_output_kb", "allow_weak"}
    assert all(docs.values())


def test_passing_program():
    r = run("print('hello')\nassert sum(range(4)) == 6")
    assert r == ExecResult("passed", True, r.detail, r.wall_s)
    assert 0 < r.wall_s < 2


@pytest.mark.parametrize("program, detail", [
    ("assert False", "AssertionError"),
    ("def f(x):\n    return x\nassert f(1) == 2, 'f(1) should be 2'", "AssertionError: f(1) should be 2"),
    ("import sys\nsys.exit(3)", "exit status 3"),
    ("def f(:\n    pass", "SyntaxError"),
    ("def f(n):\n    return f(n + 1)\nf(0)", "RecursionError"),
    ("raise ValueError('boom')", "ValueError: boom"),
    ("input()", "EOFError"),  # stdin is /dev/null
])
def test_failing_programs(program, detail):
    r = run(program)
    assert (r.status, r.passed) == ("failed", False)
    assert detail in r.detail


def test_stdlib_imports_work():
    r = run("import collections, math, re, itertools, heapq, functools, string, json, random, statistics, "
            "fractions, bisect, datetime, typing, copy, operator, decimal\n"
            "assert math.comb(5, 2) == 10 and json.loads('[1]') == [1]", SandboxConfig(timeout_s=10))
    assert r.passed, r.detail


def test_numpy_imports_with_default_limits():
    pytest.importorskip("numpy")
    r = run("import numpy as np\nassert np.arange(5).sum() == 10", SandboxConfig(timeout_s=20))
    assert r.passed, r.detail


def test_program_can_use_its_own_directory():
    program = """
import os, tempfile, asyncio
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor

with open("out.txt", "w") as f:
    f.write("data")
assert open("out.txt").read() == "data"
os.makedirs("a/b")
os.rename("out.txt", "a/b/moved.txt")
with tempfile.TemporaryDirectory() as d:  # TMPDIR is the sandbox dir
    open(os.path.join(d, "t"), "w").close()

@dataclass
class Point:  # needs a real __main__ module
    x: int

assert Point(1).x == 1
with ThreadPoolExecutor(4) as ex:  # a few threads are fine
    assert sum(ex.map(abs, range(-5, 5))) == 25

async def main():
    return 3

assert asyncio.run(main()) == 3  # uses a socketpair internally
assert os.path.expanduser("~") == os.getcwd()
"""
    r = run(program, SandboxConfig(timeout_s=10))
    assert r.passed, r.detail


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("ELMKIT_TEST_SECRET", "s3cr3t-env")
    r = run("import os\nraise SystemExit(os.environ.get('ELMKIT_TEST_SECRET', 'absent'))")
    assert r.status == "failed" and r.detail == "absent"


def test_output_is_bounded_and_the_last_error_line_kept():
    program = "import sys\nprint('x' * 20_000_000)\nsys.stderr.write('y' * 5_000_000 + '\\n')\n" \
              "raise KeyError('k')"
    r = run(program, SandboxConfig(timeout_s=10, max_output_kb=4))
    assert r.status == "failed" and r.detail == "KeyError: 'k'"


def test_run_many_keeps_order():
    # Later programs finish first; each names itself in its exit message.
    programs = [f"import time\ntime.sleep({(5 - i) * 0.05})\nraise SystemExit('prog {i}')" for i in range(6)]
    programs.append("pass")
    results = run_many(programs, FAST, workers=2, progress=False)
    assert [r.detail for r in results[:6]] == [f"prog {i}" for i in range(6)]
    assert results[6].passed and len(results) == 7


def test_run_many_runs_in_parallel():
    start = time.monotonic()
    results = run_many(["import time\ntime.sleep(1)"] * 2, FAST, workers=2, progress=False)
    assert all(r.passed for r in results)
    assert time.monotonic() - start < 1.9


def test_sandbox_failure_is_an_error_not_an_exception(monkeypatch):
    monkeypatch.setattr(sandbox, "_PYTHON", "/nonexistent/python")
    r = run("print(1)")
    assert (r.status, r.passed) == ("error", False) and "sandbox error" in r.detail


def test_exit_before_the_sandbox_is_ready_is_an_error(monkeypatch):
    # Exit status 0 without the bootstrap's "ready" report must not count as a pass.
    monkeypatch.setattr(sandbox, "_bootstrap_source", lambda: "import sys\nsys.exit(0)")
    r = run("print(1)")
    assert (r.status, r.passed) == ("error", False)


# ---------------------------------------------------------------------------------------------
# 1. Time
# ---------------------------------------------------------------------------------------------


def test_infinite_loop_times_out():
    r = run("while True:\n    pass")
    assert (r.status, r.passed, r.detail) == ("timeout", False, "timed out after 2.0 s")
    assert 1.9 < r.wall_s < 3


def test_timeout_kills_forked_children_too():
    # ctypes forks behind the Python-level guard: the group/session kill still gets the child.
    r = run("import ctypes\nctypes.CDLL(None).fork()\nwhile True:\n    pass")
    assert r.status == "timeout"


def test_child_that_starts_its_own_session_is_killed():
    # The program exits 0 at once, leaving a child in a new session: the cleanup still finds it
    # (by the run's uid, or by the sandbox dir in its environment). Checked by the autouse fixture.
    program = "import ctypes, time\nlibc = ctypes.CDLL(None)\nif libc.fork() == 0:\n    libc.setsid()\n" \
              "    time.sleep(60)\n"
    r = run(program)
    assert r.passed


# ---------------------------------------------------------------------------------------------
# 2. Processes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()",
    "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()",
    "import multiprocessing as mp\nmp.set_start_method('spawn')\nmp.Process(target=print).start()",
    "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])",
    "import subprocess\nsubprocess.run('sleep 100 &', shell=True)",
    "import os\nos.system('sleep 100 &')",
    "import os\nos.posix_spawn('/bin/sleep', ['sleep', '100'], {})",
    "import os\nos.execv('/bin/sleep', ['sleep', '100'])",
    "import pty\npty.fork()",
    "import os\nos.setsid()",
    "import os\nos.kill(1, 0)",
    "import threading, time\nfor _ in range(100):\n"
    "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
])
def test_process_creation_and_escape_are_refused(program):
    r = run(program)
    assert r.status == "failed"
    assert "not allowed" in r.detail or "at most" in r.detail, r.detail


def test_native_fork_bomb_is_capped(dropped):
    # Past the Python guard; RLIMIT_NPROC of the run's own uid stops it, the uid sweep cleans up.
    r = run("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()")
    assert r.status == "timeout"


def test_threads_are_capped_by_the_kernel_too(dropped):
    # Digs the real start function out of the guard's closure; RLIMIT_NPROC still says no.
    program = """
import _thread, time
cells = [c.cell_contents for c in _thread.start_new_thread.__closure__]
start = next(c for c in cells if getattr(c, "__name__", "") == "start_new_thread")
for _ in range(40):
    start(time.sleep, (3,))
"""
    r = run(program, SandboxConfig(timeout_s=2.0, memory_mb=256, max_processes=8))
    assert r.status == "failed" and "can't start new thread" in r.detail, r.detail


# ---------------------------------------------------------------------------------------------
# 3. Memory
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", [
    "x = bytearray(10**11)",
    "x = []\nwhile True:\n    x.append(bytearray(10**7))",
])
def test_memory_limit(program):
    r = run(program)
    assert r.status == "failed"
    assert "memory" in r.detail.lower(), r.detail


# ---------------------------------------------------------------------------------------------
# 4. Network
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", [
    "import socket\ns = socket.socket()\ns.connect(('8.8.8.8', 53))",
    "import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=1)",
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))",
    "import socket\nsocket.getaddrinfo('example.com', 80)",
    "import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=1)",
])
def test_network_is_refused(program):
    r = run(program)
    assert r.status == "failed"
    assert "network access is not allowed" in r.detail, r.detail


def test_raw_socket_past_the_guard_still_fails():
    # The C socket type itself: the guard is bypassed; the empty network namespace (root) or the
    # missing network (CI) makes it fail anyway. Never passes, never hangs past the limit.
    r = run("import _socket\ns = _socket.socket.__mro__[1](2, 1, 0)\ns.settimeout(1)\n"
            "s.connect(('8.8.8.8', 53))")
    assert r.status in ("failed", "timeout")


# ---------------------------------------------------------------------------------------------
# 5. Writing outside the sandbox dir
# ---------------------------------------------------------------------------------------------

WRITES = [
    "import os\nos.remove(KEEP)",
    "import os\nos.unlink(KEEP)",
    "import pathlib\npathlib.Path(KEEP).unlink()",
    "open(NEW, 'w').write('x')",
    "open(KEEP, 'a').write('x')",
    "open(KEEP, 'r+').write('x')",
    "import pathlib\npathlib.Path(NEW).write_text('x')",
    "import os\nos.close(os.open(NEW, os.O_WRONLY | os.O_CREAT))",
    "import shutil\nshutil.rmtree(DIR)",
    "import os\nos.rename(KEEP, NEW)",
    "import shutil\nshutil.move(KEEP, 'here.txt')",
    "import shutil\nshutil.copy('program.py', NEW)",
    "import os\nos.chmod(KEEP, 0)",
    "import os\nos.truncate(KEEP, 0)",
    "import os\nos.mkdir(NEW)",
    "import os\nos.symlink(KEEP, 'link')\nopen('link', 'w').write('x')",
    "import os\nos.symlink('program.py', NEW)",
]


@pytest.mark.parametrize("program", WRITES)
def test_files_outside_cannot_be_changed(program, tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("original")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inner.txt").write_text("inner")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    mode = keep.stat().st_mode
    head = f"KEEP, NEW, DIR = {str(keep)!r}, {str(tmp_path / 'new.txt')!r}, {str(tmp_path / 'dir')!r}\n"
    r = run(head + program)
    assert r.status == "failed"
    assert "not allowed" in r.detail or "Permission denied" in r.detail, r.detail
    assert keep.read_text() == "original" and keep.stat().st_mode == mode
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_kernel_protects_files_when_the_guard_is_bypassed(dropped, tmp_path):
    # _io.open is the C function behind open(): the Python guard does not see it. As its own uid
    # (weak sandbox), the program still cannot write into the caller's private directory; under the
    # kernel layer the directory does not even exist in the program's file system.
    os.chmod(tmp_path, 0o700)
    r = run(f"import _io\n_io.open({str(tmp_path / 'new.txt')!r}, 'w').write('x')")
    assert r.status == "failed" and ("Permission denied" in r.detail or "No such file" in r.detail)
    assert list(tmp_path.iterdir()) == []


def test_sandbox_dir_is_removed_whatever_the_program_did():
    # Taking permissions away inside the dir, or running into the time limit, does not stop cleanup
    # (checked by the autouse fixture after each run).
    assert run("import os\nos.makedirs('d/e')\nopen('d/e/f', 'w').write('x')\nos.chmod('d/e', 0)\n"
               "os.chmod('d', 0)").passed
    assert run("open('f', 'w').write('x')\nwhile True:\n    pass").status == "timeout"


# ---------------------------------------------------------------------------------------------
# 6. Reading the caller's files
# ---------------------------------------------------------------------------------------------

READS = [
    "raise SystemExit(open(SECRET).read())",
    "import pathlib\nraise SystemExit(pathlib.Path(SECRET).read_text())",
    "import os\nfd = os.open(SECRET, os.O_RDONLY)\nraise SystemExit(os.read(fd, 100).decode())",
    "import io\nraise SystemExit(io.open_code(SECRET).read().decode())",
    "import os\nos.symlink(SECRET, 'link')\nraise SystemExit(open('link').read())",
    "import os\nraise SystemExit(str(os.listdir(os.path.dirname(SECRET))))",
    "import shutil\nshutil.copy(SECRET, 'copy.txt')\nraise SystemExit(open('copy.txt').read())",
]


@pytest.mark.parametrize("program", READS)
def test_callers_files_cannot_be_read(program, tmp_path, monkeypatch):
    home = tmp_path / "home"  # stands in for the caller's home directory
    home.mkdir(mode=0o700)
    secret = home / "secret-file.txt"
    token = f"s3cr3t-{uuid.uuid4().hex}"
    secret.write_text(token)
    os.chmod(secret, 0o600)
    monkeypatch.setenv("HOME", str(home))
    r = run(f"SECRET = {str(secret)!r}\n" + program)
    assert r.status == "failed"
    assert token not in r.detail and "['secret-file.txt']" not in r.detail
    assert "not allowed" in r.detail or "Permission denied" in r.detail, r.detail


def test_kernel_protects_secrets_when_the_guard_is_bypassed(dropped, tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "secret.txt").write_text("s3cr3t-kernel")
    r = run(f"import _io\nraise SystemExit(_io.open({str(home / 'secret.txt')!r}).read())")
    assert r.status == "failed" and "s3cr3t-kernel" not in r.detail
    assert "Permission denied" in r.detail or "No such file" in r.detail
