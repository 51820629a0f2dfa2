"""Tests for reward.py: math verification, the code sandbox under attack, every code-test format,
routing, and the reward model against a hand-written forward pass."""

import base64
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ran_block_wise

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import batching  # noqa: E402
import reward  # noqa: E402
import sandbox  # noqa: E402

CAPS = sandbox.sandbox_caps()
isolated = pytest.mark.skipif(CAPS["mode"] != "root", reason="needs root with unshare + setpriv (the full sandbox)")


# ---- math ----
@pytest.mark.parametrize(
    "gold, response, expected",
    [
        ("42", "So the answer is \\boxed{42}.", 1.0),
        ("1/2", "We get \\boxed{0.5}", 1.0),  # fraction vs decimal
        ("0.5", "We get \\boxed{\\frac{1}{2}}", 1.0),
        ("\\frac{1}{2}", "\\boxed{\\dfrac12}", 1.0),  # \dfrac, braceless arguments
        ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", 1.0),  # symbolic equality
        ("x^2+1", "$\\boxed{1 + x^{2}}$", 1.0),
        ("[1,2)", "The set is \\boxed{[1, 2)}", 1.0),  # interval
        ("[1,2)", "The set is \\boxed{(1, 2)}", 0.0),  # open vs half-open
        ("{1,2}", "\\boxed{\\{2, 1\\}}", 1.0),  # set, order-free
        ("1,000", "\\boxed{1000}", 1.0),  # thousands separator
        ("1000", "\\boxed{1,000}", 1.0),
        ("5", "First \\boxed{3}, no wait: \\boxed{5}", 1.0),  # the last box counts ...
        ("3", "First \\boxed{3}, no wait: \\boxed{5}", 0.0),  # ... and only the last
        ("72", "She sold 48 + 24 = 72 clips.\n#### 72", 1.0),  # GSM8K format
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "#### 72", 1.0),  # GSM8K gold with its solution
        ("72", "48 + 24 = 72, so the final answer is 72", 1.0),  # plain final answer
        ("72", "\\boxed{71}", 0.0),
        ("72", "I do not know.", 0.0),
        ("\\text{(B)}", "\\boxed{B}", 1.0),
    ],
)
def test_math_reward_equivalences(gold, response, expected):
    assert reward.math_reward(response, gold) == expected


@pytest.mark.parametrize(
    "gold, response, expected",
    [
        ("3\\times10^8", "\\boxed{3e8}", 1.0),  # Minerva golds use E-notation, models often LaTeX, and back
        ("3e8", "\\boxed{3 \\times 10^8}", 1.0),
        ("3e8", "\\boxed{3\\cdot10^{8}}", 1.0),
        ("3e8", "\\boxed{3.0 \\times 10^{8}}", 1.0),
        ("3e8", "\\boxed{300000000}", 1.0),
        ("4.5 \\times 10^{14}", "\\boxed{4.5E14}", 1.0),
        ("1.5\\times10^{-3}", "\\boxed{1.5e-3}", 1.0),
        ("1.5e-3", "\\boxed{0.0015}", 1.0),
        ("6e+5", "\\boxed{6 \\times 10^{5}}", 1.0),
        ("3\\times10^{8}", "#### 3e8", 1.0),
        ("3\\times10^{8}", "\\boxed{3e8 \\text{ m/s}}", 1.0),
        ("\\frac{1}{3e8}", "\\boxed{\\frac{1}{3\\times10^{8}}}", 1.0),  # 3e8 stays one number
        ("3e8", "\\boxed{3\\times10^9}", 0.0),  # wrong exponent
        ("3\\times10^9", "\\boxed{3e8}", 0.0),
        ("3e8", "\\boxed{38}", 0.0),  # the e must not just vanish
        ("38", "\\boxed{3e8}", 0.0),
        ("1.5e-3", "\\boxed{0.0016}", 0.0),
        ("3\\times10^{-8}", "\\boxed{4E-8}", 0.0),  # as a float, verify() would round 4E-8 to 0.000000
        ("1.6e-12", "\\boxed{1.6 \\times 10^{-12}}", 1.0),
        ("1.6e-12", "\\boxed{1.7 \\times 10^{-12}}", 0.0),
        ("1.6e-19", "\\boxed{3.2e-19}", 0.0),  # below 1e-12 verify() sees no difference in LaTeX: not rewritten
        ("6.6e-34", "\\boxed{1.6e-19}", 0.0),
        ("2e", "\\boxed{2e}", 1.0),  # Euler's number stays a symbol ...
        ("2e", "\\boxed{2 e}", 1.0),
        ("2e", "\\boxed{2e1}", 0.0),  # ... and 2e1 is 20, not 2 * e * 1
        ("20", "\\boxed{2e1}", 1.0),
        ("e^{x}", "\\boxed{e^x}", 1.0),
        ("2e^{2}", "\\boxed{2e^2}", 1.0),
        ("e-1", "\\boxed{e - 1}", 1.0),
        ("2e^{2}", "\\boxed{2e2}", 0.0),
        ("2e-1", "\\boxed{0.2}", 1.0),  # the one ambiguous spelling reads as E-notation, not 2e - 1
    ],
)
def test_math_reward_scientific_notation(gold, response, expected):
    assert reward.math_reward(response, gold) == expected


