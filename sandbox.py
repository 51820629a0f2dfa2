"""The code sandbox: run model-written Python so that it can harm nothing, as root and as an ordinary user.

Model-written code is hostile. `run_python` runs one program in a fresh sandbox and returns within about
`timeout_s`, leaving nothing behind. Standard library only, so that it can be imported and audited alone.

What a sandboxed program gets (full isolation, the "root" and "user" modes below):
- a filesystem of its own: a fresh root holding read-only binds of the system directories (/usr, /etc, ...)
  and of the caller's Python install and venv, wherever they live; writable are only its working directory
  (/sandbox, also its HOME), /tmp and /dev/shm, three tmpfs of TMPFS_MB that vanish with it. The caller's HOME,
  the host's /tmp and disk and every other directory are not there at all;
- no network (an empty network namespace), its own PID namespace (it cannot see or signal host processes);
- no privileges: every capability dropped before the program starts, in a user namespace where nested user
  namespaces are forbidden (so none can give them back); as root the namespace's root is a throw-away uid;
- a fresh, empty session keyring (the caller's is out of reach); its user keyrings die with its namespace;
- rlimits (address space, CPU seconds, processes, open files, file size, no core dump), set by prlimit; a
  cgroup per run where one can be made (memory, including tmpfs/shm/memfd pages, and processes; see
  `memory_bound`); capped output, and SIGKILL to everything at the deadline.

Modes, chosen once by `sandbox_caps` (which runs a probe program through each):
- "root": the caller is root: mount + network + PID namespaces, then a throw-away uid in a user namespace;
- "root-plain": the same where a throw-away uid may not create a user namespace (unprivileged user namespaces
  disabled or restricted): the throw-away uid without one, so nested user namespaces are not forbidden (they
  are not allowed to it either there) and its user keyrings outlive the run;
- "user": an unprivileged caller (or root without CAP_SYS_ADMIN, as in many containers): the same namespaces
  inside a user namespace (`unshare --user`), every capability dropped before the program starts;
- "uid": root, but no namespaces here: only the throw-away uid (it cannot touch the caller's files, but it
  reaches the network, sees host processes and may create user namespaces; a venv it cannot traverse fails
  `self_check`);
- "degraded": no namespaces and no throw-away uid (no `unshare`, or unprivileged user namespaces disabled):
  programs run with the caller's uid, files and network. `self_check` says so loudly, naming the risk, and
  refuses outright for root unless GRLO_ALLOW_UNSANDBOXED_CODE=1.

Known limits: without a cgroup, memory outside the address-space limit is bounded only by the rlimits'
product (`memory_bound` says how much); the system directories and the Python install are readable (as they
are to any local user); in "uid" mode a program may leave files in the host's world-writable /tmp and /dev/shm.
"""

import contextlib
import functools
import logging
import math
import os
import random
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

OUTPUT_CAP_BYTES = 4 << 20  # per stream; a program that prints more is killed (ok=False, output_truncated)
MAX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE: the largest file (or memfd) a sandboxed program may write
MAX_OPEN_FILES = 64  # RLIMIT_NOFILE per process: with MAX_FILE_BYTES, bounds memfd memory where no cgroup does
MAX_PROCS = 16  # RLIMIT_NPROC (threads count too), and pids.max of the run's cgroup
TMPFS_MB = 64  # each of the program's three in-memory filesystems: its directory, /tmp and /dev/shm
# Each root-mode run gets its own random uid from this range: RLIMIT_NPROC counts per uid, so a fork storm
# in one sandbox cannot starve concurrent ones, and "kill every process of this uid" hits exactly one run.
SANDBOX_UID_BASE, SANDBOX_UID_SPAN = 3_000_000_000, 1 << 24
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
ROOT_MODES = ("root", "root-plain")  # a throw-away uid per run, in namespaces
ISOLATED_MODES = ("root", "root-plain", "user")  # mount, network and PID namespaces
PROGRAM_DIR = "/sandbox"  # inside the sandbox: the program's fresh working directory and HOME


