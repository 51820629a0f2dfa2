"""train_grlo.py speed, measured side by side in one run on SmolLM2-135M (CPU).

Prints, each as a ratio so that a noisy machine still gives comparable numbers:
  1. rollout tokens/s: vLLM (`generate_vllm`) vs the HF fallback (`generate_hf`), same prompts, same
     dtype, 64 completions x up to 128 new tokens (issue target: >= 4x); and beside it a floor: the time the
     same decode's matrix multiplies alone take on this machine (see `decode_matmul_floor`);
  2. the step broken down into rollout / reward / train / weight sync, read from real `train_grlo.py
     --preset cpu-smollm2` runs' TensorBoard scalars (target: weight sync <= 2% of a step), at the preset's
     G=4 x 64 tokens, the same with one prompt copy per sample instead of one per group in the update and the
     RM (--no-share-prompt), and at twice the group size and twice the response length, to show how cost
     scales;
  3. the training phase's achieved FLOP/s as a fraction of this machine's measured matmul peak, in fp32
     and in bf16 autocast, each against its own dtype's peak (target: >= 40%). FLOPs are counted as
     6 x (non-embedding parameters) x (prompt + completion tokens forwarded; a shared prompt counts once per
     group) + 6 x (LM-head parameters) x (completion tokens), since the LM head runs only on completion
     positions; attention's own FLOPs (~5% here at
     ~150-token sequences) are not counted, so the fraction is a slight underestimate.

    python bench/bench_grlo.py
"""

import json
import os
import shutil
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
import generation  # noqa: E402
import local_models  # noqa: E402
import reward  # noqa: E402
import train_grlo as tg  # noqa: E402