@pytest.mark.parametrize(
    "garbage",
    ["", "\\boxed{", "\\boxed{}", "}}}{{{\\frac", "\\boxed{\\frac{1}{0}}", "9" * 100_000, "\x00\udcff"],
)
def test_math_reward_garbage_is_zero(garbage):
    start = time.monotonic()
    assert reward.math_reward(garbage, "5") == 0.0
    assert reward.math_reward("\\boxed{5}", garbage) == 0.0  # a broken gold scores 0 too, never raises
    assert time.monotonic() - start < 2 * reward.MATH_TIMEOUT_S + 5


def test_math_reward_hanging_expression_is_bounded():
    before = reward.MATH_FAILURES["timeout"]
    start = time.monotonic()
    assert reward.math_reward("\\boxed{2003^{2002^{2001}}}", "5") == 0.0  # hangs sympy without the deadline
    assert time.monotonic() - start < reward.MATH_TIMEOUT_S + 3
    assert reward.MATH_FAILURES["timeout"] == before + 1
    assert reward.math_reward("\\boxed{5}", "5") == 1.0  # the killed worker was replaced


def test_math_reward_from_threads():
    # signal.alarm-based timeouts would raise "signal only works in main thread" here.
    cases = [(f"\\boxed{{{i}}}", str(i), 1.0) for i in range(12)]
    cases += [(f"\\boxed{{{i}}}", str(i + 1), 0.0) for i in range(12)]
    cases.append(("\\boxed{2003^{2002^{2001}}}", "5", 0.0))
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: reward.math_reward(c[0], c[1], timeout_s=1.0), cases))
    assert got == [c[2] for c in cases]
    assert time.monotonic() - start < 30


# ---- sandbox ----
def live(status: dict) -> bool:
    return not status["State"].strip().startswith("Z")


def sandbox_processes(include_zombies: bool = True) -> list[int]:
    """Host pids whose real uid is in the sandbox range: must be empty after every run_python call."""
    in_range = lambda st: 0 <= int(st["Uid"].split()[0]) - sandbox.SANDBOX_UID_BASE < sandbox.SANDBOX_UID_SPAN  # noqa: E731
    return sandbox._pids(lambda st: in_range(st) and (include_zombies or live(st)))


def attack(code: str, timeout_s: float = 2.0, **kwargs) -> sandbox.ExecResult:
    start = time.monotonic()
    result = sandbox.run_python(code, timeout_s=timeout_s, **kwargs)
    assert time.monotonic() - start < timeout_s + 3, "run_python overran its deadline"
    assert sandbox_processes() == [], "a sandboxed process outlived the call"
    return result


@pytest.fixture
def drop_dir():
    """A world-writable directory, so sandboxed code can leave evidence for the test."""
    path = tempfile.mkdtemp(prefix="grlo_test_drop_")
    os.chmod(path, 0o777)
    yield Path(path)
    subprocess.run(["rm", "-rf", path])


def test_sandbox_layers_found_where_they_work():
    # Guards the probe: on a root machine with the tools, a silent fallback would skip the attack tests.
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("not root, or unshare/setpriv missing")
    assert CAPS["mode"] == "root", CAPS["why"]


def test_run_python_basics():
    code = "import os, sys\nprint(sys.stdin.read().upper())\nprint(os.getcwd())\nprint('e', file=sys.stderr)"
    result = sandbox.run_python(code, stdin="hello")
    assert result.ok and not result.timed_out and result.returncode == 0
    shout, cwd = result.stdout.split()
    assert shout == "HELLO" and result.stderr == "e\n"
    assert not os.path.exists(cwd), "the temp dir must be removed"
    failed = sandbox.run_python("raise SystemExit(3)")
    assert not failed.ok and failed.returncode == 3


def test_big_stdin_and_output_round_trip():
    data = "".join(f"{i}\n" for i in range(300_000))  # ~2 MB, more than a pipe buffer each way
    result = sandbox.run_python("import sys\nsys.stdout.write(sys.stdin.read())", stdin=data)
    assert result.ok and result.stdout == data


