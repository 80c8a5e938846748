"""Hostile programs against the sandbox's kernel layer: each gets past the Python-level guards (ctypes,
a re-imported ``posix`` or ``_socket``, ``_io.FileIO``) and the test checks on the host that what it
tried did not happen: no file read or written outside, no process left, no connection made.

The attacks run three times (fixture ``jail``) when the caller is root: with the caller's interpreter,
with the system Python, and with the system Python relocated under a fresh 0700 folder, which may each
reach bwrap differently (a root caller's runs get a fresh uid, and an interpreter that uid cannot read
is staged first; see elmkit/eval/bubblewrap.py). A root caller also runs this file again as an ordinary
user (``test_the_attacks_fail_as_an_ordinary_user``), where bwrap runs as the caller. The attacks are
skipped where bwrap is unavailable. The fail-closed refusal is tested everywhere, by making the probe
fail.
"""

import ast
import dataclasses
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from elmkit import cli
from elmkit.eval import bubblewrap, sandbox
from elmkit.eval.sandbox import (
    ExecResult,
    SandboxConfig,
    SandboxUnavailable,
    check_available,
    run_many,
    run_program,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox (namespaces)")

WHY_NOT = bubblewrap.unavailable() if sys.platform.startswith("linux") else "not Linux"

CFG = SandboxConfig(timeout_s=3.0, memory_mb=512, max_processes=8)
REPO = Path(__file__).resolve().parents[1]
ENV_MARK = b"elmkit-sandbox-"  # in the environment (ELMKIT_SANDBOX) of every sandbox process


def host_processes(marker: bytes) -> list[int]:
    """Live tasks on the host whose command line, environment or thread name contains ``marker``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        data = b""
        for part in ("cmdline", "environ", *(f"task/{t}/comm" for t in tids)):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as f:
                    data += f.read() + b"\0"
            except OSError:
                pass
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in data and state not in (b"Z", b"X"):
            found.append(int(pid))
    return found


@pytest.fixture(autouse=True)
def leaves_no_process():
    assert not host_processes(ENV_MARK), "a sandbox process was running before the test"
    yield
    left = host_processes(ENV_MARK)
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"sandbox processes survived: {left}"


ONE_JAIL = "bwrap runs as the caller when it is not root: one jail only"


@pytest.fixture(scope="session")
def private_python() -> str:
    """The system Python relocated under a fresh folder of mode 0700, as a pyenv Python sits under /root:
    its binary and its whole standard library (lib-dynload included) are hard links (copies across file
    systems) in ``<0700 folder>/python``, so the interpreter starts from there (its sys.prefix) and
    loads nothing else outside /usr and /lib. The prefix itself keeps mode 0755: staging binds folders,
    and a bind keeps the folder's own mode."""
    system = "/usr/bin/python3"
    if not os.path.exists(system):
        pytest.skip(f"no system Python to relocate ({system})")
    code = ("import json, sys, sysconfig; print(json.dumps([sys.base_prefix, sys.version_info[:2], "
            "sorted({sysconfig.get_path('stdlib'), sysconfig.get_path('platstdlib')})]))")
    base, (major, minor), stdlibs = json.loads(subprocess.run(
        [system, "-I", "-c", code], capture_output=True, text=True, check=True).stdout)
    closed = tempfile.mkdtemp(prefix="elmkit-private-python-")  # mode 0700, owned by the caller
    top = os.path.join(closed, "python")

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    try:
        python = os.path.join(top, "bin", f"python{major}.{minor}")
        for folder in (top, os.path.dirname(python)):
            os.mkdir(folder)
            os.chmod(folder, 0o755)
        link(os.path.realpath(system), python)
        for stdlib in stdlibs:  # same layout relative to the prefix, where the interpreter looks for it
            shutil.copytree(stdlib, os.path.join(top, os.path.relpath(stdlib, base)), symlinks=True,
                            copy_function=link, dirs_exist_ok=True)
        # Relocated only if it found its stdlib beside it and maps no file of the original install (a
        # libpython with an absolute RUNPATH, for one): the sandbox binds /usr, /lib* and ``top`` only.
        probe = ("import json, sys; print(json.dumps([sys.prefix, sys.exec_prefix, "
                 "[l.split()[5] for l in open('/proc/self/maps') if len(l.split()) > 5]]))")
        p = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, env={})
        prefix, exec_prefix, mapped = json.loads(p.stdout) if p.returncode == 0 else ("", "", [])
        bound = (top + "/", "/usr/", "/lib")
        outside = sorted({m for m in mapped if m.startswith("/") and not m.startswith(bound)})
        if (prefix, exec_prefix) != (top, top) or outside:
            pytest.skip(f"{system} cannot be relocated: prefix {prefix!r}, maps {outside} {p.stderr[-200:]}")
        yield python
    finally:
        shutil.rmtree(closed)


