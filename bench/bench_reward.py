"""Throughput of the rule rewards, serial vs parallel, measured side by side in one run.

1. math_reward on N mixed responses (boxed / plain / GSM8K '####', right and wrong answers).
2. code_reward on M HumanEval-style programs (right and wrong), each in its own sandbox.
Serial = a plain loop over the public function; parallel = compute_rewards (a thread pool around the
math workers and sandboxes). Prints samples/s and the ratio.

    .venv/bin/python bench/bench_reward.py
    .venv/bin/python bench/bench_reward.py --num-math 200 --num-code 32   # quick
    .venv/bin/python bench/bench_reward.py --against 003ef2b              # code programs/s, this tree vs a ref
"""

import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward  # noqa: E402
import sandbox  # noqa: E402


@dataclass
class Args:
    num_math: int = 1000
    """math responses to score"""
    num_code: int = 256
    """HumanEval-style programs to run"""
    max_workers: int = 0
    """threads for the parallel run; 0 = compute_rewards' default (min(32, cores))"""
    seed: int = 0
    """seed for the synthetic responses"""
    against: str = ""
    """a git ref: run this tree's and the ref's bench_reward.py (--num-code programs, 8 math) alternately,
    `against_runs` times each, and print the code programs/s of both and their ratio; "" = this tree only"""
    against_runs: int = 3
    """runs of each side with --against"""


def math_samples(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Half right, half wrong, across the answer formats a policy produces."""
    golds, responses = [], []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        gold, wrong = (str(a * b), str(a * b + 1)) if i % 4 else (f"\\frac{{{a}}}{{{b}}}", f"{a / b + 1:.4f}")
        answer = gold if i % 2 == 0 else wrong
        style = (i // 2) % 4
        responses.append(
            [
                f"We multiply {a} by {b}. So the answer is \\boxed{{{answer}}}.",
                f"Compute {a} times {b} step by step... The final answer is {answer}",
                f"{a} * {b} = {answer}\n#### {answer}",
                f"First guess \\boxed{{0}}; checking again, it is $\\boxed{{{answer}}}$.",
            ][style]
        )
        golds.append(gold)
    return golds, responses


def code_samples(n: int) -> tuple[list[dict], list[str]]:
    """Alternating right/wrong programs for small HumanEval-like tasks (prompt + check(candidate))."""
    rows, responses = [], []
    for i in range(n):
        k = i % 16
        row = {
            "task_id": f"Bench/{k}",
            "entry_point": f"add_{k}",
            "prompt": f'def add_{k}(x: int) -> int:\n    """Return x plus {k}."""\n',
            "test": "def check(candidate):\n" + "".join(f"    assert candidate({x}) == {x + k}\n" for x in range(5)),
        }
        body = f"x + {k}" if i % 2 == 0 else f"x - {k}"
        rows.append(row)
        responses.append(f"```python\ndef add_{k}(x: int) -> int:\n    return {body}\n```")
    return rows, responses


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def report(name: str, rewards: list[float], t_serial: float, t_parallel: float, extra: str = ""):
    n = len(rewards)
    print(
        f"{name:5s} n={n:5d} mean_reward={sum(rewards) / n:.3f}  serial {n / t_serial:7.1f}/s  "
        f"parallel {n / t_parallel:7.1f}/s  speed-up x{t_serial / t_parallel:.2f}{extra}"
    )


def against(args: Args) -> None:
    """Side by side in one run: this tree's bench against a worktree of `args.against`, alternating A B A B."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ref_dir = tempfile.mkdtemp(prefix="grlo_bench_ref_")
    subprocess.run(["git", "worktree", "add", "--detach", "-f", ref_dir, args.against], cwd=root, check=True)
    try:
        rates = {"this tree": [], args.against: []}
        for _ in range(args.against_runs):
            for name, tree in (("this tree", root), (args.against, ref_dir)):
                cmd = [sys.executable, "bench/bench_reward.py", "--num-math", "8", "--num-code", str(args.num_code)]
                out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=True).stdout
                line = next(x for x in out.splitlines() if x.startswith("code"))
                serial, parallel = (float(v) for v in re.findall(r"(?:serial|parallel)\s+([\d.]+)/s", line))
                rates[name].append((serial, parallel))
                print(f"{name:>12}: serial {serial:6.1f}/s  parallel {parallel:6.1f}/s", flush=True)
        for i, mode in enumerate(("serial", "parallel")):
            a, b = (statistics.median(r[i] for r in rates[n]) for n in rates)
            print(f"{mode:>12}: this tree {a:6.1f}/s | {args.against} {b:6.1f}/s | cost per program x{b / a:.2f}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", ref_dir], cwd=root)


def main(args: Args):
    if args.against:
        return against(args)
    rng = random.Random(args.seed)
    workers = args.max_workers or None
    caps = sandbox.sandbox_caps()
    print(
        f"cores={os.cpu_count()} load_avg_1m={os.getloadavg()[0]:.2f} max_workers={workers or 'default'} "
        f"sandbox: mode={caps['mode']} uid={os.geteuid()}"
    )
    golds, responses = math_samples(args.num_math, rng)
    math_rows = [{"ability": "math", "reward_model": {"style": "rule", "ground_truth": g}} for g in golds]
    reward.compute_rewards(math_rows[:8], responses[:8], max_workers=workers)  # warm-up: spawn math workers
    serial, t_serial = timed(lambda: [reward.math_reward(r, g) for r, g in zip(responses, golds)])
    (parallel, _, _), t_parallel = timed(lambda: reward.compute_rewards(math_rows, responses, max_workers=workers))
    assert serial == parallel, "serial and parallel math rewards disagree"
    report("math", serial, t_serial, t_parallel)

    rows, programs = code_samples(args.num_code)
    code_rows = [{"ability": "code", "reward_model": {"style": "rule", "ground_truth": json.dumps(r)}} for r in rows]
    serial, t_serial = timed(lambda: [reward.code_reward(p, r) for p, r in zip(programs, rows)])
    (parallel, stats, _), t_parallel = timed(lambda: reward.compute_rewards(code_rows, programs, max_workers=workers))
    assert serial == parallel == [1.0 - (i % 2) for i in range(len(rows))], "unexpected code rewards"
    report("code", serial, t_serial, t_parallel, f"  timeouts={stats['rewards/code_timeout']:.0f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