def test_attack_infinite_loop():
    result = attack("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and not result.ok


def test_attack_ignores_sigterm():
    code = (
        "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.1)"
    )
    result = attack(code, timeout_s=1.0)
    assert result.timed_out and not result.ok


def test_attack_memory_bomb():
    result = attack("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 26))", timeout_s=5.0, memory_mb=512)
    assert not result.ok and not result.timed_out and "MemoryError" in result.stderr
    assert sandbox.run_python("x = bytearray(1 << 28)", memory_mb=512).ok  # 256 MB still fits


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_attack_output_flood(stream):
    start = time.monotonic()
    result = attack(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 65536)", timeout_s=10.0)
    assert result.output_truncated and not result.ok
    assert len(getattr(result, stream)) == sandbox.OUTPUT_CAP_BYTES
    assert time.monotonic() - start < 5, "a flood is cut at the cap, not at the deadline"


@isolated
def test_attack_fork_storm_does_not_starve_the_host_or_other_sandboxes():
    storm = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    thread = threading.Thread(target=attack, args=(storm, 3.0))
    thread.start()
    time.sleep(1.0)  # the storm is at its RLIMIT_NPROC ceiling now
    bystander = sandbox.run_python("import threading; t = threading.Thread(target=print, args=('ok',)); t.start()")
    assert bystander.ok and bystander.stdout == "ok\n", bystander  # its own uid, its own process budget
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork
    thread.join()
    assert sandbox_processes() == []


DAEMON = """
import ctypes, os, time
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        {close}
        ctypes.CDLL(None).prctl(15, b"{marker}")  # PR_SET_NAME: the test finds the daemon by this name
        os.write(ready_w, b"1")
        time.sleep(60)
        os._exit(0)
    os._exit(0)
os.close(ready_w)
print("daemon started" if os.read(ready_r, 1) == b"1" else "no daemon", flush=True)
print("parent exits", flush=True)
"""


def new_marker() -> str:
    """A process name (at most 15 characters) no other process has."""
    return "grlo" + os.urandom(5).hex()


def marked_processes(marker: str) -> list[int]:
    """Live host pids named `marker` (whatever their uid or namespace)."""
    return sandbox._pids(lambda st: st["Name"].strip() == marker and live(st))


@isolated
@pytest.mark.parametrize("holds_pipes", [False, True])
def test_attack_double_forked_daemon(holds_pipes):
    close = "pass" if holds_pipes else "os.close(0); os.close(1); os.close(2)"
    marker = new_marker()
    start = time.monotonic()
    result = attack(DAEMON.format(close=close, marker=marker), timeout_s=10.0)
    assert result.ok and sorted(result.stdout.splitlines()) == ["daemon started", "parent exits"], result
    assert time.monotonic() - start < 3, "a daemon holding our pipes must not stall the call until the deadline"
    assert marked_processes(marker) == [], "the daemon outlived the call"


@isolated
def test_attack_program_leaves_our_process_group():
    result = attack("import os, time\nos.setsid()\ntime.sleep(60)", timeout_s=1.0)
    assert result.timed_out


@isolated
def test_without_namespaces_the_uid_kill_still_cleans_up(monkeypatch):
    # "uid" mode (root without unshare): no PID namespace, so only the per-run uid kill stops a daemon.
    # Without a namespace the killed daemon is reaped by the host's init, not before we return: poll briefly.
    monkeypatch.setattr(sandbox, "_caps", {**CAPS, "mode": "uid"})
    marker = new_marker()
    outputs = []
    for code, timeout_s in ((DAEMON.format(close="pass", marker=marker), 5.0),
                            ("import os, time\nos.setsid()\ntime.sleep(60)", 1.0)):  # fmt: skip
        start = time.monotonic()
        outputs.append(sandbox.run_python(code, timeout_s=timeout_s).stdout)
        assert time.monotonic() - start < timeout_s + 3
        while (
            sandbox_processes(include_zombies=False) or marked_processes(marker)
        ) and time.monotonic() - start < timeout_s + 4:
            time.sleep(0.05)
        assert sandbox_processes(include_zombies=False) == [] and marked_processes(marker) == []
    assert "daemon started" in outputs[0]  # the daemon really ran, so the cleanup above proves something
    deadline = time.monotonic() + 5  # killed, but reaped by the host's init: let it, before the next test counts
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)


@isolated
@pytest.mark.parametrize("mode, blocked_by", [("root", "FileNotFoundError"), ("uid", "PermissionError")])
def test_attack_deletes_files_outside_its_dir(tmp_path, monkeypatch, mode, blocked_by):
    # root mode: the host's files are not in the sandbox's filesystem at all; "uid" mode (no namespaces):
    # they are, but the throw-away uid may not touch them
    monkeypatch.setattr(sandbox, "_caps", {**CAPS, "mode": mode})
    private = tmp_path / "victim.txt"  # under pytest's 0700 directories
    private.write_text("precious")
    shared_dir = Path(tempfile.mkdtemp(prefix="grlo_test_shared_"))
    os.chmod(shared_dir, 0o755)  # readable by anyone, writable by root only
    shared = shared_dir / "victim.txt"
    shared.write_text("precious")
    shared.chmod(0o666)  # even a world-writable FILE cannot be deleted without write access to its dir
    code = f"""
import os, shutil
for path in ({str(private)!r}, {str(shared)!r}):
    try:
        os.remove(path)
        print("removed", path)
    except OSError as e:
        print("blocked", type(e).__name__)
try:
    shutil.rmtree({str(shared_dir)!r})
except OSError as e:
    print("blocked", type(e).__name__)
"""
    try:
        result = attack(code)
        assert result.stdout.count(f"blocked {blocked_by}") == 3, result.stdout
        assert private.read_text() == "precious" and shared.exists()
    finally:
        subprocess.run(["rm", "-rf", str(shared_dir)])


@isolated
def test_attack_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # control: the port is reachable
        server.accept()[0].close()
        code = f"""
import socket
for host in ("127.0.0.1", "1.1.1.1"):
    try:
        socket.create_connection((host, {port}), timeout=2)
        print("CONNECTED", host)
    except OSError as e:
        print("blocked", host, e)
"""
        result = attack(code, timeout_s=6.0)
        assert "CONNECTED" not in result.stdout and result.stdout.count("blocked") == 2
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_attack_reads_parent_secrets(monkeypatch):
    monkeypatch.setenv("GRLO_TEST_SECRET", "hunter2-do-not-leak")
    code = f"""
import os
print(dict(os.environ))
for pid in ("self", "1", str(os.getppid()), "{os.getpid()}"):
    try:
        print(open(f"/proc/{{pid}}/environ", "rb").read())
    except OSError as e:
        print("blocked", pid, type(e).__name__)
"""
    result = attack(code)
    assert result.ok and "PATH" in result.stdout  # the program ran and printed its environment
    assert "hunter2" not in result.stdout + result.stderr


