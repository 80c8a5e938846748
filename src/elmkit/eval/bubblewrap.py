"""The sandbox's kernel layer: every program runs under bubblewrap (``bwrap``) in namespaces of its own.

``unavailable()`` says once per process whether bwrap works here (None) or why not. ``jail(python)``
finds, once per interpreter, how its programs run: which of the interpreter's folders are bound into
the sandbox, which uid bwrap runs as, and what caps the number of processes. ``command`` builds the
bwrap command line of one run; ``elmkit.eval.sandbox`` starts it, watches it and kills it.

What a program sees (measured on Linux 6.18, bwrap 0.8.0; ``tests/test_sandbox_hostile.py``):

- its own user, PID, network, IPC, UTS and cgroup namespaces: uid/gid 65534, no capabilities,
  no_new_privs, no further user namespaces (``--disable-userns``), only a loopback interface, and PID 1
  is bwrap's init: when it exits or is killed, the kernel kills every process left in the namespace,
  however it forked, double-forked, called setsid or ignored SIGTERM;
- a root file system built for it: /usr (and the /bin, /lib* links or folders), four files of /etc
  (the loader cache and configuration, localtime) and the interpreter's own folders (prefix, stdlib,
  site-packages), all read-only; fresh /proc and /dev; private tmpfs at /box (the working directory,
  holding only program.py), /tmp and /dev/shm of ``TMPFS_MB`` each. Nothing else of the host: not
  the caller's home, working tree, temp dir or sockets.

The process cap (``SandboxConfig.max_processes``) is enforced by the kernel in one of two ways:

- ``rlimit``: RLIMIT_NPROC, set inside. Since Linux 5.14 it counts the tasks of one uid *in one user
  namespace*, so in the sandbox's fresh namespace it counts only the sandbox's tasks (bwrap's init,
  the program, its threads and children). The kernel ignores it for real root (uid 0 outside), so a
  root caller runs bwrap as a fresh unprivileged uid, when that uid can reach the interpreter's
  folders (not, e.g., a pyenv Python under /root, mode 0700).
- ``cgroup``: otherwise, as root, a pids cgroup per run (``pids.max``), when the cgroup file system
  lets us make one (cgroup v1 pids hierarchy, or a v2 hierarchy whose subtree has the pids
  controller).

When neither works (``none``: root, an interpreter other users cannot read, no writable pids cgroup)
a warning says so: then only the Python-level thread/fork guard caps processes, and the namespace
still kills them all at the end.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import os
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from typing import Literal

__all__ = ["Jail", "SandboxUnavailable", "command", "jail", "unavailable"]

BWRAP = "bwrap"
"""The bubblewrap executable (found on PATH)."""
SANDBOX_ID = 65534
"""uid and gid of the program inside its user namespace (``nobody``)."""
TMPFS_MB = 64
"""Size of each private tmpfs (/box, /tmp, /dev/shm) in MiB."""
ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
"""The only files of /etc a program sees."""

HOW_TO_ENABLE = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) and "
    "allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ "
    "also kernel.apparmor_restrict_unprivileged_userns=0; in a container, run it with a seccomp profile "
    "that permits unshare/clone of namespaces)"
)


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
    """bwrap runs as a fresh unprivileged uid per run (root callers whose interpreter that uid can read)."""
    process_cap: Literal["rlimit", "cgroup", "none"]
    """What enforces ``max_processes``: RLIMIT_NPROC, a pids cgroup, or only the Python guard."""
    cgroup: str | None = None
    """With process_cap "cgroup": the folder each run's pids cgroup is made in."""


# ---------------------------------------------------------------------------------------------
# Probes (once per process / per interpreter)
# ---------------------------------------------------------------------------------------------


@functools.cache
def unavailable() -> str | None:
    """None when bwrap runs a command in the sandbox's namespaces here, else why not (one line)."""
    exe = shutil.which(BWRAP)
    if exe is None:
        return f"{BWRAP} is not installed (no {BWRAP} on PATH)"
    argv = ["/bin/sh", "-c", "exit 0"] if os.path.exists("/bin/sh") else ["/usr/bin/true"]
    return _try(command(Jail(argv[0], (), False, "none"), -1, -1, argv), None)


_jails: dict[str, Jail | str] = {}


def jail(python: str, fresh_uid: int) -> Jail:
    """The jail for ``python`` (probed on first use: which uid can run it, what caps processes).

    ``fresh_uid`` is an unused uid to probe with when the caller is root. Raises RuntimeError when the
    interpreter cannot run in the sandbox at all.
    """
    found = _jails.get(python)
    if found is None:
        try:
            found = _jails[python] = _find_jail(python, fresh_uid)
        except (OSError, RuntimeError, ValueError) as e:
            found = _jails[python] = f"cannot run {python} in the bwrap sandbox: {e}"
    if isinstance(found, str):
        raise RuntimeError(found)
    return found