@pytest.fixture(params=["caller-python", "system-python", "private-python"])
def jail(request, monkeypatch) -> bubblewrap.Jail:
    """The jail the test's programs run in (skips when the kernel layer is unavailable)."""
    if WHY_NOT is not None:
        pytest.skip(f"needs the kernel layer (bwrap): {WHY_NOT}")
    if request.param != "caller-python" and os.geteuid() != 0:
        pytest.skip(ONE_JAIL)
    if request.param == "system-python":
        system = "/usr/bin/python3"
        if not os.path.exists(system) or os.path.realpath(system) == os.path.realpath(sys.executable):
            pytest.skip(f"no system Python besides {sys.executable}")
        monkeypatch.setattr(sandbox, "_PYTHON", system)
    elif request.param == "private-python":
        python = request.getfixturevalue("private_python")
        monkeypatch.setattr(sandbox, "_PYTHON", python)
        found = bubblewrap.jail(python)
        # What this parametrisation proves: the runs' fresh uid cannot reach the interpreter's only
        # folder outside /usr, so its programs run at all only through the staged jail, and the attacks
        # still fail there. (The caller's Python may or may not sit behind a 0700 folder: a venv's
        # interpreter is a link into its base install, which may be world-readable.)
        assert found.staged and found.binds == (os.path.dirname(os.path.dirname(python)),), found
    return bubblewrap.jail(sandbox._PYTHON)