@isolated
def test_attack_kills_parent():
    code = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e:
        print("blocked", type(e).__name__)
try:
    os.killpg(os.getpgid(0), signal.SIGKILL)
except OSError as e:
    print("blocked", type(e).__name__)
print("still here")
"""
    result = attack(code)
    assert result.ok and "still here" in result.stdout  # nor did it take down its own launcher
    os.kill(os.getpid(), 0)  # we are alive (else this line never runs); and so is our parent:
    os.kill(os.getppid(), 0)


def test_attack_deep_recursion():
    # Recursion through C (eval) overflows the C stack: a segfault, and no core dump (RLIMIT_CORE=0).
    crash = attack("import sys\nsys.setrecursionlimit(10 ** 9)\ndef f():\n    return eval('f()')\nf()", timeout_s=5.0)
    assert not crash.ok and not crash.timed_out and crash.returncode == -signal.SIGSEGV
    # Python-to-Python calls live on the heap in 3.11+: bounded by RLIMIT_AS or the deadline.
    deep = attack("import sys\nsys.setrecursionlimit(10 ** 9)\ndef f(n):\n    return f(n + 1) + 1\nf(0)")
    assert not deep.ok
    plain = attack("def f(n):\n    return f(n + 1)\nf(0)")
    assert not plain.ok and "RecursionError" in plain.stderr


# ---- code_reward: every test format as it comes from the hub ----
def lcb_compress(cases: list[dict]) -> str:
    """LiveCodeBench's private_test_cases encoding."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\nHope it helps."


def test_extract_code():
    two = "```python\nx = 1\n```\ntext\n```python\nx = 2\n```\n```text\nnot code\n```"
    assert reward.extract_code(two) == "x = 2\n"
    assert reward.extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert reward.extract_code("def f():\n    return 1") == "def f():\n    return 1"