@dataclass
class Args:
    rollout_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of both engines in the rollout benchmark (the CPU presets sample in fp32)"""
    num_prompts: int = 16
    """prompts in the rollout benchmark (x num_generations completions)"""
    num_generations: int = 4
    """completions per prompt in the rollout benchmark"""
    max_new_tokens: int = 128
    """max new tokens per completion in the rollout benchmark"""
    train_steps: int = 4
    """steps of each real train_grlo.py run (the first is excluded as warm-up)"""
    vllm_compiled: bool = False
    """part 1: run vLLM with torch.compile (enforce_eager=False); the CPU presets run it eager"""
    skip_rollout: bool = False
    """skip part 1 (the vLLM vs HF rollout comparison)"""
    skip_steps: bool = False
    """skip parts 2 and 3 (the train_grlo.py runs)"""
    against: str = ""
    """a git ref (e.g. a commit before a refactor): run only the preset's step, alternating this tree's
    train_grlo.py with the ref's `against_runs` times each, and print the step-time ratio; "" = the full benchmark"""
    against_runs: int = 3
    """runs of each side with --against"""


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
    rows = reward.load_rows(os.path.join(ROOT, "data", "open_prompts.jsonl"))[: args.num_prompts]
    _, prompt_ids, _ = tg.tokenize_prompts(rows, tok, 256)
    prompts = [p for p in prompt_ids for _ in range(args.num_generations)]
    run = dict(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    eos = generation.eos_token_ids(tok, paths["policy"])
    t = time.perf_counter()
    llm = LLM(model=paths["policy"], dtype=args.rollout_dtype, enforce_eager=not args.vllm_compiled, seed=0, max_model_len=512,
              kv_cache_memory_bytes=2**30, logprobs_mode="processed_logprobs")  # fmt: skip
    generation.generate_vllm(llm, prompts[:2], [0, 1], eos, **run)  # warm-up
    print(f"   vLLM start-up ({'compiled' if args.vllm_compiled else 'eager'}): {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    ids, _, _ = generation.generate_vllm(llm, prompts, list(range(len(prompts))), eos, **run)
    vllm_s, vllm_tok = time.perf_counter() - t, sum(map(len, ids))
    vllm_lengths = list(map(len, ids))
    llm.llm_engine.engine_core.shutdown()
    model = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=getattr(torch, args.rollout_dtype)).eval()
    t = time.perf_counter()
    ids, _, _ = generation.generate_hf(model, prompts, 0, eos, tok.pad_token_id, **run)
    hf_s, hf_tok = time.perf_counter() - t, sum(map(len, ids))
    unique_prompt_tokens = sum(len(p) for p in prompt_ids)  # vLLM's prefix cache prefills each prompt once
    floor_s = decode_matmul_floor(model.config, getattr(torch, args.rollout_dtype), vllm_lengths, unique_prompt_tokens)
    return vllm_tok / vllm_s, hf_tok / hf_s, vllm_tok, hf_tok, vllm_tok / floor_s, floor_s


def decode_matmul_floor(config, dtype: torch.dtype, lengths: list, prompt_tokens: int) -> float:
    """Seconds that only the matrix multiplies of a rollout take on this machine: a floor for any engine that
    decodes one token per forward (no speculative decoding) with torch's matmul.

    Decoding is one forward per new token, batched over the completions still running: at step t the batch
    has M_t = #{completions longer than t} rows. Each forward multiplies those rows by every weight matrix
    (fused q|k|v, o, fused gate|up, down per layer, then the LM head), as vLLM does. We time exactly those
    (M, K) x (K, N) products with torch's matmul at the rollout dtype and add them up, plus one prefill pass
    over the prompts. Attention, norms, sampling and scheduling are left out, so a real engine is slower."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    shapes = [(hidden, qkv), (config.num_attention_heads * head_dim, hidden), (hidden, 2 * inter), (inter, hidden)]
    weights = [torch.randn(n, k, dtype=dtype) for k, n in shapes]
    head = torch.randn(config.vocab_size, hidden, dtype=dtype)

    def forward_s(m: int, with_head: bool = True) -> float:  # best of 3: one forward's matmuls on m rows
        xs = {k: torch.randn(m, k, dtype=dtype) for k, _ in shapes}
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for (k, _), w in zip(shapes, weights):
                torch.nn.functional.linear(xs[k], w)
            body = (time.perf_counter() - t) * layers
            t = time.perf_counter()
            if with_head:
                torch.nn.functional.linear(xs[hidden], head)
            best = min(best, body + (time.perf_counter() - t if with_head else 0.0))
        return best

    rows_per_step = [sum(n > t for n in lengths) for t in range(max(lengths))]
    per_m = {m: forward_s(m) for m in set(rows_per_step)}
    return sum(per_m[m] for m in rows_per_step) + forward_s(prompt_tokens, with_head=False)


def step_bench(args: Args, paths: dict, dtype: str, extra: list, root: str = ROOT):
    """A real cpu-smollm2 run; returns per-phase median seconds and median prompt / completion tokens per step
    that the update forwards: with --share-prompt (the preset's default) each prompt counts once per group."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoTokenizer

    out = tempfile.mkdtemp(prefix="bench_grlo_")
    cmd = [sys.executable, os.path.join(root, "train_grlo.py"), "--preset", "cpu-smollm2", "--max-steps",
           str(args.train_steps), "--save-every", "0", "--output-dir", out, "--dtype", dtype, "--sample-every", "0", *extra]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acc = EventAccumulator(out)
    acc.Reload()
    median = lambda xs: sorted(xs)[(len(xs) - 1) // 2]  # noqa: E731
    phases = {
        k: median([e.value for e in acc.Scalars(f"time/{k}")[1:]])
        for k in ("rollout", "reward", "train", "weight_sync", "step")
    }
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    shared = "--no-share-prompt" not in extra
    prompt_tok, completion_tok, seen = {}, {}, set()
    for line in open(os.path.join(out, "rollouts.jsonl")):
        r = json.loads(line)
        if r["step"] == 0:
            continue
        key = (r["step"], json.dumps(r["prompt"]))
        if not (shared and key in seen):  # a step's prompts are distinct: one per group
            prompt_tok[r["step"]] = prompt_tok.get(r["step"], 0) + len(tg.tokenize_prompts([r], tok, 10**9)[1][0])
        seen.add(key)
        completion_tok[r["step"]] = (
            completion_tok.get(r["step"], 0) + len(tok(r["completion"])["input_ids"]) + 1
        )  # + EOS
    shutil.rmtree(out, ignore_errors=True)
    return phases, median(list(prompt_tok.values())), median(list(completion_tok.values()))


def train_flops(paths: dict, prompt_tokens: int, completion_tokens: int) -> float:
    """FLOPs of one update: 6 x body params x all tokens + 6 x head params x completion tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # count parameters without loading weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(paths["policy"]))
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    return 6 * body * (prompt_tokens + completion_tokens) + 6 * head * completion_tokens


def against(args: Args, paths: dict) -> None:
    """This tree's train_grlo.py against a git ref's, side by side: the cpu-smollm2 preset (fp32), alternating
    A B A B ... so that a drift of the machine's speed hits both; medians of the per-run median step times."""
    ref_dir = tempfile.mkdtemp(prefix="bench_ref_")
    subprocess.run(["git", "worktree", "add", "--detach", "-f", ref_dir, args.against], cwd=ROOT, check=True)
    os.symlink(os.path.join(ROOT, "local_models"), os.path.join(ref_dir, "local_models"))
    try:
        times = {"this tree": [], args.against: []}
        for _ in range(args.against_runs):
            for name, root in (("this tree", ROOT), (args.against, ref_dir)):
                phases, _, _ = step_bench(args, paths, "float32", [], root)
                times[name].append(phases)
                print(f"   {name:>12}: step {phases['step']:.2f}s (train {phases['train']:.2f}s)", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", ref_dir], cwd=ROOT, check=False)
    median = lambda xs: sorted(xs)[(len(xs) - 1) // 2]  # noqa: E731
    for key in ("step", "rollout", "reward", "train", "weight_sync"):
        a, b = (median([p[key] for p in times[n]]) for n in times)
        print(f"   {key:>12}: this tree {a:6.2f}s | {args.against} {b:6.2f}s | ratio {a / b:.3f}")


def main(args: Args):
    paths = local_models.build_smollm2(local_models.DEFAULT_DIR)
    if args.against:
        print(f"train_grlo.py --preset cpu-smollm2, this tree vs {args.against}, median of steps 2..{args.train_steps}")
        return against(args, paths)
    peaks = {dt: matmul_peak(getattr(torch, dt)) for dt in ("float32", "bfloat16")}
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, matmul peak fp32 {peaks['float32']:.1f} / bf16 {peaks['bfloat16']:.1f} GFLOP/s"
    )

    if not args.skip_rollout:
        vllm_tps, hf_tps, vt, ht, floor_tps, floor_s = rollout_bench(args, paths)
        n = args.num_prompts * args.num_generations
        print(
            f"\n1. rollout, {n} completions x <= {args.max_new_tokens} new tokens, {args.rollout_dtype}, vLLM {'compiled' if args.vllm_compiled else 'eager'}"
        )
        print(
            f"   vLLM {vllm_tps:7.1f} tok/s ({vt} tokens) | HF generate {hf_tps:7.1f} tok/s ({ht} tokens) | ratio {vllm_tps / hf_tps:.2f}x (target >= 4x)"
        )
        print(f"   floor: the same decode's matmuls alone take {floor_s:.1f} s here = {floor_tps:.1f} tok/s, "
              f"{floor_tps / hf_tps:.2f}x HF generate (an engine with zero overhead beyond its matmuls)")  # fmt: skip

    if args.skip_steps:
        return
    print(f"\n2. step breakdown, train_grlo.py --preset cpu-smollm2 (8 prompts), median of steps 2..{args.train_steps}")
    print("   setting                 rollout   reward    train     sync      step    sync%  gen tok/s")
    runs = {"fp32 G=4 64 tok": ("float32", []), "  same, no shared prompt": ("float32", ["--no-share-prompt"]),
            "fp32 G=8 64 tok": ("float32", ["--num-generations", "8"]),
            "fp32 G=4 128 tok": ("float32", ["--max-new-tokens", "128"]), "bf16 G=4 64 tok": ("bfloat16", [])}  # fmt: skip
    results = {}
    for name, (dtype, extra) in runs.items():
        phases, p_tok, c_tok = step_bench(args, paths, dtype, extra)
        results[name] = (dtype, phases, p_tok, c_tok)
        cols = "".join(f"{phases[k]:7.2f}s  " for k in ("rollout", "reward", "train", "weight_sync", "step"))
        print(
            f"   {name:22s} {cols}{100 * phases['weight_sync'] / phases['step']:5.2f}%  {c_tok / phases['rollout']:8.1f}"
        )
    print("   (target: weight sync <= 2% of the step; 'no shared prompt' = --no-share-prompt: each sample forwards")
    print("    its own copy of the prompt in the update and the RM, the --share-prompt A/B)")

    print("\n3. training phase vs the matmul peak of its dtype")
    for name in ("fp32 G=4 64 tok", "bf16 G=4 64 tok"):
        dtype, phases, p_tok, c_tok = results[name]
        gflops = train_flops(paths, p_tok, c_tok) / phases["train"] / 1e9
        print(f"   {name}: {p_tok} prompt + {c_tok} completion tokens/step, {gflops:.1f} GFLOP/s in {phases['train']:.1f} s"
              f" = {100 * gflops / peaks[dtype]:.1f}% of the {dtype} peak (target >= 40%)")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