def run(head: dict, body: str, cfg: SandboxConfig = CFG) -> ExecResult:
    """Run ``body`` after constants ``head`` (NAME = repr(value) lines)."""
    consts = "".join(f"{k} = {v!r}\n" for k, v in head.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return run_program(consts + textwrap.dedent(body), cfg)


def unique(prefix: str = "elmkit-hostile") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# (a) re-imported posix, (b) ctypes into libc: the calls run, their effects stay inside
# ---------------------------------------------------------------------------------------------


def test_reimported_posix_system_cannot_write_outside(jail, tmp_path):
    target = tmp_path / "pwned"
    r = run({"TARGET": str(target)}, """
        import sys
        sys.modules.pop("posix")
        import posix  # a fresh module: the guard's replacements are gone
        rc = posix.system(f"echo ran > /box/ran; echo pwned > {TARGET}")
        raise SystemExit(f"rc={rc} " + open("/box/ran").read().strip())
    """)
    assert r.status == "failed" and r.detail.startswith("rc=") and r.detail.endswith(" ran"), r.detail
    assert r.detail != "rc=0 ran"  # the shell ran, the write outside did not
    assert not target.exists()


@pytest.mark.parametrize("call", [
    'libc.system(f"echo pwned > {TARGET}".encode())',
    # fork, then execve a shell in the child
    'pid = libc.fork()\n'
    'if pid == 0:\n'
    '    argv = (ctypes.c_char_p * 4)(b"/bin/sh", b"-c", f"echo pwned > {TARGET}".encode(), None)\n'
    '    libc.execve(b"/bin/sh", argv, None)\n'
    '    libc._exit(127)\n'
    'status = ctypes.c_int()\n'
    'libc.waitpid(pid, ctypes.byref(status), 0)',
    # execve in place: the program becomes the shell
    'argv = (ctypes.c_char_p * 4)(b"/bin/sh", b"-c", f"echo pwned > {TARGET}; exit 7".encode(), None)\n'
    'libc.execve(b"/bin/sh", argv, None)',
    'assert libc.creat(TARGET.encode(), 0o644) < 0',
])
def test_ctypes_libc_cannot_write_outside(jail, tmp_path, call):
    target = tmp_path / "pwned"
    r = run({"TARGET": str(target)}, "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n" + call)
    assert not target.exists(), r
    assert r.status in ("passed", "failed")


@pytest.fixture
def public_dir():
    """A folder a root caller's fresh uid can reach (unlike pytest's tmp_path, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="elmkit-hostile-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def canary(public_dir):
    """A folder with one file."""
    (public_dir / "file.txt").write_text("canary")
    return public_dir


def test_ctypes_creat_and_unlink_fail_on_read_only_and_absent_paths(jail, tmp_path, canary, monkeypatch):
    keep = tmp_path / "keep.txt"  # the caller's file: absent from the sandbox's file system
    keep.write_text("original")
    # canary is bound read-only into the sandbox, like /usr and the interpreter
    monkeypatch.setitem(bubblewrap._jails, sandbox._PYTHON,
                        dataclasses.replace(jail, binds=(*jail.binds, str(canary))))
    usr_new = f"/usr/{unique()}"
    r = run({"KEEP": str(keep), "CANARY": str(canary), "USR_NEW": usr_new}, """
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        out = []
        creat = lambda path: libc.creat(path, 0o644)
        for call, path in [(libc.unlink, KEEP), (libc.unlink, CANARY + "/file.txt"),
                           (creat, CANARY + "/new.txt"), (creat, USR_NEW), (creat, "/new.txt"),
                           (creat, "/dev/new.txt")]:
            rc = call(path.encode())
            out.append("ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()])
        raise SystemExit(" ".join(out))
    """)
    try:
        assert r.detail == "ENOENT EROFS EROFS EROFS EROFS EROFS", r.detail
        assert keep.read_text() == "original" and (canary / "file.txt").read_text() == "canary"
        assert sorted(p.name for p in canary.iterdir()) == ["file.txt"]
        assert not os.path.exists(usr_new)
    finally:
        if os.path.exists(usr_new):
            os.remove(usr_new)


# ---------------------------------------------------------------------------------------------
# (c) reading the caller's files, writing /tmp and /dev/shm
# ---------------------------------------------------------------------------------------------


def test_fileio_cannot_read_the_callers_files(jail, tmp_path, monkeypatch):
    token = f"s3cr3t-{uuid.uuid4().hex}"
    secret = tmp_path / "secret.txt"
    secret.write_text(token)
    env_token = f"envs3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("ELMKIT_HOSTILE_SECRET", env_token)
    r = run({"SECRET": str(secret), "HERE": str(REPO / "tests" / Path(__file__).name),
             "TOKENS": [token, env_token]}, """
        import _io, sys
        sys.modules.pop("posix")
        import posix
        out = []
        for path in [SECRET, HERE, "/etc/passwd", "/etc/hostname"]:
            try:
                out.append(_io.FileIO(path).read()[:100].decode(errors="replace"))
            except OSError as e:
                out.append(type(e).__name__)
        seen = b""  # every process this program can see, and what they carry
        for pid in posix.listdir("/proc"):
            for part in ("cmdline", "environ"):
                try:
                    seen += _io.FileIO(f"/proc/{pid}/{part}").read()
                except OSError:
                    pass
        out.append(any(t.encode() in seen for t in TOKENS) or b"pytest" in seen)
        raise SystemExit(repr(out))
    """)
    assert token not in r.detail and env_token not in r.detail
    assert r.detail == repr(["FileNotFoundError"] * 4 + [False]), r.detail


def test_writes_to_tmp_and_dev_shm_stay_private(jail):
    name = unique()
    r = run({"NAME": name}, """
        import _io
        for top in ("/tmp", "/dev/shm"):
            with _io.FileIO(f"{top}/{NAME}", "w") as f:
                f.write(b"x")
        raise SystemExit("wrote both")
    """)
    assert r.detail == "wrote both"  # inside: a private tmpfs each
    assert not os.path.exists(f"/tmp/{name}") and not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.parametrize("top", ["/box", "/tmp", "/dev/shm"])
def test_private_file_systems_are_size_limited(jail, top):
    r = run({"TOP": top}, """
        import _io
        written = 0
        try:
            for i in range(200):
                with _io.FileIO(f"{TOP}/fill{i}", "w") as f:
                    f.write(b"x" * (1 << 20))
                written += 1
        except OSError as e:
            raise SystemExit(f"{written} MiB: {e.strerror}")
    """)
    assert r.detail == f"{bubblewrap.TMPFS_MB - 1} MiB: No space left on device" \
        or r.detail == f"{bubblewrap.TMPFS_MB} MiB: No space left on device", r.detail


def test_the_callers_tree_and_home_are_not_there(jail):
    r = run({"PATHS": [str(REPO / "src"), str(REPO / "tests"), os.path.expanduser("~/.bashrc"),
                       "/work/shared", "/home", "/var", "/opt", "/run"]}, """
        import sys
        sys.modules.pop("posix")
        import posix, os
        raise SystemExit(repr([os.path.exists(p) for p in PATHS] + [sorted(posix.listdir("/"))]))
    """)
    *exists, top = ast.literal_eval(r.detail)
    assert not any(exists), r.detail
    assert set(top) <= {"bin", "box", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp",
                        "usr", *(p.split("/")[1] for p in jail.binds)}, top


# ---------------------------------------------------------------------------------------------
# (d) processes beyond the cap, (e) daemons, (f) SIGTERM, (g) threads
# ---------------------------------------------------------------------------------------------


def test_native_fork_beyond_the_cap_fails(jail):
    r = run({}, """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        n = 0
        for _ in range(1000):
            pid = libc.fork()
            if pid == 0:
                libc.pause()
                libc._exit(0)
            if pid < 0:
                break
            n += 1
        raise SystemExit(f"forked {n}, errno {ctypes.get_errno()}")
    """)
    # RLIMIT_NPROC = max_processes + 1 counts bwrap's init and the program itself: 7 children, then
    # EAGAIN (11).
    assert r.detail == f"forked {CFG.max_processes - 1}, errno 11", r.detail


def test_native_fork_bomb_is_contained(jail):
    r = run({}, "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n")
    assert r.status in ("timeout", "failed")
    assert r.wall_s < CFG.timeout_s + 2  # checked by leaves_no_process: nothing survives


@pytest.mark.parametrize("then", ["exit", "spin"])
def test_double_forked_daemon_does_not_survive(jail, then):
    mark = unique("elmkit-daemon")
    r = run({"MARK": mark, "THEN": then}, """
        import ctypes, sys, time, _io
        sys.modules.pop("posix")
        import posix
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fork() == 0:
            libc.setsid()
            if libc.fork() == 0:
                argv = (ctypes.c_char_p * 3)(MARK.encode(), b"30", None)
                libc.execve(b"/bin/sleep", argv, None)
                libc._exit(127)
            libc._exit(0)

        def running():
            for pid in posix.listdir("/proc"):
                try:
                    if MARK.encode() in _io.FileIO(f"/proc/{pid}/cmdline").read():
                        return True
                except OSError:
                    pass
            return False

        for _ in range(500):  # the daemon runs before the program ends: the test is not vacuous
            if running():
                break
            time.sleep(0.01)
        else:
            raise SystemExit("no daemon")
        if THEN == "spin":
            while True:
                pass
        raise SystemExit("daemon running")
    """)
    assert r.status == ("timeout" if then == "spin" else "failed"), r
    if then == "exit":
        assert r.detail == "daemon running"
    assert host_processes(mark.encode()) == []


def test_sigterm_ignoring_processes_are_killed(jail):
    mark = unique("ek")[:15]  # a thread name holds 15 bytes
    r = run({"MARK": mark}, """
        import ctypes, signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        libc = ctypes.CDLL(None)
        for _ in range(3):
            if libc.fork() == 0:
                break
        libc.prctl(15, MARK.encode(), 0, 0, 0)  # PR_SET_NAME
        while True:
            pass
    """)
    assert r.status == "timeout" and r.wall_s < CFG.timeout_s + 1
    assert host_processes(mark.encode()) == []


@pytest.mark.parametrize("main_ends", ["pthread_exit", "return"])
def test_thread_outliving_main_does_not_survive(jail, main_ends):
    mark = unique("ek")[:15]
    r = run({"MARK": mark, "MAIN_ENDS": main_ends}, """
        import ctypes, threading, time
        libc = ctypes.CDLL(None)

        def spin():
            libc.prctl(15, MARK.encode(), 0, 0, 0)  # PR_SET_NAME: names this thread
            while True:
                time.sleep(0.01)

        threading.Thread(target=spin, daemon=MAIN_ENDS == "return").start()
        time.sleep(0.2)
        if MAIN_ENDS == "pthread_exit":
            libc.pthread_exit(None)  # only the main thread ends; the process lives on in the other one
    """)
    assert r.status == ("timeout" if main_ends == "pthread_exit" else "passed"), r
    assert host_processes(mark.encode()) == []


# ---------------------------------------------------------------------------------------------
# (h) network
# ---------------------------------------------------------------------------------------------


def test_no_network_reaches_the_host(jail):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)
    abstract = socket.socket(socket.AF_UNIX)
    name = "\0" + unique()
    abstract.bind(name)
    abstract.listen()
    abstract.setblocking(False)
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dns.bind(("127.0.0.1", 53))  # where a resolver without /etc/resolv.conf sends its queries
        dns.setblocking(False)
    except OSError:
        dns.close()
        dns = None
    try:
        r = run({"PORT": tcp.getsockname()[1], "NAME": name}, """
            import sys
            sys.modules.pop("_socket")
            import _socket  # a fresh module: the guard's replacements are gone
            out = []
            for family, address in [(_socket.AF_INET, ("127.0.0.1", PORT)), (_socket.AF_UNIX, NAME)]:
                s = _socket.socket(family, _socket.SOCK_STREAM)
                s.settimeout(2)
                try:
                    s.connect(address)
                    out.append("connected")
                except OSError as e:
                    out.append(type(e).__name__)
            for host in ("example.com", "localhost"):
                try:
                    _socket.getaddrinfo(host, 80)
                    out.append("resolved")
                except OSError as e:
                    out.append(type(e).__name__)
            out.append([n for _, n in _socket.if_nameindex()])
            raise SystemExit(repr(out))
        """)
        assert r.detail == repr(["ConnectionRefusedError", "ConnectionRefusedError", "gaierror", "gaierror",
                                 ["lo"]]), r.detail
        for listener in (tcp, abstract):
            with pytest.raises(BlockingIOError):
                listener.accept()
        if dns is not None:
            with pytest.raises(BlockingIOError):
                dns.recvfrom(512)
    finally:
        for s in (tcp, abstract, dns):
            if s is not None:
                s.close()


def test_no_privileges_inside(jail):
    r = run({}, """
        import ctypes, _io
        lines = _io.FileIO("/proc/self/status").read().decode().splitlines()
        status = dict(line.split(":", 1) for line in lines)
        libc = ctypes.CDLL(None, use_errno=True)
        userns = libc.unshare(0x10000000)  # CLONE_NEWUSER: a namespace of its own to gain capabilities in
        raise SystemExit(repr([status[k].split()[0] for k in ("Uid", "Gid", "CapEff", "CapPrm", "NoNewPrivs")]
                              + [userns]))
    """)
    assert r.detail == repr(["65534", "65534", "0000000000000000", "0000000000000000", "1", -1]), r.detail


# ---------------------------------------------------------------------------------------------
# As an ordinary user
# ---------------------------------------------------------------------------------------------

AS_USER = 65534
"""uid and gid of the ordinary caller: nobody, which exists on every host (the test adds no user)."""
INNER = "ELMKIT_HOSTILE_INNER"
"""Set in the environment of the run as an ordinary user, so that it does not start another one."""
ALREADY = "already an ordinary user: the attacks above ran as one"


def closed_folder(path: str, uid: int, gid: int) -> str | None:
    """The topmost folder on ``path`` (``path`` included) that ``uid``/``gid`` may not enter by its mode
    bits (ACLs aside), or None."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        folder = os.path.join(*parts[:i])
        st = os.stat(folder)
        bits = st.st_mode >> 6 if st.st_uid == uid else st.st_mode >> 3 if st.st_gid == gid else st.st_mode
        if not bits & 1 or (i == len(parts) and not bits & 4):
            return folder
    return None


def as_ordinary_user(argv: list[str], needs: list[str], stage: Path) -> list[str]:
    """The command that runs ``argv`` as AS_USER, without capabilities or supplementary groups.

    When a folder in ``needs`` sits behind one that AS_USER cannot enter (the interpreter of a root
    caller under /root, mode 0700), the command first covers that folder with a tmpfs in a mount
    namespace of its own and binds back only the folders needed, at the same paths: the ordinary user
    then runs the same interpreter and packages, and nothing else of the closed folder.
    """
    keep: list[str] = []
    for path in sorted({os.path.abspath(n) for n in needs if os.path.isdir(n)}, key=len):
        if not any(path == k or path.startswith(k + "/") for k in keep):
            keep.append(path)
    closed = {path: closed_folder(path, AS_USER, AS_USER) for path in keep}
    closed = {path: top for path, top in closed.items() if top is not None}
    drop = ["setpriv", f"--reuid={AS_USER}", f"--regid={AS_USER}", "--clear-groups", "--", *argv]
    if not closed:
        return drop
    if any(path == top for path, top in closed.items()) or shutil.which("unshare") is None:
        pytest.skip(f"uid {AS_USER} cannot reach {sorted(closed)} (and they cannot be bound around)")
    q = shlex.quote
    script = [f"mount -t tmpfs -o mode=0755,size=1m tmpfs {q(str(stage))}"]
    for i, path in enumerate(closed):  # held under ``stage`` while the tmpfs covers them
        script += [f"mkdir {q(f'{stage}/{i}')}", f"mount --rbind {q(path)} {q(f'{stage}/{i}')}"]
    script += [f"mount -t tmpfs -o mode=0755,size=1m tmpfs {q(top)}" for top in sorted(set(closed.values()))]
    for i, path in enumerate(closed):  # ``keep`` holds no folder inside another: mkdir writes the tmpfs only
        script += [f"mkdir -p {q(path)}", f"mount --rbind {q(f'{stage}/{i}')} {q(path)}"]
    script.append("exec " + shlex.join(drop))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", "\n".join(script)]


@pytest.mark.slow
def test_the_attacks_fail_as_an_ordinary_user():
    """A root caller runs this file again as uid 65534 (nobody), where bwrap runs as the caller in
    unprivileged user namespaces and binds the interpreter's folders directly, instead of the fresh uid
    and staging a root caller gets. Every attack with the caller's interpreter must pass there; the
    only skips allowed are the root-only jails. An ordinary user whose bwrap is refused (unprivileged
    user namespaces turned off) makes this test skip with bwrap's reason. The side effects are checked
    by the inner run itself, and afterwards by this run (as root, ``leaves_no_process`` sees every
    process on the host)."""
    if os.environ.get(INNER) or os.geteuid() != 0:
        pytest.skip(ALREADY)
    if WHY_NOT is not None:
        pytest.skip(f"needs the kernel layer (bwrap): {WHY_NOT}")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run as an ordinary user")
    work = Path(tempfile.mkdtemp(prefix="elmkit-as-user-"))
    try:
        (work / "stage").mkdir()  # root's: a mount point for as_ordinary_user
        os.chown(work, AS_USER, AS_USER)  # everything else here the inner run writes itself
        report = work / "junit.xml"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={work / 'tmp'}",
                f"--junitxml={report}", str(Path(__file__).resolve())]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(work),
               "TMPDIR": str(work), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", INNER: "1"}
        needs = [*bubblewrap._interpreter_folders(sys.executable), *sys.path, str(REPO)]
        p = subprocess.run(as_ordinary_user(argv, needs, work / "stage"), cwd=REPO, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        out = (p.stdout + p.stderr)[-3000:]
        assert report.exists(), f"the inner run did not start (exit {p.returncode}):\n{out}"
        outcomes = {}
        for case in ET.parse(report).iter("testcase"):
            what = [(c.tag, c.get("message", "")) for c in case if c.tag in ("failure", "error", "skipped")]
            outcomes[case.get("name")] = what[0] if what else ("passed", "")
    finally:
        shutil.rmtree(work)
    refused = [m for tag, m in outcomes.values() if tag == "skipped" and "needs the kernel layer" in m]
    if refused:
        pytest.skip(f"an ordinary user's bwrap is refused here: {refused[0]}")
    assert p.returncode == 0, out
    allowed = (ONE_JAIL, ALREADY)  # the root-only jails, and this test in the inner run
    wrong = {name: o for name, o in outcomes.items()
             if o[0] != "passed" and not (o[0] == "skipped" and any(a in o[1] for a in allowed))}
    assert not wrong, f"{wrong}\n{out}"
    jailed = [name for name in outcomes if "[caller-python" in name]
    assert jailed and all(outcomes[name][0] == "passed" for name in jailed), out
    assert any(ONE_JAIL in o[1] for o in outcomes.values()), "the inner run was root"


# ---------------------------------------------------------------------------------------------
# Fail closed
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_kernel_layer(monkeypatch):
    monkeypatch.setattr(bubblewrap, "unavailable", lambda: "bwrap is not installed (no bwrap on PATH)")
    monkeypatch.setattr(sandbox, "_warned_weak", False)


def test_refuses_without_the_kernel_layer(no_kernel_layer):
    for call in (lambda: run_program("print(1)"), lambda: run_many(["print(1)"], progress=False),
                 check_available):
        with pytest.raises(SandboxUnavailable) as e:
            call()
    message = str(e.value)
    assert "bwrap is not installed" in message  # why
    assert "apt-get install bubblewrap" in message and "unprivileged_userns_clone" in message  # how
    assert "allow_weak=True" in message and "--sandbox.allow-weak" in message  # or accept the risk


@pytest.mark.parametrize("fake", ["missing", "failing"])
def test_the_probe_detects_a_missing_or_failing_bwrap(monkeypatch, public_dir, fake):
    exe = public_dir / "bwrap"
    if fake == "failing":  # e.g. user namespaces turned off
        exe.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        exe.chmod(0o755)
    monkeypatch.setattr(bubblewrap, "BWRAP", str(exe))
    bubblewrap.unavailable.cache_clear()
    try:
        why = bubblewrap.unavailable()
        with pytest.raises(SandboxUnavailable, match="refusing"):
            run_program("print(1)")
    finally:
        monkeypatch.undo()
        bubblewrap.unavailable.cache_clear()
    expected = "not installed" if fake == "missing" else "No permissions to create new namespace"
    assert why is not None and expected in why, why


def test_allow_weak_runs_the_weak_sandbox_with_a_warning(no_kernel_layer):
    with pytest.warns(RuntimeWarning, match="WITHOUT the kernel layer"):
        r = run_program("print(1)", SandboxConfig(allow_weak=True))
    assert r.passed
    assert run_many(["assert 1 == 2"], SandboxConfig(allow_weak=True), progress=False)[0].status == "failed"


def test_eval_refuses_before_generating_and_takes_allow_weak(no_kernel_layer, tiny_dir, tmp_path, monkeypatch,
                                                              capsys):
    data = tmp_path / "he.jsonl"
    data.write_text(json.dumps({"task_id": "Toy/0", "prompt": 'def f(x):\n    """x + 1."""\n',
                                "canonical_solution": "    return x + 1\n", "entry_point": "f",
                                "test": "def check(c):\n    assert c(1) == 2\n"}) + "\n")
    argv = ["eval", "--model", str(tiny_dir), "--data", str(data), "--task", "humaneval",
            "--max-new-tokens", "4", "--sandbox.timeout-s", "5"]
    import elmkit.eval.generate

    real_generate = elmkit.eval.generate.generate
    monkeypatch.setattr(elmkit.eval.generate, "generate", lambda *a, **k: pytest.fail("generated first"))
    assert cli.main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "refusing to run untrusted code" in capsys.readouterr().err
    monkeypatch.setattr(elmkit.eval.generate, "generate", real_generate)
    with pytest.warns(RuntimeWarning, match="WITHOUT the kernel layer"):
        assert cli.main([*argv, "--out", str(tmp_path / "weak"), "--sandbox.allow-weak", "true"]) == 0
    assert json.loads((tmp_path / "weak" / "config.json").read_text())["sandbox"]["allow_weak"] is True