HUMANEVAL_ROW = {  # evalplus/humanevalplus shape
    "task_id": "HumanEval/0",
    "prompt": "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    '    """ Check if any two numbers are closer to each other than threshold. """\n',
    "canonical_solution": "    return any(abs(a - b) < threshold\n"
    "               for i, a in enumerate(numbers) for b in numbers[i + 1:])\n",
    "entry_point": "has_close_elements",
    "test": "\n\nMETADATA = {'author': 'jt', 'dataset': 'test'}\n\n\ndef check(candidate):\n"
    "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
    "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
    "    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n",
}


def test_code_reward_humaneval():
    signature = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    whole = signature + HUMANEVAL_ROW["canonical_solution"]
    assert reward.code_reward(fenced(whole), HUMANEVAL_ROW) == 1.0  # `List` comes from the prompt's import
    assert reward.code_reward(fenced(HUMANEVAL_ROW["canonical_solution"]), HUMANEVAL_ROW) == 1.0  # body only
    wrong = "def has_close_elements(numbers, threshold):\n    return False"
    assert reward.code_reward(fenced(wrong), json.dumps(HUMANEVAL_ROW)) == 0.0  # JSON string accepted


MBPP_ROW = {  # google-research-datasets/mbpp shape
    "task_id": 11,
    "text": "Write a python function to remove first and last occurrence of a given character from the string.",
    "code": "...",
    "test_list": [
        'assert remove_Occ("hello","l") == "heo"',
        'assert remove_Occ("abcda","a") == "bcd"',
        'assert remove_Occ("PHP","P") == "H"',
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}
MBPP_SOLUTION = (
    "def remove_Occ(s, ch):\n    i = s.find(ch)\n    s = s[:i] + s[i + 1:] if i >= 0 else s\n"
    "    j = s.rfind(ch)\n    return s[:j] + s[j + 1:] if j >= 0 else s"
)


def test_code_reward_mbpp():
    assert reward.code_reward(fenced(MBPP_SOLUTION), MBPP_ROW) == 1.0
    memorised = "def remove_Occ(s, ch):\n    return {'hello': 'heo'}.get(s, s)"  # passes the first assert only
    assert reward.code_reward(fenced(memorised), MBPP_ROW) == 0.0
    assert reward.code_reward(fenced(memorised), MBPP_ROW, all_or_nothing=False) == pytest.approx(1 / 3)


MBPP_PLUS_ROW = {  # evalplus/mbppplus shape: base asserts + a numpy-based `test` script
    "task_id": 17,
    "prompt": "Write a function that returns the perimeter of a square given its side length as input.",
    "code": "def square_perimeter(a):\n  return 4*a",
    "test_imports": ["import math"],
    "test_list": ["assert square_perimeter(10)==40", "assert math.isclose(square_perimeter(2.5), 10.0)"],
    "test": "import numpy as np\n\ndef assertion(out, exp, atol):\n    if atol == 0 and isinstance(exp, float):\n"
    "        atol = 1e-6\n    if atol != 0:\n        assert np.allclose(out, exp, rtol=1e-07, atol=atol)\n"
    "    else:\n        assert out == exp, f'out: {out}, exp: {exp}'\n\n"
    "inputs = [[10], [5], [4], [-3], [0.5]]\nresults = [40, 20, 16, -12, 2.0]\n"
    "for i, (inp, exp) in enumerate(zip(inputs, results)):\n    assertion(square_perimeter(*inp), exp, 0)\n",
}


def test_code_reward_mbpp_plus():
    assert reward.code_reward(fenced("def square_perimeter(a):\n    return 4 * a"), MBPP_PLUS_ROW) == 1.0
    positive_only = "def square_perimeter(a):\n    return 4 * abs(a)"  # passes the base asserts, not the -3 case
    assert reward.code_reward(fenced(positive_only), MBPP_PLUS_ROW) == 0.0
    assert reward.code_reward(fenced(positive_only), MBPP_PLUS_ROW, all_or_nothing=False) == pytest.approx(2 / 3)


LCB_STDIN_ROW = {  # livecodebench/code_generation_lite shape (the lighteval parquet copy)
    "question_title": "Sum",
    "platform": "atcoder",
    "starter_code": "",
    "public_test_cases": json.dumps([{"input": "3\n1 2 3\n", "output": "6\n", "testtype": "stdin"}]),
    "private_test_cases": lcb_compress(
        [
            {"input": "2\n-5 5\n", "output": "0\n", "testtype": "stdin"},
            {"input": "1\n7\n", "output": "7\n", "testtype": "stdin"},
        ]
    ),
    "metadata": "{}",
}


def test_code_reward_livecodebench_stdin():
    solution = "n = int(input())\nprint(sum(map(int, input().split())), '  ')\nprint()"  # extra whitespace is fine
    assert reward.code_reward(fenced(solution), LCB_STDIN_ROW) == 1.0
    positives = "input()\nprint(sum(x for x in map(int, input().split()) if x > 0))"  # wrong on "-5 5"
    assert reward.code_reward(fenced(positives), LCB_STDIN_ROW) == 0.0
    assert reward.code_reward(fenced(positives), LCB_STDIN_ROW, all_or_nothing=False) == pytest.approx(2 / 3)
    assert reward.code_reward(fenced("print(6)"), LCB_STDIN_ROW, all_or_nothing=False) == pytest.approx(1 / 3)


def test_code_reward_livecodebench_functional():
    row = {
        "public_test_cases": json.dumps([{"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"}]),
        "private_test_cases": lcb_compress([{"input": "[3,2,4]\n6", "output": "[1, 2]", "testtype": "functional"}]),
        "metadata": json.dumps({"func_name": "twoSum"}),
    }
    solution = (
        "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
        "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return (seen[target - x], i)\n            seen[x] = i\n"
    )
    assert reward.code_reward(fenced(solution), row) == 1.0
    assert reward.code_reward(fenced(solution.replace("target - x in", "x in")), row) == 0.0


def test_code_reward_apps_input_output():
    row = {"input_output": json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]})}
    assert reward.code_reward(fenced("print(sum(map(int, input().split())))"), row) == 1.0
    plain = {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}
    assert reward.code_reward(fenced("print(3)"), plain, all_or_nothing=False) == 0.5
    with pytest.raises(ValueError, match="fn_name"):
        reward.code_reward("x", {"input_output": json.dumps({"inputs": [[1]], "outputs": [[1]], "fn_name": "f"})})


def test_code_reward_bundled_rows_and_pass_fraction():
    rows = [json.loads(line) for line in open(ROOT / "data" / "code_tasks.jsonl")]
    solutions = [json.loads(line) for line in open(ROOT / "data" / "code_tasks_solutions.jsonl")]
    solutions = {s["index"]: s["solution"] for s in solutions}
    good = [solutions[row["extra_info"]["index"]] for row in rows]
    swapped = good[1:] + good[:1]  # every solution answers another task
    rewards, stats, outcomes = reward.compute_rewards(rows + rows, good + swapped)
    assert rewards == [1.0] * len(rows) + [0.0] * len(rows)
    assert stats["rewards/code_mean"] == 0.5 and stats["rewards/code_timeout"] == 0
    assert stats["rewards/code_pass"] == len(rows) and all(o.startswith("pass: ") for o in outcomes[: len(rows)])
    truth = rows[0]["reward_model"]["ground_truth"]  # reverse_string, 4 asserts
    half = fenced("def reverse_string(s):\n    return s")  # passes the '' and 'racecar' asserts only
    assert reward.code_reward(half, truth) == 0.0
    assert reward.code_reward(half, truth, all_or_nothing=False) == 0.5


def test_code_reward_cannot_be_forged():
    truth = {"entry_point": "f", "test_list": ["assert f() == 1"]}
    forger = (
        "import re, os, sys\nfor nonce in re.findall(r'[0-9a-f]{32}', open(sys.argv[0]).read()) + ['0' * 32]:\n"
        "    print(f'\\n{nonce} 0 1', flush=True)\nos._exit(0)"
    )
    assert reward.code_reward(fenced(forger), truth) == 0.0
    assert reward.code_reward(fenced("def f():\n    return 1\nimport os\nos._exit(0)"), truth) == 0.0  # early exit
    assert reward.code_reward(fenced("def f():\n    return 1\nraise SystemExit(0)"), truth) == 1.0  # tests still run
    assert reward.code_reward(fenced("def f():\n    return 1"), truth) == 1.0


def test_code_reward_timeout_is_counted(monkeypatch):
    truth = json.dumps({"entry_point": "f", "test_list": ["assert f() == 1"]})
    looping = fenced("def f():\n    while True:\n        pass")
    monkeypatch.setattr(reward, "CODE_TIMEOUT_S", 1.0)
    start = time.monotonic()
    row = {"ability": "code", "reward_model": {"style": "rule", "ground_truth": truth}}
    rewards, stats, outcomes = reward.compute_rewards([row], [looping])
    assert rewards == [0.0] and stats["rewards/code_timeout"] == 1 and outcomes[0].startswith("timeout: 0/1")
    assert time.monotonic() - start < 4


# ---- routing ----
def test_compute_rewards_routing_rule_rows():
    code_truth = json.dumps({"entry_point": "f", "test_list": ["assert f(2) == 4"]})
    rows = [
        {"ability": "math", "reward_model": {"style": "rule", "ground_truth": "4"}},
        {"ability": "math", "reward_model": {"style": "rule", "ground_truth": "4"}},
        {"ability": "code", "reward_model": {"style": "rule", "ground_truth": code_truth}},
        {"ability": "general", "reward_model": {"style": "rule", "ground_truth": code_truth}},  # by shape: code
        {"ability": "general", "reward_model": {"style": "rule", "ground_truth": "4"}},  # by shape: math
    ]
    good_code = fenced("def f(x):\n    return x * x")
    responses = ["\\boxed{4}", "\\boxed{5}", good_code, good_code, "so it is \\boxed{4}"]
    rewards, stats, _ = reward.compute_rewards(rows, responses, max_workers=2)
    assert rewards == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert stats["rewards/math_mean"] == pytest.approx(2 / 3) and stats["rewards/code_mean"] == 1.0
    assert stats["rewards/math_failures"] == 0 and "rewards/model_mean" not in stats


def test_compute_rewards_errors():
    with pytest.raises(ValueError, match=r"'judge'.*index=7"):
        reward.compute_rewards([{"reward_model": {"style": "judge"}, "extra_info": {"index": 7}}], ["x"])
    with pytest.raises(ValueError, match="no RewardModel"):
        reward.compute_rewards([{"prompt": [], "reward_model": {"style": "model", "ground_truth": ""}}], ["x"])


# ---- reward model ----
def reference_score(model, tokenizer, messages, response) -> float:
    """Hand-written: render, tokenize without special tokens, one unpadded sample, logit at the last token."""
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        return model.score(hidden)[0, -1, 0].item()


@pytest.fixture(scope="module")
def rm(tiny_models):
    return reward.RewardModel(tiny_models["reward"], batch_size=3)


SAMPLES = [
    ([{"role": "user", "content": "Write a detailed guide on cooking."}], "First, heat the pan. " * 7),
    ([{"role": "user", "content": "hello"}], "hi"),
    ([{"role": "system", "content": "be good"}, {"role": "user", "content": "explain science"}], "Because therefore."),
    ([{"role": "user", "content": "how many apples?"}], "3 apples + 4 apples = 7 apples, so \\boxed{7}. " * 3),
    ([{"role": "user", "content": "travel"}], ""),
]


def test_reward_model_matches_hand_forward_pass(rm):
    # Pool on a pad id that occurs in every conversation (<|im_end|>), as when pad == EOS: our pooling
    # uses the attention mask, so scores must not move.
    rm.model.config.pad_token_id = rm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    scores = rm.score([m for m, _ in SAMPLES], [r for _, r in SAMPLES])  # 5 samples, batches of 3, padded
    expected = [reference_score(rm.model, rm.tokenizer, m, r) for m, r in SAMPLES]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 4) for s in scores)) == len(scores)  # distinct inputs, distinct scores
    assert rm.last_num_truncated == 0
    with_eos = rm.score([SAMPLES[1][0]], [SAMPLES[1][1] + "<|im_end|>"])  # decoded with special tokens
    assert with_eos == pytest.approx([expected[1]], abs=1e-4)


def test_shared_prefix_attention_equals_sdpa_with_the_whole_mask():
    """The block-wise attention skips only blocks the shared-prompt mask hides: same outputs and gradients as sdpa
    over the whole (L, L) mask, with GQA, a left-padded prefix, padded and empty slots."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

    torch.manual_seed(0)
    P, S, C = 4, 3, 5
    seg = torch.full((2, P + S * C), -1)
    seg[0, 1:P], seg[1, :P] = 0, 0  # row 0's prompt is one token shorter (left padding)
    for k, n in enumerate((5, 2, 3)):
        seg[0, P + k * C : P + k * C + n] = k + 1
    for k, n in enumerate((4, 1)):  # row 1: two samples, its third slot stays empty
        seg[1, P + k * C : P + k * C + n] = k + 1
    mask = batching.shared_prefix_mask(seg)
    q = torch.randn(2, 4, P + S * C, 8, requires_grad=True)
    kv = [torch.randn(2, 2, P + S * C, 8, requires_grad=True) for _ in range(2)]
    outs, grads = [], []
    for fn, extra in (
        (sdpa_attention_forward, {}),
        (batching.shared_prefix_attention, {"shared_prefix_slots": (S, C)}),
    ):
        out, _ = fn(Attn(), q, *kv, mask, scaling=0.3, **extra)
        weights = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        outs.append(out.detach())
        grads.append(torch.autograd.grad((out * weights).sum(), [q, *kv]))
    assert outs[0].shape == outs[1].shape == (2, P + S * C, 4, 8)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_importing_reward_registers_no_attention():
    """Importing reward.py (or batching.py) has no side effects: the shared-prefix attention is registered with
    transformers only by batching.use_shared_prefix_attention (it used to be registered at import)."""
    code = "import reward, batching, distributed, generation, bookkeeping; from transformers import AttentionInterface as A; print(sorted(A._global_mapping))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "sdpa" in out and batching.SHARED_PREFIX_ATTENTION not in out


def test_shared_prefix_attention_refuses_attention_that_misreads_the_mask(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], attn_implementation="eager")
    with pytest.raises(ValueError, match=r"tiny-qwen3: --share-prompt needs sdpa attention, the model uses 'eager'"):
        batching.use_shared_prefix_attention(model, "tiny-qwen3")
    model.set_attn_implementation("sdpa")
    batching.use_shared_prefix_attention(model, "tiny-qwen3")
    assert model.config._attn_implementation == batching.SHARED_PREFIX_ATTENTION


