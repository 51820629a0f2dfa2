"""The figure and table of docs/train_ppo.md's CPU ablation: PPO (a critic, 1 sample a prompt) vs GRPO (the group
mean, 8 samples a prompt) at 64 samples a step, with the verifier and with the learned RM as the judge.

Reads the runs of docs/ppo_vs_grpo.sh (TensorBoard events and rollouts.jsonl) and writes docs/ppo_vs_grpo_cpu.png,
two rows (the judge: verifier, learned RM) by three panels against step:
  1. gold held-out accuracy (the verifier, greedy, on data/arith_test.jsonl);
  2. the judge's mean raw score of the step's samples: the training prompts' accuracy with the verifier, the
     learned RM's score (the proxy) with the RM;
  3. mean response length in tokens.
It prints the markdown table: gold at steps 0/5/10/15/20, score and length at steps 1 and 20, the verifier's
accuracy on the training samples (steps 1-5 and 16-20), the median seconds a step (the training step; held-out
evaluation excluded) and the peak RSS over the run's phases.

    python docs/plot_ppo_vs_grpo.py --runs runs/ablation
"""

import json
import os
import statistics
import sys
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "docs")]
import reward  # noqa: E402
from plot_rlhf_cpu import per_step, scalars  # noqa: E402

ALGOS = (("ppo", "PPO, critic", "tab:blue"), ("grpo", "GRPO, group mean", "tab:orange"))
JUDGES = (("verifier", "judge: verifier"), ("rm", "judge: learned RM"))


@dataclass
class Args:
    runs: str = "runs/ablation"
    """docs/ppo_vs_grpo.sh's output folder: {ppo,grpo}-{verifier,rm}-seed{1,2}"""
    out: str = os.path.join(ROOT, "docs", "ppo_vs_grpo_cpu.png")
    """where the figure goes"""
    dataset: str = os.path.join(ROOT, "data", "arith_train.jsonl")
    """the training rows, whose ground truth verifies the training samples (the table's last-but-two column)"""


def summary(run: str, truth: dict) -> dict:
    """Gold accuracy by step, the judge's mean score and the mean length by step, the verifier's accuracy on the
    training samples in steps 1-5 and 16-20 (under the RM judge: is what the RM pays for correct?), median step
    time, peak RSS."""
    gold = dict(zip(*scalars(run, "eval/accuracy")))
    rows = [json.loads(line) for line in open(os.path.join(run, "rollouts.jsonl"))]
    steps, scores = per_step(rows, [r["score"] for r in rows])
    correct, _, _ = reward.compute_rewards(
        [truth[json.dumps(r["prompt"])] for r in rows], [r["completion"] for r in rows]
    )
    first = [c for r, c in zip(rows, correct) if r["step"] < 5]
    last = [c for r, c in zip(rows, correct) if r["step"] >= 15]
    train_correct = [sum(x) / len(x) if x else float("nan") for x in (first, last)]
    length = dict(zip(*scalars(run, "completions/mean_length")))
    times = scalars(run, "time/step")[1]
    peaks = []
    for key in ("setup", "rollout", "reward", "values", "train", "weight_sync", "checkpoint"):
        peaks += scalars(run, f"memory/{key}_gib")[1]
    step_s = statistics.median(times) if times else float("nan")
    return dict(gold=gold, score=dict(zip(steps, scores)), length=length, train_correct=train_correct,
                step_s=step_s, peak_gib=max(peaks, default=0.0))  # fmt: skip


def main(args: Args):
    from matplotlib.figure import Figure

    truth = {json.dumps(r["prompt"]): r for r in reward.load_rows(args.dataset, "train", reward.to_rlvr_row)}

    fig = Figure(figsize=(15, 8))
    axes = fig.subplots(2, 3)
    header = ("| judge | algorithm | seed | gold step 0 | 5 | 10 | 15 | 20 | score, step 1 → 20 | length, step 1 → 20 "
              "| training samples correct, steps 1-5 → 16-20 | s a step (median) | peak RSS |")  # fmt: skip
    table = [header, "|" + "---|" * 13]
    for row, (judge, judge_label) in enumerate(JUDGES):
        for algo, algo_label, color in ALGOS:
            for seed, style in ((1, "-"), (2, "--")):
                run = os.path.join(args.runs, f"{algo}-{judge}-seed{seed}")
                path = os.path.join(run, "rollouts.jsonl")
                if not os.path.exists(path) or not os.path.getsize(path):
                    print(f"not run yet: {run}")
                    continue
                s, label = summary(run, truth), f"{algo_label}, seed {seed}"
                for ax, key in zip(axes[row], ("gold", "score", "length")):
                    ax.plot(list(s[key]), list(s[key].values()), style, color=color, label=label,
                            marker="o" if key == "gold" else None)  # fmt: skip
                gold = " | ".join(f"{100 * s['gold'][k]:.1f}%" if k in s["gold"] else "-" for k in (0, 5, 10, 15, 20))
                first, last = min(s["score"]), max(s["score"])
                table.append(
                    f"| {judge} | {algo} | {seed} | {gold} | {s['score'][first]:.2f} → {s['score'][last]:.2f} "
                    f"| {s['length'].get(1, float('nan')):.0f} → {s['length'].get(last, float('nan')):.0f} "
                    f"| {100 * s['train_correct'][0]:.1f}% → {100 * s['train_correct'][1]:.1f}% "
                    f"| {s['step_s']:.0f} | {s['peak_gib']:.1f} GiB |"
                )
        titles = ("gold held-out accuracy (verifier, greedy)",
                  "training accuracy (the verifier's score)" if judge == "verifier" else "learned RM score (proxy)",
                  "mean response length (tokens)")  # fmt: skip
        for ax, title in zip(axes[row], titles):
            ax.set_title(f"{title}\n{judge_label}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    for row in axes:
        if row[0].get_lines():
            row[0].legend(fontsize=8)
    fig.suptitle("PPO (critic, 64 prompts x 1) vs GRPO (8 prompts x 8) on CPU, SmolLM2-135M, 64 samples a step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("\n".join(table))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
