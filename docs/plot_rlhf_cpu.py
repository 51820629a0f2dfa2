"""The figure of docs/train_rm.md's CPU experiment: RLHF against a learned reward model vs RLVR, on CPU.

Reads the runs' TensorBoard events and rollouts.jsonl and writes docs/rlhf_cpu.png with three panels against step:
  1. gold held-out accuracy (the verifier on data/arith_test.jsonl; never a reward in the RLHF runs);
  2. proxy reward: the learned RM's mean score of each step's samples (for the RLVR run, its samples are
     scored by the same RM after the fact, so all runs share one axis);
  3. mean response length in tokens.

    python docs/plot_rlhf_cpu.py --rlhf runs/cpu-arith-rm-seed1 runs/cpu-arith-rm-seed2 \
        --kl runs/cpu-arith-rm-kl0.1-seed1 --rlvr runs/rlvr-arith-seed1-20steps
"""

import json
import os
import sys
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    rlhf: list[str] = field(default_factory=lambda: ["runs/cpu-arith-rm-seed1", "runs/cpu-arith-rm-seed2"])
    """train_grlo.py --preset cpu-arith-rm output folders (one per seed)"""
    kl: list[str] = field(default_factory=list)
    """the same RLHF runs with a KL penalty (--kl-coef), drawn dotted"""
    rlvr: list[str] = field(default_factory=lambda: ["runs/rlvr-arith-seed1-20steps"])
    """train_rlvr.py --preset cpu-arith output folders, drawn for comparison"""
    reward_model: str = "runs/rm-cpu-arith/final"
    """the learned RM, to score the RLVR runs' samples for panel 2"""
    out: str = os.path.join(ROOT, "docs", "rlhf_cpu.png")
    """where the figure goes"""


def scalars(run: str, key: str) -> tuple:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    if key not in acc.Tags()["scalars"]:
        return [], []
    events = acc.Scalars(key)
    return [e.step for e in events], [e.value for e in events]


def per_step(rows: list, values: list) -> tuple:
    """Mean of `values` per step (rows' "step" is 0-based; plotted as step + 1, like TensorBoard)."""
    by = {}
    for r, v in zip(rows, values):
        by.setdefault(r["step"] + 1, []).append(v)
    steps = sorted(by)
    return steps, [sum(by[s]) / len(by[s]) for s in steps]


def main(args: Args):
    import reward
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    ax_gold, ax_proxy, ax_len = fig.subplots(1, 3)
    rm = None
    curves = (("RLHF, learned RM", args.rlhf, "-"), ("RLHF + KL", args.kl, ":"), ("RLVR, verifier", args.rlvr, "--"))
    for kind, runs, style in curves:
        for run in runs:
            label = f"{kind} ({os.path.basename(run.rstrip('/'))})"
            ax_gold.plot(*scalars(run, "eval/accuracy"), style, marker="o", label=label)
            rows = [json.loads(line) for line in open(os.path.join(run, "rollouts.jsonl"))]
            if kind.startswith("RLHF"):
                proxy = [r["score"] for r in rows]  # the RM's raw score: the reward before shaping
            else:  # score the RLVR samples with the same RM
                rm = rm or reward.RewardModel(args.reward_model, batch_size=32, max_length=512)
                proxy = rm.score([r["prompt"] for r in rows], [r["completion"] for r in rows])
            steps, means = per_step(rows, proxy)
            ax_proxy.plot(steps, means, style, label=label)
            print(f"{label}: mean RM score {means[0]:.2f} (step {steps[0]}) -> {means[-1]:.2f} (step {steps[-1]})")
            ax_len.plot(*scalars(run, "completions/mean_length"), style, label=label)
    for ax, title in (
        (ax_gold, "gold: held-out accuracy (verifier)"),
        (ax_proxy, "proxy: mean learned-RM score"),
        (ax_len, "mean response length (tokens)"),
    ):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_len.legend(fontsize=8, loc="upper right")  # the empty corner of the three panels
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