def test_reward_model_shared_prefix_gives_the_same_scores(tiny_models, rm, sdpa_calls):
    """share_prefix (the --share-prompt layout): groups of the same prompt in one row each give the per-sample scores,
    with groups of different sizes, an empty response, a singleton, and a row larger than batch_size."""
    shared = reward.RewardModel(tiny_models["reward"], batch_size=3, share_prefix=True)
    group = lambda k: [SAMPLES[k][0]] * 4  # noqa: E731
    prompts = group(0) + [SAMPLES[1][0]] + group(3) + group(4)[:2] + [SAMPLES[2][0]] * 2
    responses = (["First.", "First, heat the pan. " * 5, "Second", ""] + ["hi"]
                 + ["3 apples", "so \\boxed{7}. " * 3, "7", "seven apples"] + ["", "go"] + ["Because.", "Because therefore."])  # fmt: skip
    want = rm.score(prompts, responses)
    assert shared.model.config._attn_implementation == batching.SHARED_PREFIX_ATTENTION
    sdpa_calls.clear()
    got = shared.score(prompts, responses)
    assert got == pytest.approx(want, abs=1e-4)
    assert ran_block_wise(sdpa_calls), sdpa_calls[:4]  # per layer P x P, then C x (P + C), never L x L
    assert len(set(round(x, 4) for x in want)) > len(want) - 2  # the scores compared differ from one another