@dataclass
class ExecResult:
    ok: bool  # exit 0 within time and output limits
    timed_out: bool
    returncode: int  # <0: killed by that signal; under unshare a SIGKILLed program shows as 1 (unshare's own exit)
    stdout: str  # at most OUTPUT_CAP_BYTES
    stderr: str  # at most OUTPUT_CAP_BYTES
    duration_s: float = 0.0
    output_truncated: bool = False  # the program printed more than the cap and was killed
    stopped: bool = False  # the caller's stop event ended the run (the program was killed on purpose)


# ---- the filesystem the program sees ----
@functools.cache
def python_dirs() -> list[str]:
    """Directories the interpreter needs, as absolute paths: the install, the venv and its site-packages,
    each also under its real path when a symlink leads there. Nested ones are dropped (their parent's
    bind shows them). Those under a system directory come with it."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable),
             os.path.dirname(os.path.realpath(sys.executable)), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"]}  # fmt: skip
    paths |= {os.path.realpath(p) for p in paths}
    paths = sorted(p for p in paths if os.path.isdir(p))
    kept = []
    for p in paths:  # sorted: a parent comes before its children
        inside = lambda root: p == root or p.startswith(root.rstrip("/") + "/")  # noqa: E731
        if inside(PROGRAM_DIR):
            raise RuntimeError(f"{p}: the Python install lies under {PROGRAM_DIR}, the sandbox's working directory")
        if not any(inside(k) for k in kept) and not any(inside(s) for s in SYSTEM_DIRS):
            kept.append(p)
    return kept


def _fstab_path(path: str) -> str:
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


def _setup_script(workdir: str, final: list[str], tools: dict, owner: int, cgroups: list[str], user_ns: bool) -> str:
    """Shell run as the namespaces' root: join the run's cgroups, build a fresh root on a tmpfs in
    `workdir/root`, copy the program into its own tmpfs directory, pivot into the root, make it read-only,
    then exec `final` in PROGRAM_DIR. Every bind is read-only; only the three tmpfs are writable, and they
    vanish with the mount namespace, so nothing a program writes reaches the host's disk.

    The mounts are listed in two fstab files for one `mount -a` each (a dozen mounts cost ~40 ms as separate
    `mount` processes, ~15 ms this way); X-mount.mkdir creates each mount point. `user_ns`: the script runs
    in the sandbox's own user namespace ("user" mode), where it also forbids nested user namespaces (in
    "root" mode `final` does that in a user namespace of its own: here it would change the host's limit)."""
    q = shlex.quote
    mount, umount, pivot_root = (q(tools[t]) for t in ("mount", "umount", "pivot_root"))  # sbin may not be on PATH
    root = os.path.join(workdir, "root")
    at = lambda d: _fstab_path(root + d)  # noqa: E731
    # the sandbox's own /tmp and /dev/shm first: a venv that lives under /tmp is bound on top of them below
    size = f"size={TMPFS_MB}m,nr_inodes=65536"
    entries = [f"grlo-tmp {at('/tmp')} tmpfs {size},mode=1777,X-mount.mkdir 0 0",
               f"grlo-shm {at('/dev/shm')} tmpfs {size},mode=1777,X-mount.mkdir 0 0",
               f"proc {at('/proc')} proc X-mount.mkdir 0 0",
               f"grlo-work {at(PROGRAM_DIR)} tmpfs {size},mode=700,uid={owner},gid={owner},X-mount.mkdir 0 0"]  # fmt: skip
    links = []
    for d in SYSTEM_DIRS:  # a merged-/usr symlink (/bin -> usr/bin) is made again as the same symlink
        if os.path.islink(d) and os.path.isdir(d) and not os.path.isabs(os.readlink(d)):
            links.append(f"ln -s {q(os.readlink(d))} .{d}")
        elif os.path.isdir(d):
            entries.append(f"{_fstab_path(os.path.realpath(d))} {at(d)} none bind,ro,X-mount.mkdir 0 0")
    for d in python_dirs():
        entries.append(f"{_fstab_path(os.path.realpath(d))} {at(d)} none bind,ro,X-mount.mkdir 0 0")
    devices = [f"/dev/{dev} {at('/dev/' + dev)} none bind 0 0" for dev in DEVICES]  # onto empty files, made below
    for name, lines in (("mounts.fstab", entries), ("devices.fstab", devices)):
        with open(os.path.join(workdir, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return "\n".join([
        "set -e", *(f"echo 0 > {q(os.path.join(c, 'cgroup.procs'))}" for c in cgroups),
        f"{mount} --make-rprivate /", f"{mount} -t tmpfs -o size=16m,mode=755 grlo-root {q(root)}",
        f"{mount} -a -T {q(os.path.join(workdir, 'mounts.fstab'))}", f"cd {q(root)}",
        *(["echo 0 > proc/sys/user/max_user_namespaces"] if user_ns else []), *links,
        f"cp {q(os.path.join(workdir, 'main.py'))} .{PROGRAM_DIR}/main.py",
        *(f": > dev/{dev}" for dev in DEVICES), f"{mount} -a -T {q(os.path.join(workdir, 'devices.fstab'))}",
        "ln -s /proc/self/fd dev/fd", "mkdir .old", f"{pivot_root} . .old", f"{umount} -l /.old",
        f"{mount} -o remount,bind,ro /", f"cd {PROGRAM_DIR}", "exec " + " ".join(q(a) for a in final),
    ])  # fmt: skip


# ---- the layers available here ----
_caps: dict | None = None
_caps_lock = threading.Lock()
_rng = random.SystemRandom()  # not the global generator, which set_seed makes identical on every rank


def _setpriv_cmd(setpriv: str, uid: int | None) -> list[str]:
    """Drop everything before exec: no capabilities (empty bounding set), no setuid-binary escalation,
    SIGKILL if the launcher dies; as root also the throw-away uid and no supplementary groups."""
    ids = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
    return [setpriv, *ids, "--no-new-privs", "--bounding-set=-all", "--pdeathsig=SIGKILL", "--"]


def _limits(timeout_s: float, memory_mb: int) -> list[tuple[int, int]]:
    """The rlimits of a program: address space, CPU seconds, file size, open files, no core dump."""
    return [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, math.ceil(timeout_s) + 1),
            (resource.RLIMIT_FSIZE, MAX_FILE_BYTES), (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
            (resource.RLIMIT_CORE, 0)]  # fmt: skip


_PRLIMIT_FLAGS = {resource.RLIMIT_AS: "--as", resource.RLIMIT_CPU: "--cpu", resource.RLIMIT_FSIZE: "--fsize",
                  resource.RLIMIT_NOFILE: "--nofile", resource.RLIMIT_CORE: "--core"}  # fmt: skip
# Joins a new, empty session keyring, then runs main.py: the caller's session keyring (and any key in it) is
# out of reach before the program's first line. keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL), by syscall number.
# keyctl's number: x86_64's table, and the generic table arm64 and riscv64 use. Elsewhere the program keeps the
# caller's session keyring (docs/reward.md says so) rather than risk calling another syscall.
_KEYCTL_NR = {"x86_64": 250, "aarch64": 219, "riscv64": 219}.get(os.uname().machine)
_BOOT = (
    "import sys, runpy\ntry:\n    import ctypes\n    ctypes.CDLL(None, use_errno=True).syscall({nr}, 1, None)\n"
    "    del ctypes\nexcept Exception:\n    pass\nsys.argv[0] = 'main.py'\nrunpy.run_path('main.py', run_name='__main__')"
)


def _command(caps: dict, workdir: str, uid: int | None, timeout_s: float, memory_mb: int, cgroups: list[str]):
    """The full argv that runs main.py (cwd: the program's dir) under the layers in `caps`. Degraded mode has no
    prlimit: there the caller sets the rlimits (`_limit_resources`)."""
    python = [sys.executable, "-I"] + (["-c", _BOOT.format(nr=_KEYCTL_NR)] if _KEYCTL_NR else ["main.py"])
    if caps["mode"] == "degraded":
        return python
    # RLIMIT_NPROC is set last, as root or inside the user namespace: set earlier, it would count every
    # process the caller owns (a trainer's threads) against MAX_PROCS.
    limits = [f"{_PRLIMIT_FLAGS[r]}={v}:{v}" for r, v in _limits(timeout_s, memory_mb)]
    prlimit = [caps["prlimit"], *limits, f"--nproc={MAX_PROCS}:{MAX_PROCS}", "--"]
    if caps["mode"] == "uid":
        return [*prlimit, *_setpriv_cmd(caps["setpriv"], uid), *python]
    if caps["mode"] == "user":  # the namespaces' root is the caller's uid, with no power outside them
        final = [*prlimit, *_setpriv_cmd(caps["setpriv"], None), *python]
        flags = ["--user", "--map-root-user"]
    elif caps["mode"] == "root-plain":  # root where a throw-away uid may not make a user namespace
        final = [*prlimit, *_setpriv_cmd(caps["setpriv"], uid), *python]
        flags = []
    else:
        # root: the throw-away uid enters a user namespace of its own (it is root there, nowhere else), forbids
        # nested ones (a nested namespace would give a program its capabilities back), then drops every
        # capability. Its user keyrings belong to that namespace and die with it.
        inner = " ".join(shlex.quote(a) for a in [*_setpriv_cmd(caps["setpriv"], None), *python])
        final = [*prlimit, *_setpriv_cmd(caps["setpriv"], uid), caps["unshare"], "--user", "--map-root-user", "--",
                 "/bin/sh", "-c", f"set -e\necho 0 > /proc/sys/user/max_user_namespaces\nexec {inner}"]  # fmt: skip
        flags = []
    flags += ["--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
    owner = uid if caps["mode"] in ROOT_MODES else 0
    setup = _setup_script(workdir, final, caps, owner, cgroups, caps["mode"] == "user")
    return [caps["unshare"], *flags, "--", "/bin/sh", "-c", setup]


def sandbox_caps() -> dict:
    """Probe once which mode works here (see the module docstring): {"mode", "unshare", "setpriv", "prlimit",
    "why", "cgroup" (the parent groups each run's cgroup goes under; [] if none), "cgroup_why"}. A mode, and
    the cgroup, count only if a probe program really runs through them."""
    global _caps
    with _caps_lock:
        if _caps is not None:
            return _caps
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        tools = {
            name: shutil.which(name, path=search)
            for name in ("unshare", "setpriv", "prlimit", "mount", "umount", "pivot_root")
        }
        missing = [name for name, path in tools.items() if path is None]
        caps = {"mode": "degraded", **tools}
        why = f"missing tools: {', '.join(missing)}" if missing else ""
        # as root, a user namespace is the fallback (no CAP_SYS_ADMIN in a container), then the uid alone
        modes = ["root", "root-plain", "user", "uid"] if os.geteuid() == 0 else ["user"]
        for mode in [m for m in modes if not missing or (m == "uid" and tools["setpriv"] and tools["prlimit"])]:
            result = _run({**caps, "mode": mode}, "print('ok')", "", 30.0, 256)
            if result.ok and result.stdout == "ok\n":
                caps["mode"] = mode
                break
            why += f"{'; ' if why else ''}the {mode}-mode probe failed: {result.stderr.strip()[-300:] or result.returncode}"
        caps["why"] = why
        caps["cgroup"], caps["cgroup_why"] = [], "no namespaces"
        if caps["mode"] in ISOLATED_MODES:
            parents, caps["cgroup_why"] = _cgroup_parents()
            if parents:  # counts only if a probe program really runs inside the group
                result = _run({**caps, "cgroup": parents}, "print(open('/proc/self/cgroup').read())", "", 30.0, 256)
                if result.ok and "/grlo-" in result.stdout:
                    caps["cgroup"] = parents
                else:
                    caps["cgroup_why"] = f"the cgroup probe failed: {result.stderr.strip()[-300:] or result.returncode}"
        if caps["mode"] in ("uid", "degraded"):
            logger.warning("code sandbox %s (%s): %s", caps["mode"].upper(), why, "programs reach the network and see host "
                           "processes" if caps["mode"] == "uid" else "programs run with this process's uid, files and network")  # fmt: skip
        _caps = caps
        return caps


def self_check() -> dict:
    """Run a trivial program and `import numpy` in the sandbox; raise with the reason and a fix if either
    fails, so that a broken sandbox stops a run at start-up instead of scoring every program 0. Returns caps.

    In degraded mode, prints a loud warning naming the risk (once per process); as root it refuses, since
    programs would run as root, unless GRLO_ALLOW_UNSANDBOXED_CODE=1 says to go ahead."""
    caps = sandbox_caps()
    if caps["mode"] == "degraded" and os.geteuid() == 0 and os.environ.get("GRLO_ALLOW_UNSANDBOXED_CODE") != "1":
        raise RuntimeError(f"the code sandbox cannot isolate programs here ({caps['why']}), and this process is root: "
                           "model-written code would run as root with the network. Install util-linux (unshare, setpriv, "
                           "prlimit), allow namespaces, or set GRLO_ALLOW_UNSANDBOXED_CODE=1 to accept the risk.")  # fmt: skip
    for code in ("print('ok')", "import numpy; print('ok')"):
        result = run_python(code, timeout_s=60.0)
        if not (result.ok and result.stdout == "ok\n"):
            raise RuntimeError(
                f"the code sandbox ({caps['mode']} mode) cannot run `{code}`: {result.stderr.strip()[-600:] or result}. "
                f"Every code sample would score 0. Interpreter: {sys.executable}. If numpy is missing, install it "
                f"in this environment; otherwise see docs/reward.md, 'The code sandbox'.")  # fmt: skip
    if not getattr(self_check, "told", False):
        self_check.told = True
        print(f"code sandbox: {caps['mode']} mode; {memory_bound(caps)}", file=sys.stderr, flush=True)
    if caps["mode"] == "degraded" and not getattr(self_check, "warned", False):
        self_check.warned = True
        print(f"\n{'!' * 100}\nWARNING: the code sandbox is DEGRADED here ({caps['why']}).\nModel-written programs will "
              "run as YOUR user: they can read, change or delete your files (~/.ssh, your code, your checkpoints)\n"
              "and reach the network. Run as root, or enable unprivileged user namespaces "
              "(sysctl kernel.unprivileged_userns_clone=1,\nor the AppArmor userns restriction off), to isolate them.\n"
              f"{'!' * 100}\n", file=sys.stderr, flush=True)  # fmt: skip
    return caps


def memory_bound(caps: dict, memory_mb: int = 1024) -> str:
    """What bounds one program's memory here, in words, with the numbers (for memory_mb, run_python's default)."""
    files = f"3 x {TMPFS_MB} MiB of in-memory files" if caps["mode"] in ISOLATED_MODES else "files on this disk"
    if caps["cgroup"]:
        version = "v1" if any("/memory" in p for p in caps["cgroup"]) else "v2"
        return (f"cgroup {version} per program: {memory_mb + 3 * TMPFS_MB + CGROUP_SLACK_MB} MiB of memory (all of it: "
                f"heap, {files}, shm and memfd pages) and {MAX_PROCS + 4} processes")  # fmt: skip
    per_proc = memory_mb + MAX_OPEN_FILES * (MAX_FILE_BYTES >> 20)
    return (f"no cgroup ({caps['cgroup_why']}): rlimits only, at most {MAX_PROCS} processes x ({memory_mb} MiB address "
            f"space + {MAX_OPEN_FILES} open files x {MAX_FILE_BYTES >> 20} MiB memfd) = {MAX_PROCS * per_proc} MiB, plus "
            f"{files}")  # fmt: skip


# ---- running one program ----
def _limit_resources(limits: list) -> None:
    """preexec_fn of degraded mode only (elsewhere prlimit sets them, and Popen can use the cheap vfork): in
    the forked child before exec, setrlimit only (no imports, no locks: we may be threaded). RLIMIT_NPROC is
    not set here: it would count the caller's own processes."""
    for limit, value in limits:
        resource.setrlimit(limit, (value, value))


def _pids(match) -> list[int]:
    """Host pids whose /proc/<pid>/status fields satisfy `match(status)`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                with open(f"/proc/{entry}/status") as f:
                    if match(dict(line.split(":", 1) for line in f if ":" in line)):
                        out.append(int(entry))
    return out


def _kill_sandbox(proc: subprocess.Popen, caps: dict, uid: int | None) -> None:
    """SIGKILL everything the run started. Call before reaping `proc`, so its pgid cannot be reused."""
    if uid is not None:
        # kill(-1) as the run's own uid reaches every process of that uid anywhere (setsid escapees,
        # double-forked daemons) and nothing else. With namespaces it kills the namespace's init, so the
        # kernel kills and reaps the rest before unshare (our `proc`) can exit: once reaped, all are gone.
        subprocess.run(_setpriv_cmd(caps["setpriv"], uid) + ["/bin/sh", "-c", "kill -9 -1"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if caps["mode"] == "uid":  # no PID namespace: a program could kill that killer first; root finishes it
            deadline = time.monotonic() + 2.0
            while (
                left := _pids(lambda st: int(st["Uid"].split()[0]) == uid and "Z" not in st["State"])
            ) and time.monotonic() < deadline:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        return
    if caps["mode"] == "user":
        # SIGKILL the namespace's init directly (the kernel then kills the whole PID namespace): a program
        # that reset its parent-death signal and left unshare's process group would survive the killpg below.
        for pid in _pids(lambda st: int(st["PPid"]) == proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # unshare; degraded: our session (setsid escapes it)
        os.killpg(proc.pid, signal.SIGKILL)


class _Stopped(Exception):
    """The caller's stop event was set before the program started."""


def _close(fds: list) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def _feed_stdin(pipe, data: bytes) -> None:
    """In a thread, so a large stdin can never deadlock against the output we read."""
    with contextlib.suppress(OSError), pipe:  # the program may exit without reading it all
        pipe.write(data)


def run_python(
    code: str, *, stdin: str = "", timeout_s: float = 10.0, memory_mb: int = 1024, pass_fds=(), stop=None
) -> ExecResult:
    """Run untrusted `code` with `python -I` in a fresh sandbox (see the module docstring); return within
    ~timeout_s, leave nothing behind. `pass_fds`: open descriptors the program inherits under the same numbers
    (pipe ends to another sandbox); they are closed here once the program has them. `stop`: a
    threading.Event that ends the run early (the program is killed; not counted as a time-out)."""
    return _run(sandbox_caps(), code, stdin, timeout_s, memory_mb, tuple(pass_fds), stop)


def _run(caps: dict, code: str, stdin: str, timeout_s: float, memory_mb: int, pass_fds=(), stop=None) -> ExecResult:
    uid = SANDBOX_UID_BASE + _rng.randrange(SANDBOX_UID_SPAN) if caps["mode"] in ROOT_MODES + ("uid",) else None
    isolated = caps["mode"] in ISOLATED_MODES  # namespaces: own filesystem (program dir in memory), PID space, network
    start = time.monotonic()
    deadline = start + timeout_s
    proc = feeder = workdir = None
    killed = timed_out = truncated = stopped = False
    returncode = -1
    buffers, cgroups = {}, []
    to_close = list(pass_fds)  # closed exactly once: a number closed twice may be another thread's new file
    try:
        if stop is not None and stop.is_set():
            raise _Stopped
        # host side: main.py, root/ (mount point); "uid"/degraded: work/, the program's dir, on this disk
        workdir = tempfile.mkdtemp(prefix="grlo_sandbox_")
        work = workdir if isolated else os.path.join(workdir, "work")
        if not isolated:
            os.mkdir(work)
            os.chmod(workdir, 0o711)  # "uid" mode: the throw-away uid must pass through to work/, never list it
        else:
            os.mkdir(os.path.join(workdir, "root"))
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        if uid is not None and not isolated:
            os.chown(work, uid, uid)
        cgroups = _cgroup_create(caps, memory_mb)
        home = PROGRAM_DIR if isolated else work
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": "/tmp" if isolated else work,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
        degraded = caps["mode"] == "degraded"
        proc = subprocess.Popen(
            _command(caps, workdir, uid, timeout_s, memory_mb, cgroups), cwd=work, env=env, start_new_session=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
            preexec_fn=functools.partial(_limit_resources, _limits(timeout_s, memory_mb)) if degraded else None,
        )  # fmt: skip
        _close(to_close)
        feeder = threading.Thread(target=_feed_stdin, args=(proc.stdin, stdin.encode()), daemon=True)
        feeder.start()
        buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        open_fds, exited, timed_out, truncated = set(buffers), False, False, False
        poller = select.poll()
        for fd in buffers:
            poller.register(fd, select.POLLIN)
        while not truncated:
            # WNOWAIT: see the exit without reaping, so the pid (= our pgid) stays ours until the kill below.
            if not exited and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                exited = killed = True
                if not isolated:  # (a namespace died with its init) leftovers holding our pipes die now
                    _kill_sandbox(proc, caps, uid)
            if exited and not open_fds:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop.is_set()):
                timed_out = remaining <= 0 and not exited
                stopped = not timed_out and not exited
                break
            if not open_fds:  # the program closed stdout/stderr: it is exiting, or still runs
                time.sleep(min(remaining, 0.002))
                continue
            for fd, _ in poller.poll(min(remaining, 0.05) * 1000):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    open_fds.discard(fd)
                    poller.unregister(fd)
                room = OUTPUT_CAP_BYTES - len(buffers[fd])
                buffers[fd] += chunk[:room]
                truncated |= len(chunk) > room  # an output flood: stop reading, kill below
    except _Stopped:
        stopped = True
    finally:
        _close(to_close)
        if proc is not None:
            if not killed:  # deadline, output flood, or an exception here: nothing may outlive the call
                _kill_sandbox(proc, caps, uid)
            for pipe in (proc.stdout, proc.stderr):  # unblocks unshare if it writes into a full pipe
                pipe.close()
            try:
                returncode = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # cannot happen unless unshare itself hangs
                os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
        if feeder is not None:
            feeder.join(timeout=1.0)
        oom = _cgroup_remove(cgroups)
        if workdir is not None:
            remove_tree(workdir)
    out, err = (bytes(buf).decode("utf-8", "replace") for buf in buffers.values()) if buffers else ("", "")
    if oom:
        err += "\nsandbox: the run's cgroup hit its memory limit (the kernel killed a process)"
    return ExecResult(ok=returncode == 0 and not timed_out and not truncated and not oom, timed_out=timed_out,
                      returncode=-9 if oom and returncode >= 0 else returncode, stdout=out, stderr=err,
                      duration_s=time.monotonic() - start, output_truncated=truncated, stopped=stopped)  # fmt: skip


# ---- cgroups: memory the rlimits cannot see (tmpfs, shm, memfd pages) and the number of processes ----
CGROUP_SLACK_MB = 64  # for the launcher's shell and mounts, on top of memory_mb and the three tmpfs


def _cgroup_parents() -> tuple[list[str], str]:
    """Where each run's cgroup goes, and the reason when nowhere. cgroup v1 (the `memory` and `pids`
    hierarchies): a child of this process's own group in each, as root. cgroup v2: a child of
    $GRLO_SANDBOX_CGROUP, else of this process's own group, else (root) of /sys/fs/cgroup/grlo-sandbox, made
    here: the first that enables memory and pids for its children and where we may create groups. The caller
    (sandbox_caps) uses it only if a probe program really runs inside such a group."""
    own = {}
    with contextlib.suppress(OSError):
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    own[c] = path
    v1 = [os.path.join("/sys/fs/cgroup", c) for c in ("memory", "pids")]
    if all(os.path.isfile(os.path.join(d, "cgroup.procs")) for d in v1) and "memory" in own and "pids" in own:
        parents = []
        for d, c in zip(v1, ("memory", "pids")):
            mine = os.path.join(d, own[c].lstrip("/"))
            parents.append(mine if os.path.isdir(mine) else d)  # a container may see its group as the root
        if all(os.access(d, os.W_OK) for d in parents):
            return parents, ""
        return [], "cgroup v1: no write access to " + " or ".join(parents)
    if os.environ.get("GRLO_SANDBOX_CGROUP"):
        candidates = [os.environ["GRLO_SANDBOX_CGROUP"]]
    else:
        candidates = [os.path.join("/sys/fs/cgroup", own.get("", "/").lstrip("/"))]
        if os.geteuid() == 0 and os.path.isfile("/sys/fs/cgroup/cgroup.controllers"):
            # root on cgroup v2: a group of our own beside the others, with no processes in it, so that it may
            # enable memory and pids for its children (v2 forbids that to a group holding processes)
            mine = "/sys/fs/cgroup/grlo-sandbox"
            with contextlib.suppress(OSError):
                os.makedirs(mine, exist_ok=True)
                with open(os.path.join(mine, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory +pids")
            candidates.append(mine)
    for parent in candidates:
        with contextlib.suppress(OSError):
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                if {"memory", "pids"} <= set(f.read().split()) and os.access(parent, os.W_OK):
                    return [parent], ""
    return [], (f"no cgroup v1 memory+pids hierarchies, and no cgroup v2 group among {candidates} enables memory "
                "and pids for children we can create (set GRLO_SANDBOX_CGROUP to one that does)")  # fmt: skip


def _cgroup_create(caps: dict, memory_mb: int) -> list[str]:
    """A fresh group per run under each parent in caps["cgroup"], with memory and process limits."""
    limit = (memory_mb + 3 * TMPFS_MB + CGROUP_SLACK_MB) << 20
    made = []
    try:
        for parent in caps.get("cgroup") or []:
            group = os.path.join(parent, f"grlo-{os.getpid()}-{_rng.randrange(1 << 48):012x}")
            os.mkdir(group)
            made.append(group)
            files = {"memory.limit_in_bytes": limit, "memory.max": limit, "memory.swap.max": 0,
                     "memory.memsw.limit_in_bytes": limit, "pids.max": MAX_PROCS + 4}  # fmt: skip
            for name, value in files.items():
                if os.path.exists(os.path.join(group, name)):
                    with open(os.path.join(group, name), "w") as f:
                        f.write(str(value))
        return made
    except OSError:
        _cgroup_remove(made)
        raise


def _cgroup_remove(groups: list[str]) -> bool:
    """Remove the run's groups (all its processes are gone by now); True if the kernel OOM-killed in one."""
    oom = False
    for group in groups:
        for name in ("memory.oom_control", "memory.events"):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(group, name)) as f:
                    oom |= any(line.startswith("oom_kill ") and int(line.split()[1]) > 0 for line in f)
        for attempt in range(100):  # a killed namespace's last processes may take a moment to leave
            try:
                os.rmdir(group)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)
        else:
            logger.warning("sandbox: could not remove cgroup %s", group)
    return oom


# ---- clean-up of what a program left on this disk ("uid" and degraded modes) ----
def remove_tree(path: str) -> None:
    """Remove `path` whatever a program did inside it: directories of mode 0 (made writable again, as their
    owner or as root), trees deeper than Python's recursion limit (rm, which does not recurse on the stack),
    files of any mode. Raises OSError only if something really stays."""
    if not os.path.lexists(path):
        return
    with contextlib.suppress(OSError):
        shutil.rmtree(path)
    if os.path.lexists(path):
        subprocess.run(["chmod", "-R", "u+rwx", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", "--one-file-system", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.path.lexists(path):
        raise OSError(f"the sandbox could not remove {path}")
