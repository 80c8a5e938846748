"""The sandbox's kernel layer: every program runs under bubblewrap (``bwrap``) in namespaces of its own.

``unavailable()`` says once per process whether bwrap works here (None) or why not. ``jail(python)``
finds, once per interpreter, how its programs run: which of the interpreter's folders are bound into
the sandbox and how bwrap reaches them. ``command`` builds the command line of one run;
``elmkit.eval.sandbox`` starts it, watches it and kills it.

What a program sees (measured on Linux 6.18, bwrap 0.8.0; ``tests/test_sandbox_hostile.py``):

- its own user, PID, network, IPC, UTS and cgroup namespaces: uid/gid 65534, no capabilities,
  no_new_privs, no further user namespaces (``--disable-userns``), only a loopback interface, and PID 1
  is bwrap's init: when it exits or is killed, the kernel kills every process left in the namespace,
  however it forked, double-forked, called setsid or ignored SIGTERM;
- a root file system built for it, read-only: /usr (and the /bin, /lib* links or folders), four files
  of /etc (the loader's cache and configuration, localtime) and the interpreter's own folders (prefix,
  stdlib, site-packages); fresh /proc and /dev; private tmpfs at /box (the working directory, holding
  only program.py), /tmp and /dev/shm of ``TMPFS_MB`` each. Nothing else of the host: not the caller's
  home, working tree, temp dir or sockets.

The sandbox's uid outside is never root. bwrap runs as the caller, or, for a root caller, as a fresh
unprivileged uid per run (root outside would own the host's /proc/sys, for one, and the kernel exempts
it from RLIMIT_NPROC). When that uid cannot reach the interpreter's folders (a pyenv Python under
/root, mode 0700), a small launcher running as root first binds them to a tmpfs in a private mount
namespace of its own, then drops to the uid and executes bwrap (``Jail.staged``).

The process cap (``SandboxConfig.max_processes``) is RLIMIT_NPROC, set inside. Since Linux 5.14 it
counts the tasks of one uid *in one user namespace*, so in the sandbox's fresh namespace it counts
only the sandbox's own tasks (bwrap's init, the program, its threads and children), whatever else
runs under the same uid outside.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["Jail", "SandboxUnavailable", "command", "fresh_uid", "jail", "unavailable"]

BWRAP = "bwrap"
"""The bubblewrap executable (found on PATH)."""
SANDBOX_ID = 65534
"""uid and gid of the program inside its user namespace (``nobody``)."""
TMPFS_MB = 64
"""Size of each private tmpfs (/box, /tmp, /dev/shm) in MiB."""
ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
"""The only files of /etc a program sees."""
STAGE = "/tmp"
"""Where a staged jail's launcher mounts the tmpfs holding the interpreter's folders (in its own
mount namespace: the host's /tmp is not touched)."""

HOW_TO_ENABLE = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) and "
    "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ "
    "also kernel.apparmor_restrict_unprivileged_userns=0; in a container, a seccomp profile that "
    "permits creating namespaces)"
)

# Fresh uids for root callers: a random start in a high range that login users and the usual
# container sub-uid ranges do not reach, so two elmkit processes on one host do not collide either.
_UIDS = itertools.count(random.randrange(1_500_000_000, 1_900_000_000))


def fresh_uid() -> int:
    """An unused unprivileged uid (and gid) for one run of a root caller."""
    return next(_UIDS)


class SandboxUnavailable(RuntimeError):
    """The kernel layer cannot be set up and the caller did not opt in to the weaker sandbox."""


@dataclass(frozen=True)
class Jail:
    """How the programs of one interpreter run under bwrap."""

    python: str
    """The interpreter, called by the same path inside the sandbox."""
    binds: tuple[str, ...]
    """The interpreter's folders outside /usr, bound read-only at the same paths."""
    own_uid: bool
    """bwrap runs as a fresh unprivileged uid per run (root callers), not as the caller."""
    staged: bool = False
    """The fresh uid cannot reach ``binds``: the launcher stages them first (see the module docstring)."""


# ---------------------------------------------------------------------------------------------
# Probes (once per process / per interpreter)
# ---------------------------------------------------------------------------------------------


@functools.cache
def unavailable() -> str | None:
    """None when bwrap runs a command in the sandbox's namespaces here (as the uid runs will use),
    else why not (one line)."""
    if shutil.which(BWRAP) is None:
        return f"{BWRAP} is not installed (no {BWRAP} on PATH)"
    probe = Jail("/bin/sh", (), os.geteuid() == 0)  # runs /bin/sh: no interpreter folders to bind
    return _try(command(probe, -1, -1, ["/bin/sh", "-c", "exit 0"]), probe)


_jails: dict[str, Jail | str] = {}


def jail(python: str) -> Jail:
    """The jail for ``python``, probed on first use. Raises RuntimeError when the interpreter cannot
    run in the sandbox."""
    found = _jails.get(python)
    if found is None:
        try:
            found = _jails[python] = _find_jail(python)
        except (OSError, RuntimeError, ValueError) as e:
            found = _jails[python] = f"cannot run {python} in the bwrap sandbox: {e}"
    if isinstance(found, str):
        raise RuntimeError(found)
    return found


def _find_jail(python: str) -> Jail:
    binds = _interpreter_folders(python)
    argv = [python, "-I", "-B", "-c", "import encodings, site"]
    candidates = [Jail(python, binds, True), Jail(python, binds, True, True)] if os.geteuid() == 0 \
        else [Jail(python, binds, False)]
    why = ""
    for cand in candidates:
        why = _try(command(cand, -1, -1, argv), cand)
        if why is None:
            return cand
    raise RuntimeError(why)