def _find_jail(python: str, fresh_uid: int) -> Jail:
    binds = _interpreter_folders(python)
    argv = [python, "-I", "-B", "-c", "import encodings, site"]
    if os.geteuid() == 0:
        if _try(command(Jail(python, binds, True, "rlimit"), -1, -1, argv), fresh_uid) is None:
            return Jail(python, binds, True, "rlimit")
        why = _try(command(Jail(python, binds, False, "none"), -1, -1, argv), None)
        if why is not None:
            raise RuntimeError(why)
        cgroup = _pids_cgroup_root()
        found = Jail(python, binds, False, "cgroup" if cgroup else "none", cgroup)
        if cgroup is None:
            warnings.warn(
                f"elmkit sandbox: {python} is not readable by other users and no pids cgroup can be "
                "made, so programs run as root in their user namespace and only the Python guard caps "
                "their processes (the PID namespace still kills them all at the end). Use a Python "
                "installed in a world-readable place (e.g. /usr or /opt) for a kernel-enforced cap.",
                RuntimeWarning, stacklevel=4,
            )
        return found
    why = _try(command(Jail(python, binds, False, "rlimit"), -1, -1, argv), None)
    if why is not None:
        raise RuntimeError(why)
    return Jail(python, binds, False, "rlimit")


def _try(cmd: list[str], uid: int | None) -> str | None:
    """Run a probe command; None when it exits 0, else the reason."""
    as_uid = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=30, env=_probe_env(), **as_uid)
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


@functools.cache
def _pids_cgroup_root() -> str | None:
    """A folder of the pids cgroup hierarchy in which this (root) process can make cgroups, or None."""
    own = {}  # controller -> our cgroup path
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else ["unified"]:
                    own[c] = path
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:4] for line in f]
    except (OSError, ValueError):
        return None
    for mountpoint, fstype, options in mounts:
        if fstype == "cgroup" and "pids" in options.split(",") and "pids" in own:
            base = os.path.normpath(mountpoint + own["pids"])
        elif fstype == "cgroup2" and "unified" in own:
            base = os.path.normpath(mountpoint + own["unified"])
            try:
                with open(os.path.join(base, "cgroup.subtree_control")) as f:
                    if "pids" not in f.read().split():
                        continue
            except OSError:
                continue
        else:
            continue
        probe = os.path.join(base, f"elmkit-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        usable = os.path.exists(os.path.join(probe, "pids.max"))
        os.rmdir(probe)
        if usable:
            return base
    return None


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def command(jail: Jail, program_fd: int, info_fd: int, argv: list[str]) -> list[str]:
    """The bwrap command line that runs ``argv`` in a fresh sandbox.

    ``program_fd``: a file whose content becomes /box/program.py (-1: none); ``info_fd``: where bwrap
    writes the host pid of the sandbox's PID 1 as JSON (-1: nowhere).
    """
    size = ["--size", str(TMPFS_MB << 20)]
    cmd = [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
           "--die-with-parent", "--new-session", "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID),
           "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    for path in ETC:
        cmd += ["--ro-bind-try", path, path]
    for path in jail.binds:
        cmd += ["--ro-bind", path, path]
    cmd += [*size, "--tmpfs", "/box"]
    if program_fd >= 0:
        cmd += ["--perms", "0644", "--file", str(program_fd), "/box/program.py"]
    cmd += [*size, "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/dev/shm",
            "--chdir", "/box"]
    if info_fd >= 0:
        cmd += ["--info-fd", str(info_fd)]
    return [*cmd, "--", *argv]


_cgroup_ids = itertools.count()


def make_cgroup(jail: Jail, max_tasks: int) -> str | None:
    """A fresh pids cgroup allowing ``max_tasks`` tasks (None unless the jail caps by cgroup)."""
    if jail.cgroup is None:
        return None
    path = os.path.join(jail.cgroup, f"elmkit-{os.getpid()}-{next(_cgroup_ids)}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_tasks))
    except OSError:
        os.rmdir(path)
        raise
    return path


def in_cgroup(path: str | None, cmd: list[str]) -> list[str]:
    """``cmd`` started inside the cgroup: a shell moves itself there, then becomes ``cmd``."""
    if path is None:
        return cmd
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(path, "cgroup.procs"), *cmd]


def remove_cgroup(path: str | None) -> None:
    """Remove a run's cgroup once its tasks are gone (they are: the whole namespace was killed)."""
    if path is None:
        return
    for _ in range(400):
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                break
        time.sleep(0.005)
    warnings.warn(f"elmkit sandbox: could not remove cgroup {path}", RuntimeWarning, stacklevel=3)
