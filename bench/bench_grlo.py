"""train_grlo.py speed, measured side by side in one run on SmolLM2-135M (CPU).

Prints three things, each as a ratio so that a noisy machine still gives comparable numbers:
  1. rollout tokens/s: vLLM (`generate_vllm`) vs the HF fallback (`generate_hf`), same prompts, same
     dtype, 64 completions x up to 128 new tokens (issue target: >= 4x);
  2. the step broken down into rollout / reward / train / weight sync, read from a real `train_grlo.py`
     run's TensorBoard scalars (target: weight sync <= 2% of a step);
  3. the training phase's achieved FLOP/s (6 x params x tokens, fwd + bwd) as a fraction of this machine's
     measured matmul peak in the same dtype (target: >= 40%).

    python bench/bench_grlo.py                  # fp32, as the CPU presets train
    python bench/bench_grlo.py --dtype bfloat16 # bf16 autocast trainer + bf16 vLLM
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import local_models  # noqa: E402
import train_grlo as tg  # noqa: E402


@dataclass
class Args:
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of both engines and of the trainer"""
    num_prompts: int = 16
    """prompts in the rollout benchmark (x num_generations completions)"""
    num_generations: int = 4
    """completions per prompt in the rollout benchmark"""
    max_new_tokens: int = 128
    """max new tokens per completion"""
    train_steps: int = 4
    """steps of the real train_grlo.py run for the breakdown (the first is excluded as warm-up)"""


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best-of-N GFLOP/s of an n x n matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def rollout_bench(args: Args, paths: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM

    tok = AutoTokenizer.from_pretrained(paths["policy"])
    rows = tg.load_rows(os.path.join(ROOT, "data", "open_prompts.jsonl"))[: args.num_prompts]
    _, prompt_ids, _ = tg.tokenize_prompts(rows, tok, 256)
    prompts = [p for p in prompt_ids for _ in range(args.num_generations)]
    run = tg.Args(max_new_tokens=args.max_new_tokens, temperature=1.0)
    eos = tg.eos_token_ids(tok, paths["policy"])
    llm = LLM(model=paths["policy"], dtype=args.dtype, enforce_eager=True, seed=0, max_model_len=512,
              kv_cache_memory_bytes=2**30, logprobs_mode="processed_logprobs")  # fmt: skip
    tg.generate_vllm(llm, prompts[:2], [0, 1], run, eos, False)  # warm-up
    t = time.perf_counter()
    ids, _, _ = tg.generate_vllm(llm, prompts, list(range(len(prompts))), run, eos, False)
    vllm_s, vllm_tok = time.perf_counter() - t, sum(map(len, ids))
    llm.llm_engine.engine_core.shutdown()
    model = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=getattr(torch, args.dtype)).eval()
    t = time.perf_counter()
    ids, _, _ = tg.generate_hf(model, prompts, 0, run, eos, tok.pad_token_id)
    hf_s, hf_tok = time.perf_counter() - t, sum(map(len, ids))
    return vllm_tok / vllm_s, hf_tok / hf_s, vllm_tok, hf_tok


def step_bench(args: Args, paths: dict):
    """A real cpu-smollm2 run; returns per-phase median seconds and the training tokens per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoTokenizer

    out = tempfile.mkdtemp(prefix="bench_grlo_")
    cmd = [sys.executable, os.path.join(ROOT, "train_grlo.py"), "--preset", "cpu-smollm2", "--max-steps",
           str(args.train_steps), "--save-every", "0", "--output-dir", out, "--dtype", args.dtype, "--sample-every", "0"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acc = EventAccumulator(out)
    acc.Reload()
    med = lambda k: sorted(e.value for e in acc.Scalars(k)[1:])[(args.train_steps - 1) // 2]  # noqa: E731
    phases = {k: med(f"time/{k}") for k in ("rollout", "reward", "train", "weight_sync", "step")}
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    per_step = {}
    for line in open(os.path.join(out, "rollouts.jsonl")):
        r = json.loads(line)
        if r["step"] == 0:
            continue
        prompt = len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True))
        per_step[r["step"]] = per_step.get(r["step"], 0) + prompt + len(tok(r["completion"])["input_ids"]) + 1
    return phases, sorted(per_step.values())[len(per_step) // 2]


def main(args: Args):
    paths = local_models.build_smollm2(local_models.DEFAULT_DIR)
    dtype = getattr(torch, args.dtype)
    peak = matmul_peak(dtype)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.dtype} matmul peak {peak:.1f} GFLOP/s")

    vllm_tps, hf_tps, vt, ht = rollout_bench(args, paths)
    n = args.num_prompts * args.num_generations
    print(f"\n1. rollout, {n} completions x <= {args.max_new_tokens} new tokens, {args.dtype}")
    print(f"   vLLM {vllm_tps:7.1f} tok/s ({vt} tokens) | HF generate {hf_tps:7.1f} tok/s ({ht} tokens) | ratio {vllm_tps / hf_tps:.2f}x (target >= 4x)")

    phases, train_tokens = step_bench(args, paths)
    print(f"\n2. step breakdown, train_grlo.py --preset cpu-smollm2 --dtype {args.dtype} (median of steps 2..{args.train_steps})")
    for k in ("rollout", "reward", "train", "weight_sync"):
        print(f"   {k:12s} {phases[k]:7.2f} s  {100 * phases[k] / phases['step']:5.1f}% of the step")
    print(f"   step         {phases['step']:7.2f} s   weight sync share {100 * phases['weight_sync'] / phases['step']:.2f}% (target <= 2%)")

    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # count parameters without loading weights (a tied head counts once)
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(paths["policy"])).parameters())
    flops = 6 * params * train_tokens / phases["train"] / 1e9
    print(f"\n3. training phase: {train_tokens} tokens/step, 6 x {params / 1e6:.0f}M x tokens / {phases['train']:.1f} s = {flops:.1f} GFLOP/s")
    print(f"   = {100 * flops / peak:.1f}% of the {args.dtype} matmul peak (target >= 40%)")


if __name__ == "__main__":
    main(tyro.cli(Args))