def _try(cmd: list[str], jail: Jail) -> str | None:
    """Run a probe command as a run would; None when it exits 0, else the reason."""
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=30, env=_probe_env(), **popen_user(jail))
    except (OSError, subprocess.SubprocessError) as e:
        return f"{BWRAP} could not be started: {e}"
    if p.returncode == 0:
        return None
    lines = p.stderr.decode(errors="replace").strip().splitlines()
    return f"{BWRAP} failed (exit {p.returncode}): {lines[-1] if lines else 'no message'}"


def _probe_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _interpreter_folders(python: str) -> tuple[str, ...]:
    """The interpreter's prefixes and the sys.path folders inside them, minus /usr and nested ones."""
    code = ("import json, os, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
            "sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable)), sys.path]))")
    p = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, env=_probe_env())
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        raise RuntimeError(f"the interpreter does not start: {lines[-1] if lines else p.returncode}")
    *prefixes, path = json.loads(p.stdout)
    prefixes = [os.path.abspath(x) for x in prefixes if x and os.path.abspath(x) != "/"]
    # Only sys.path folders inside a prefix (stdlib, site-packages): not, e.g., an editable install's
    # source tree, which may be the caller's working tree.
    inside = [os.path.abspath(x) for x in path
              if x and os.path.isdir(x) and any(_under(os.path.abspath(x), pre) for pre in prefixes)]
    keep = []
    for folder in sorted({*prefixes, os.path.dirname(os.path.abspath(python)), *inside}, key=len):
        if not _under(folder, "/usr") and not any(_under(folder, k) for k in keep):
            keep.append(folder)
    return tuple(keep)


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def command(jail: Jail, program_fd: int, info_fd: int, argv: list[str], uid: int | None = None) -> list[str]:
    """The command line that runs ``argv`` in a fresh sandbox.

    ``program_fd``: a file whose content becomes /box/program.py (-1: none); ``info_fd``: where bwrap
    writes the host pid of the sandbox's PID 1 as JSON (-1: nowhere); ``uid``: the fresh uid of a
    staged jail's run (its launcher drops to it; ``popen_user`` does it for the others).
    """
    size = ["--size", str(TMPFS_MB << 20)]
    cmd = [shutil.which(BWRAP) or BWRAP, "--unshare-all", "--unshare-user", "--disable-userns",
           "--cap-drop", "ALL", "--die-with-parent", "--new-session", "--uid", str(SANDBOX_ID),
           "--gid", str(SANDBOX_ID), "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    for path in ETC:
        cmd += ["--ro-bind-try", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/dev/shm", *size, "--tmpfs", "/tmp",
            *size, "--tmpfs", "/box"]
    if program_fd >= 0:
        cmd += ["--perms", "0644", "--file", str(program_fd), "/box/program.py"]
    for i, path in enumerate(jail.binds):  # after the tmpfs mounts: an interpreter under /tmp stays visible
        cmd += ["--ro-bind", f"{STAGE}/{i}" if jail.staged else path, path]
    # The root file system and /dev are tmpfs that bwrap made; read-only, they cannot fill memory.
    cmd += ["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", "/box"]
    if info_fd >= 0:
        cmd += ["--info-fd", str(info_fd)]
    cmd += ["--", *argv]
    if jail.staged:
        uid = fresh_uid() if uid is None else uid
        launcher = [jail.python, "-I", "-S", "-c", _LAUNCHER, str(uid), str(len(jail.binds)), *jail.binds]
        return [*launcher, *cmd]
    return cmd


def popen_user(jail: Jail, uid: int | None = None) -> dict:
    """subprocess arguments that start a run's command as its fresh uid (nothing for staged jails,
    whose launcher drops to it after staging, nor when bwrap runs as the caller)."""
    if not jail.own_uid or jail.staged:
        return {}
    uid = fresh_uid() if uid is None else uid
    return {"user": uid, "group": uid, "extra_groups": []}


# Runs as root: binds the interpreter's folders (argv: uid, count, folders..., then the bwrap command)
# to STAGE/0, STAGE/1, ... on a tmpfs in a mount namespace of its own, where the uid can reach them,
# then becomes the uid and executes bwrap.
_LAUNCHER = f"""
import ctypes, os, sys
uid, n = int(sys.argv[1]), int(sys.argv[2])
folders, cmd = sys.argv[3:3 + n], sys.argv[3 + n:]
libc = ctypes.CDLL(None, use_errno=True)

def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{{what}}: {{os.strerror(err)}}")

check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
check(libc.mount(None, b"/", None, 0x4000 | 0x40000, None), "mount --make-rprivate /")  # MS_REC|MS_PRIVATE
fds = [os.open(f, os.O_PATH | os.O_DIRECTORY) for f in folders]  # here, before STAGE hides any
check(libc.mount(b"tmpfs", b"{STAGE}", b"tmpfs", 0, b"mode=0755,size=1m"), "mount tmpfs {STAGE}")
for i, fd in enumerate(fds):
    os.mkdir(f"{STAGE}/{{i}}")
    source, target = f"/proc/self/fd/{{fd}}".encode(), f"{STAGE}/{{i}}".encode()
    check(libc.mount(source, target, None, 0x1000 | 0x4000, None), "bind " + folders[i])  # MS_BIND|MS_REC
    os.close(fd)
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
os.execv(cmd[0], cmd)
"""