def test_reward_model_truncates_the_response_from_the_left(tiny_models):
    rm = reward.RewardModel(tiny_models["reward"], max_length=48)
    messages, long_response = SAMPLES[0][0], " ".join(f"step {i}." for i in range(60))
    tok = rm.tokenizer
    full = tok(
        tok.apply_chat_template(messages + [{"role": "assistant", "content": long_response}], tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    prompt_text = tok.apply_chat_template(messages, tokenize=False) + "<|im_start|>assistant\n"
    head = tok(prompt_text, add_special_tokens=False)["input_ids"]  # what must survive at the start
    kept, cut = rm._encode(messages, long_response)
    assert cut and len(full) > 48 and len(kept) == 48
    assert kept == full[: len(head)] + full[len(full) - (48 - len(head)) :]  # prompt start + end of response
    assert tok.decode(kept[-2:]) == "<|im_end|>\n"  # the closing template tokens survive
    scores = rm.score([messages, SAMPLES[1][0], messages], [long_response, "hi", long_response])
    assert rm.last_num_truncated == 2 and rm.num_truncated == 2
    rm.score([SAMPLES[1][0]], ["hi"])
    assert rm.last_num_truncated == 0 and rm.num_truncated == 2
    with torch.no_grad():
        direct = rm.model.score(rm.model.model(input_ids=torch.tensor([kept])).last_hidden_state)[0, -1, 0].item()
    assert scores[0] == pytest.approx(direct, abs=1e-4) and scores[2] == pytest.approx(direct, abs=1e-4)


def test_compute_rewards_routes_model_rows(rm):
    rows = [
        {"prompt": m, "reward_model": {"style": "model", "ground_truth": ""}, "extra_info": {"index": i}}
        for i, (m, _) in enumerate(SAMPLES[:3])
    ]
    rows.append({"ability": "math", "reward_model": {"style": "rule", "ground_truth": "7"}})
    responses = [r for _, r in SAMPLES[:3]] + [SAMPLES[3][1]]
    rewards, stats, _ = reward.compute_rewards(rows, responses, rm)
    assert rewards[:3] == pytest.approx(rm.score([m for m, _ in SAMPLES[:3]], responses[:3]), abs=1e-5)
    assert rewards[3] == 1.0
    assert stats["rewards/model_mean"] == pytest.approx(sum(rewards[:3]) / 3)
    assert stats["rewards/rm_truncated"] == 0 and stats["rewards/math_mean"] == 1.0


# ---- the sandbox for an ordinary user, and for a venv in a private directory ----
def private_env(owner_uid: int) -> dict:
    """A private (0700) directory owned by `owner_uid`, as `mktemp -d` and home directories are, holding a venv
    made by the system Python (no pip) with numpy copied in, a clone (sandbox.py and the attack driver), and a
    HOME with a fake SSH key. The sandbox's throw-away uid cannot traverse it."""
    import numpy

    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if (
        system_python is None
        or subprocess.run(
            [system_python, "-c", f"import sys; assert sys.version_info[:2] == {tuple(sys.version_info[:2])}"]
        ).returncode
    ):
        pytest.skip("needs a system python3 of this Python's version (numpy is copied in, not installed)")
    base = Path(tempfile.mkdtemp(prefix="grlo_private_"))  # 0700
    venv = base / "venv"
    subprocess.run([system_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    src = Path(numpy.__file__).parent
    for name in (src.name, src.name + ".libs"):
        if (src.parent / name).exists():
            shutil.copytree(src.parent / name, site / name, symlinks=True)
    clone = base / "clone"
    clone.mkdir()
    for path in ("sandbox.py", "code_judge.py", "tests/sandbox_user_check.py", "tests/reward_hacks.py"):
        shutil.copy(ROOT / path, clone)
    with open(clone / "plans.json", "w") as f:  # every reward hack in every format, as reward.code_plan maps it
        json.dump(hack_plans(), f)
    home = base / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nGRLOFAKEKEY0123456789\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    (home / "victim.txt").write_text("precious")
    (home / ".bashrc").write_text("# the user's own\n")
    subprocess.run(["chown", "-R", f"{owner_uid}:{owner_uid}", str(base)], check=True)
    return {"base": base, "python": str(venv / "bin/python"), "clone": clone, "home": home}


def hack_plans() -> list:
    from reward_hacks import ATTACKS, program
    from test_judge import FORMATS

    plans = []
    for attack in ATTACKS:
        for fmt, (row, stub) in FORMATS.items():
            kind, plan = reward.code_plan(fenced(program(attack, stub)), row)
            plans.append({"attack": attack, "format": fmt, "kind": kind, "plan": plan})
    return plans


def _userns_for(uid: int) -> bool:
    """Whether `uid` may create a user namespace with mounts here (unprivileged user namespaces enabled)."""
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "unshare", "--user", "--map-root-user",
           "--mount", "true"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become an ordinary user")
@pytest.mark.parametrize("uid, mode", [(65534, "user"), (0, "root")])
def test_attack_suite_for_an_ordinary_user_and_for_root(uid, mode):
    """The attack driver, run by uid 65534 (or root) from its private 0700 directory with its own venv: its
    files, key and HOME untouched, its venv and code unwritable, numpy importable, no network, nothing left
    running, the host attacks of reward_hacks.py contained, and every reward hack in every format scored 0
    through code_judge. (Before sandbox.py's mount namespace, as uid 65534: the delete, the key read, the HOME,
    venv and code writes went through; before code_judge.py the reward hacks scored 1.0, and the deep tree,
    disk and memfd fill, nested namespace and keyring attacks got through.)"""
    if uid and not _userns_for(uid):
        pytest.skip("unprivileged user namespaces are disabled here: the sandbox degrades (and says so)")
    env = private_env(uid)
    of_uid = lambda st: int(st["Uid"].split()[0]) == uid and live(st)  # noqa: E731
    before = set(sandbox._pids(of_uid))
    try:
        become = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] if uid else []
        proc = subprocess.run([*become, "env", "-i", f"HOME={env['home']}", "PATH=/usr/bin:/bin", env["python"],
                               str(env["clone"] / "sandbox_user_check.py")], cwd=env["home"], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            "\n".join(
                f"  {'contained' if a['contained'] else 'NOT CONTAINED'}: {name}"
                for name, a in report["attacks"].items()
            )
        )
        assert report["uid"] == uid and report["mode"] == mode and report["self_check"] == mode, report["why"]
        failed = {name: a["detail"] for name, a in report["attacks"].items() if not a["contained"]}
        assert not failed, failed
        assert len(report["attacks"]) == (24 if os.uname().machine == "x86_64" else 22)  # keyrings: x86_64 syscalls
        scored = {name: scores for name, scores in report["hacks"].items() if scores != [0.0, 0.0]}
        assert len(report["hacks"]) == len(hack_plans()) == 36 and not scored, scored
        assert (env["home"] / ".ssh" / "id_ed25519").read_text().count("GRLOFAKEKEY") == 1
        # nothing left running (a killed namespace init may wait as a zombie for the host's init to reap it)
        if uid:
            left = set(sandbox._pids(of_uid)) - before
        else:  # root's programs ran under throw-away uids; other root processes come and go meanwhile
            left = set(sandbox_processes(include_zombies=False))
        assert not left, f"processes of uid {uid} outlived the attacks: {sorted(left)}"
    finally:
        shutil.rmtree(env["base"], ignore_errors=True)


@isolated
def test_venv_in_a_private_directory_still_imports_numpy_and_a_blind_sandbox_stops_at_self_check():
    """Root, venv under a 0700 directory: the sandbox binds the install into its own root, so numpy imports
    (before: ModuleNotFoundError, and every MBPP+ program scored 0). Without namespaces ("uid" mode) the
    throw-away uid cannot reach that venv: self_check must stop with the reason instead."""
    env = private_env(0)
    try:
        code = ("import json, sys, sandbox\nr = sandbox.run_python('import numpy; print(numpy.__file__)')\n"
                "print(json.dumps({'mode': sandbox.self_check()['mode'], 'stdout': r.stdout, 'stderr': r.stderr}))\n"
                "sandbox._caps = {**sandbox.sandbox_caps(), 'mode': 'uid'}\n"
                "try:\n    sandbox.self_check()\nexcept RuntimeError as e:\n    print('STOPPED:', e)")  # fmt: skip
        proc = subprocess.run(
            [env["python"], "-c", code], cwd=env["clone"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.strip().splitlines()
        first = json.loads(lines[0])
        assert first["mode"] == "root" and first["stdout"].startswith(str(env["base"])), first
        stopped = "\n".join(lines[1:])
        assert stopped.startswith("STOPPED:") and "cannot run `import numpy" in stopped and env["python"] in stopped, (
            stopped
        )
    finally:
        shutil.rmtree(env["base"], ignore_errors=True)
