"""RLVR stage: continue a GRLO checkpoint with verifiable rewards (math answers, unit tests), DAPO-style.

One step, numbered as the banners in `main` and docs/train_rlvr.md (equation numbers as in docs/train_grlo.md):
  1. data: B prompts with ground truth (official JSONL with style "rule", or a hub set with problem/answer);
  2. rollout: G completions per prompt from an in-process vLLM engine (or HF `generate`), one seed each;
  3. reward: `reward.compute_rewards` verifies each (math-verify or sandboxed tests: 1 correct, 0 not); dynamic
     sampling drops groups whose G rewards are all equal and refills from new prompts (DAPO, eq. 8); the soft
     overlong penalty shapes the rest (eq. 7);
  4. advantages (eq. 1); 5. update (eq. 2-6), with clip-higher; 6. sync; 7. log, with held-out accuracy;
  8. checkpoint (with the data cursor). Every function shared with train_grlo.py is a marked copy.

The paper reports that this second stage adds a little, mostly on hard competition math. The defaults follow
DAPO where the paper is silent: clip 0.2/0.28, token-mean loss, dynamic sampling, overlong shaping.

    python local_models.py && python train_rlvr.py --preset cpu-arith                      # CPU, SmolLM2
    accelerate launch --config_file configs/deepspeed_zero3.yaml train_rlvr.py --model runs/grlo/checkpoint-80
"""

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # keep the engine in this process (weight sync reaches it)
import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

import batching
import bookkeeping
import distributed
import fit_check
import generation
import reward

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    # experiment
    preset: Literal["dapo", "cpu-smoke", "cpu-arith"] = "dapo"
    """named config whose values become the defaults; give it first, later flags override it"""
    exp_name: str = "rlvr"
    """run name in wandb (with --track); TensorBoard shows runs by their --output-dir"""
    seed: int = 1
    """seed for data order, sampling and init"""
    output_dir: str = "runs/rlvr"
    """checkpoints, TensorBoard events and rollouts.jsonl go here; a new run refuses a folder holding another run's"""

    # model
    model: str = "Qwen/Qwen3-4B-Base"
    """policy: hub id or local HF folder; pass a train_grlo.py checkpoint to continue the GRLO model"""
    reward_model: str = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"
    """reward model, loaded only if some row has reward_model.style == "model\""""
    rm_max_length: int = 4096
    """reward-model max tokens; longer conversations keep the response's end (logged as rewards/rm_truncated)"""

    # data
    dataset: str = "BytedTsinghua-SIA/DAPO-Math-17k"
    """hub id or local .jsonl/.json/.parquet: official rows with style "rule", or problem/question + answer columns"""
    dataset_split: str = "train"
    """split for hub datasets"""
    eval_dataset: Optional[str] = None
    """held-out set in the same formats, scored greedily every eval_every steps; None disables"""
    eval_limit: int = 0
    """score only the first N held-out problems; 0 = all"""
    max_prompt_length: int = 1024
    """prompts longer than this many tokens (after the chat template) are dropped and counted"""

    # rollout
    num_generations: int = 16
    """G: completions per prompt (DAPO uses 16)"""
    prompts_per_step: int = 64
    """B: prompts per step after dynamic sampling, over all processes (must divide by the number of processes)"""
    max_new_tokens: int = 8192
    """max tokens per completion; longer ones are cut (logged as completions/clipped_ratio)"""
    temperature: float = 1.0
    """sampling temperature (also divides the trainer's logits so log-probs match)"""
    top_p: float = 1.0
    """nucleus sampling; 1.0 disables"""

    # algorithm
    dynamic_sampling: bool = True
    """drop groups whose rewards are all equal (no signal) and refill the batch from new prompts (DAPO)"""
    max_sampling_rounds: int = 3
    """dynamic sampling: rollout rounds per step at most; short batches are topped up with dropped groups"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """advantage scale: group std (GRPO), whole-batch std, or none (Dr. GRPO)"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "constant"] = "token-mean"
    """loss aggregation: over all tokens, per sequence then mean, or sum / (sequences * max_new_tokens) (Dr. GRPO)"""
    clip_eps_low: float = 0.2
    """PPO clip: ratio lower bound 1 - eps_low"""
    clip_eps_high: float = 0.28
    """PPO clip: ratio upper bound 1 + eps_high (0.28 = DAPO clip-higher)"""
    kl_coef: float = 0.0
    """KL-to-reference coefficient in the loss; 0 disables and loads no reference model"""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator: k1 = log ratio, k3 = exp(-d) + d - 1 (unbiased, >= 0)"""
    entropy_coef: float = 0.0
    """entropy bonus coefficient; 0 disables"""
    tis_cap: float = 2.0
    """truncated importance sampling cap C on pi_train / pi_vllm; 0 disables"""
    overlong: Literal["none", "mask", "penalty"] = "penalty"
    """truncated completions: keep, mask out of the loss, or a soft length penalty (DAPO)"""
    overlong_buffer: int = 1024
    """penalty: tokens before max_new_tokens where the linear penalty starts"""
    overlong_penalty: float = 1.0
    """penalty: reward subtracted at max_new_tokens"""

    # optimization
    learning_rate: float = 1e-6
    """AdamW learning rate"""
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """learning-rate schedule after --warmup-steps (one step per optimizer step, whatever the process count)"""
    warmup_steps: int = 0
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (under DeepSpeed written into its config: its engine clips)"""
    num_minibatches: int = 4
    """optimizer steps per rollout batch (PPO mini-batches)"""
    ppo_epochs: int = 1
    """passes over each rollout batch"""
    num_epochs: int = 1
    """passes over the prompt set; sets the step count when max_steps is 0"""
    max_steps: int = 0
    """stop after this many steps; 0 = num_epochs over the data"""

    # eval / checkpoint
    eval_every: int = 50
    """score the held-out set every N steps (and before the first and after the last); 0 disables"""
    save_every: int = 50
    """save a checkpoint every N steps (and at the end); 0 = only at the end"""
    keep_last: int = 2
    """keep this many newest checkpoints"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir"""

    # system and logging: speed, memory and backends (batching/distributed/generation.py); none changes the algorithm
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """compute dtype: bf16 autocast (fp32 master weights) or fp32; auto = bf16 on GPU, fp32 on CPU"""
    gradient_checkpointing: bool = True
    """recompute activations in backward: a 16K-token micro-batch of a 4B model needs ~100 GiB without it"""
    token_budget: int = 16384
    """max padded tokens per forward micro-batch; sets gradient accumulation"""
    share_prompt: bool = False
    """forward each prompt once per group, in the update and the RM: its G completions follow it in one row"""
    use_vllm: bool = True
    """sample with an in-process vLLM engine; --no-use-vllm falls back to HF generate"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory vLLM may take (GPU only; checked at start-up, before AdamW state exists: docs/gpu.md)"""
    vllm_sleep: bool = True
    """GPU only: free vLLM's weights and KV cache during the update (sleep level 2, trained weights re-pushed)"""
    rm_batch_size: int = 8
    """reward-model forward batch size"""
    track: bool = False
    """mirror TensorBoard to wandb"""
    wandb_project: str = "grlo"
    """wandb project (with --track; the entity comes from WANDB_ENTITY or your default)"""
    sample_every: int = 10
    """print one prompt, completion and reward every N steps; 0 disables"""
    dummy_weights: bool = False
    """fit check: random weights in the models' config.json shapes (models/ ships the named ones), nothing downloaded,
    every completion to --max-new-tokens, 2 steps; prints each phase's time and peak memory beside the plan"""
    dummy_overrides: str = ""
    """--dummy-weights: config.json fields to change in both models, e.g. num_hidden_layers=4 (a CPU-sized run)"""


LOCAL = os.path.join(HERE, "local_models")
ARITH = os.path.join(HERE, "data", "arith_{}.jsonl")  # the bundled arithmetic set (data/README.md)
CPU = dict(num_generations=4, prompts_per_step=8, num_minibatches=1, gradient_checkpointing=False)
# fmt: off
PRESETS = {
    "dapo": Args(),
    "cpu-smoke": Args(
        preset="cpu-smoke", model=f"{LOCAL}/tiny-qwen3", output_dir="runs/rlvr-cpu-smoke",
        dataset=ARITH.format("train"), eval_dataset=ARITH.format("test"), eval_limit=16, max_prompt_length=128,
        max_new_tokens=16, overlong_buffer=4, learning_rate=3e-3, max_steps=4, eval_every=2, save_every=2, **CPU,
    ),
    "cpu-arith": Args(
        preset="cpu-arith", model=f"{LOCAL}/smollm2-135m", output_dir="runs/rlvr-cpu-arith",
        dataset=ARITH.format("train"), eval_dataset=ARITH.format("test"), max_prompt_length=256, max_new_tokens=128,
        overlong_buffer=32,
        temperature=0.7,  # at 1.0 SmolLM2 solves ~3% of samples, too few groups carry any signal
        learning_rate=1e-5, max_steps=20, eval_every=10, save_every=20, sample_every=10,
        token_budget=4096,  # fp32 activations take ~2 MB per token: 16384 would not fit in 24 GB
        **{**CPU, "num_generations": 8},
    ),
}
# fmt: on


# Copied from train_grlo.check_args
def check_args(args: Args, world: int) -> list:
    """Refuse impossible configurations in seconds, before any weights load, naming the flags to change. Returns
    notes on settings that are valid but cannot act, which rank 0 prints at start-up."""
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must divide by {world} processes")
    bookkeeping.check_model_path("--model", args.model)
    flags = f"--max-prompt-length {args.max_prompt_length} + --max-new-tokens {args.max_new_tokens}"
    bookkeeping.check_context_length(args.model, args.max_prompt_length + args.max_new_tokens, flags)
    row = args.max_prompt_length + args.num_generations * args.max_new_tokens
    if args.share_prompt and row > args.token_budget:
        raise ValueError(
            f"--share-prompt puts a prompt and its {args.num_generations} completions in one row of up to {row} "
            f"tokens, over --token-budget {args.token_budget}; drop --share-prompt or raise the budget"
        )
    return bookkeeping.rl_flag_notes(args)


# ---- 1. data ----
# Copied from train_grlo.tokenize_prompts
def tokenize_prompts(rows: list, tokenizer, max_prompt_length: int):
    """Render with the POLICY's chat template (as verl does), drop overlong prompts; returns (rows, ids, n_dropped)."""
    kept_rows, kept_ids = [], []
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already has any BOS
        if len(ids) <= max_prompt_length:
            kept_rows.append(row)
            kept_ids.append(ids)
    return kept_rows, kept_ids, len(rows) - len(kept_rows)


# Copied from train_grlo.step_prompt_indices
def step_prompt_indices(step: int, num_prompts: int, prompts_per_step: int, seed: int) -> list:
    """Prompt indices of a global step: a fresh permutation per epoch, a pure function of (seed, step). Resume needs
    nothing but the step number, and rows travel with their index, so a prompt keeps its ground truth."""
    out, perms = [], {}  # draw each epoch's permutation once, not once per prompt
    for pos in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, offset = divmod(pos, num_prompts)
        if epoch not in perms:
            perms[epoch] = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][offset]))
    return out


# ---- 2. rollout ----
# Copied from train_grlo.build_policy
def build_policy(args: Args, accelerator: Accelerator, max_steps: int):
    """Policy (fp32 master weights), AdamW and the LR schedule, prepared by Accelerate for the launched backend."""
    model = fit_check.from_pretrained(AutoModelForCausalLM, args.model, args.dummy_weights, dtype=torch.float32)
    if args.share_prompt:  # attention that skips the blocks the shared-prompt mask hides
        batching.use_shared_prefix_attention(model, args.model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # fused: one kernel over all tensors (CPU and CUDA); on CPU it is ~4x faster than the foreach default
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    updates_per_step = args.num_minibatches * args.ppo_epochs
    # "constant" has no warmup in transformers; "constant_with_warmup" is constant after --warmup-steps
    schedule = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler
    scheduler = get_scheduler(schedule, optimizer, args.warmup_steps * updates_per_step, max_steps * updates_per_step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    distributed.drop_fp32_output_cast(model, accelerator)  # TokenLogProbs upcasts the logits chunk by chunk
    return model, optimizer, scheduler


# Copied from train_grlo.request_seed
def request_seed(seed: int, step: int, prompt_index: int, sample: int) -> int:
    """Per-completion sampling seed from (seed, step, prompt, sample): reproducible on any rank count."""
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# Copied from train_grlo.rollout
def rollout(llm, model, accelerator, args: Args, prompt_ids_all: list, indices: list, step: int, eos_ids, pad_id):
    """G completions per prompt index, each group contiguous (so `view(-1, G)` is a group). Returns (prompt_ids,
    completion_ids, sampler_logprobs or None, truncated), one entry per completion."""
    G = args.num_generations
    prompt_ids = [prompt_ids_all[i] for i in indices for _ in range(G)]
    sampling = dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    if llm is not None:  # one seed per completion: the same samples on any number of processes
        seeds = [request_seed(args.seed, step, i, j) for i in indices for j in range(G)]
        out = generation.generate_vllm(
            llm, prompt_ids, seeds, eos_ids, show_progress=accelerator.is_main_process, **sampling
        )
    else:  # HF generate: one seed per step and rank; under ZeRO-3/FSDP every rank decodes until all are done
        seed = request_seed(args.seed, step, accelerator.process_index, 0)
        synced = distributed.forwards_are_collective(accelerator)
        with accelerator.autocast():  # bf16 on GPU, as the update computes
            policy = accelerator.unwrap_model(model)
            out = generation.generate_hf(policy, prompt_ids, seed, eos_ids, pad_id, synced_gpus=synced, **sampling)
    return (prompt_ids, *out)


# ---- 3. reward shaping ----
# Copied from train_grlo.shape_rewards
def shape_rewards(scores: torch.Tensor, completion_ids: list, truncated: list, args: Args):
    """Eq. 7: the reward the advantages see, from the judge's scores (n,), and which samples enter the loss.

    `--overlong penalty` (DAPO's soft overlong punishment): r = s - p * max(0, |o| - (L_max - b)) / b, i.e. 0 until
    b tokens before max_new_tokens, then linear down to -p at it; `--overlong mask`: truncated samples get loss
    weight 0. This is the one place to change for another shaping (a length penalty, a format bonus).
    Returns (rewards (n,), loss_mask_seq (n,))."""
    lengths = torch.tensor([len(c) for c in completion_ids], device=scores.device)
    rewards = scores.clone()
    if args.overlong == "penalty":
        over = (lengths - (args.max_new_tokens - args.overlong_buffer)).clamp(min=0).float()
        rewards = rewards - args.overlong_penalty * over / max(args.overlong_buffer, 1)
    cut = torch.tensor(truncated, dtype=torch.float32, device=scores.device)
    loss_mask_seq = 1.0 - cut if args.overlong == "mask" else torch.ones_like(scores)
    return rewards, loss_mask_seq


# ---- 4. advantages ----
def has_signal(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Eq. 8: (B,) True where a group's G rewards are not all equal. Equal rewards give zero advantage (eq. 1),
    so such a group only dilutes the batch: DAPO's dynamic sampling drops it."""
    grouped = scores.view(-1, num_generations)
    return grouped.max(dim=1).values > grouped.min(dim=1).values


# Copied from train_grlo.compute_advantages
def compute_advantages(rewards: torch.Tensor, num_generations: int, scale: str, batch_std=None, eps: float = 1e-6):
    """Eq. 1: A_i = r_i - mean(r_group), divided by the group std, the batch std, or nothing (Dr. GRPO).
    rewards: (B*G,) grouped contiguously. A group whose rewards are all equal gets zero advantage."""
    grouped = rewards.view(-1, num_generations)  # (B, G)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / ((rewards.std() if batch_std is None else batch_std) + eps)
    return adv.view(-1)  # (B*G,)


# ---- 5. loss and update ----
# Copied from train_grlo.policy_loss
def policy_loss(logprobs, old_logprobs, advantages, args: Args, sampler_logprobs=None, ref_logprobs=None, entropy=None):
    """Per-token loss (b, C) before aggregation, plus detached statistics.

    eq. 2  ratio = pi/pi_old;  L = -min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A)
    eq. 3  TIS: L *= min(pi_old / pi_vllm, C)     (vLLM sampled; corrects the sampler/trainer mismatch)
    eq. 4  L += kl_coef * KL_k(pi || pi_ref),  k1 = log(pi/pi_ref), k3 = exp(-d) + d - 1 with d = log(pi/pi_ref)
    eq. 5  L -= entropy_coef * H(pi)"""
    A = advantages[:, None] if advantages.dim() == 1 else advantages  # (b, 1) a sample's, or (b, C) a token's (PPO)
    ratio = torch.exp(logprobs - old_logprobs)  # (b, C)
    clipped = torch.clamp(ratio, 1 - args.clip_eps_low, 1 + args.clip_eps_high)
    per_token = torch.maximum(-A * ratio, -A * clipped)
    log_ratio = (logprobs - old_logprobs).detach()
    stats = {"clipfrac": ((ratio - clipped).abs() > 0).float(), "ratio": ratio.detach(),
             "approx_kl": torch.exp(log_ratio) - 1 - log_ratio, "old_approx_kl": -log_ratio}  # fmt: skip
    if sampler_logprobs is not None and args.tis_cap > 0:
        tis = torch.exp(old_logprobs - sampler_logprobs).clamp(max=args.tis_cap).detach()
        per_token = per_token * tis
        stats["tis_weight"] = tis
    if ref_logprobs is not None:
        d = logprobs - ref_logprobs
        kl = d if args.kl_estimator == "k1" else torch.exp(-d) + d - 1
        per_token = per_token + args.kl_coef * kl
        stats["kl"] = kl.detach()
    if args.entropy_coef > 0:
        per_token = per_token - args.entropy_coef * entropy
    return per_token, stats


# Copied from train_grlo.token_weights
def token_weights(completion_mask: torch.Tensor, mode: str, num_seqs: float, num_tokens: float, max_new_tokens: int):
    """Eq. 6, aggregation as per-token weights, so micro-batches and ranks add up to the right total.

    token-mean: 1/T_total;  seq-mean-token-mean: 1/(N * |o_i|);  constant (Dr. GRPO): 1/(N * max_new_tokens)."""
    if mode == "token-mean":
        return completion_mask / num_tokens
    if mode == "seq-mean-token-mean":
        return completion_mask / completion_mask.sum(-1, keepdim=True).clamp(min=1) / num_seqs
    return completion_mask / (num_seqs * max_new_tokens)


# Copied from train_grlo.old_and_ref_logprobs
@torch.no_grad()
def old_and_ref_logprobs(model, ref_model, accelerator, args: Args, prompt_ids, completion_ids, pad_id):
    """pi_old (and pi_ref) log-probs of every completion token, one list entry per sample, before any update."""
    old_lp, ref_lp = [None] * len(completion_ids), [None] * len(completion_ids)
    group = args.num_generations if args.share_prompt else 1
    micro = batching.make_microbatches(prompt_ids, completion_ids, args.token_budget, group)
    for mb in distributed.lockstep(micro, accelerator):  # every rank runs as many forwards (ZeRO-3/FSDP gather)
        b = batching.collate(mb, prompt_ids, completion_ids, pad_id, accelerator.device, group)
        with accelerator.autocast():
            lp = batching.completion_logprobs(model, b, args.temperature)[0]
            ref = batching.completion_logprobs(ref_model, b, args.temperature)[0] if ref_model is not None else lp
        for row, i in enumerate(mb):
            old_lp[i], ref_lp[i] = lp[row, : len(completion_ids[i])], ref[row, : len(completion_ids[i])]
    return old_lp, ref_lp


# Copied from train_grlo.draw_minibatches
def draw_minibatches(n: int, mb_size: int, epochs: int, seed: int, step: int) -> list:
    """`epochs` passes over samples 0..n-1, each in mini-batches of mb_size (in index order) drawn anew from
    (seed, step, epoch) only: the same after a resume."""
    out = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + epoch))
        out += [sorted(order[k : k + mb_size].tolist()) for k in range(0, n, mb_size)]
    return out


# Copied from train_grlo.train_on_batch
def train_on_batch(model, ref_model, optimizer, scheduler, accelerator, args: Args, samples, pad_id, step):
    """Eq. 2-6 over one rollout batch: `num_minibatches` optimizer steps, `ppo_epochs` times.

    Returns (sums of per-token statistics, grad norms). Raises FloatingPointError on a non-finite gradient norm
    (all ranks see the same all-reduced norm, so all stop): before the optimizer step, or under DeepSpeed, whose
    engine steps inside backward, just after it; the message says which. samples = (prompt_ids, completion_ids,
    sampler_logprobs or None, advantages (n,), loss_mask_seq (n,)), one entry per completion, groups contiguous."""
    prompt_ids, completion_ids, sampler_logprobs, advantages, loss_mask_seq = samples
    device, world, n = accelerator.device, accelerator.num_processes, len(completion_ids)
    model.train()
    group = args.num_generations if args.share_prompt else 1  # --share-prompt: one prompt forward per group
    mb_size = math.ceil(n / args.num_minibatches)
    old_lp = ref_lp = None  # with a single update pi_old is the current policy, detached: no no-grad pass
    if args.num_minibatches * args.ppo_epochs > 1 or ref_model is not None:
        old_lp, ref_lp = old_and_ref_logprobs(model, ref_model, accelerator, args, prompt_ids, completion_ids, pad_id)
    keys = ("loss", "clipfrac", "ratio", "approx_kl", "old_approx_kl", "tis_weight", "kl", "entropy", "tokens")
    sums, grad_norms = {k: torch.zeros((), device=device) for k in keys}, []
    minibatches = draw_minibatches(n, mb_size, args.ppo_epochs, args.seed, step)  # new ones each epoch
    bar = tqdm(total=len(minibatches), desc="update", leave=False, disable=not accelerator.is_main_process)
    for mb in minibatches:
        # global counts (summed over ranks) of the samples IN the loss, for the eq. 6 weights: a sample masked
        # by --overlong mask drops out of the denominators too, as if it had not been sampled
        in_loss, lengths = loss_mask_seq[mb], torch.tensor([len(completion_ids[i]) for i in mb], device=device)
        counts = torch.stack([in_loss.sum(), (in_loss * lengths).sum()]).float()
        num_seqs, num_tokens = accelerator.reduce(counts, "sum").clamp(min=1).tolist()
        micro = batching.make_microbatches(prompt_ids, completion_ids, args.token_budget, group, indices=mb)
        micro = distributed.lockstep(micro, accelerator)  # every rank runs as many forwards and backwards
        for k, m in enumerate(micro):
            b = batching.collate(m, prompt_ids, completion_ids, pad_id, device, group)
            C, last = b["completion_ids"].shape[1], k == len(micro) - 1
            # gradients all-reduce (DDP) and DeepSpeed steps its engine on the last micro-batch only
            accelerator.sync_gradients = last  # accelerate's public setter
            with distributed.no_sync(model, accelerator, last):
                with accelerator.autocast():
                    logprobs, entropy = batching.completion_logprobs(model, b, args.temperature)  # (b, C)
                old = batching.pad_values(old_lp, m, C, device) if old_lp is not None else logprobs.detach()
                ref = batching.pad_values(ref_lp, m, C, device) if ref_model is not None else None
                samp = batching.pad_values(sampler_logprobs, m, C, device) if sampler_logprobs is not None else None
                per_token, stats = policy_loss(logprobs, old, advantages[m], args, samp, ref, entropy)
                mask = b["completion_mask"] * loss_mask_seq[m][:, None]  # (b, C); 0 on prompt/pad tokens
                weights = token_weights(mask, args.loss_agg, num_seqs, num_tokens, args.max_new_tokens)
                # DDP averages gradients over ranks; the weights already divide by GLOBAL counts, so undo it
                loss = (per_token * weights).sum() * world
                accelerator.backward(loss)
            with torch.no_grad():  # statistics over the tokens in the loss
                sums["loss"] += loss.detach() / world
                sums["tokens"] += mask.sum()
                sums["entropy"] += (entropy.detach() * mask).sum()
                for key in stats:
                    sums[key] += (stats[key] * mask).sum()
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        if not torch.isfinite(grad_norm):  # nothing of this step is saved; say where to restart from
            last = (bookkeeping.list_checkpoints(args.output_dir) or ["(none)"])[-1]
            what = "this update was not applied"
            if distributed.steps_inside_backward(accelerator):  # DeepSpeed steps its engine inside backward
                what = "DeepSpeed's engine already applied this update; the weights in memory are suspect"
            raise FloatingPointError(
                f"non-finite gradient norm ({grad_norm}); {what}. Nothing of this step was saved; the last good "
                f"checkpoint is {last}. Check the rewards, lower --learning-rate or use fp32."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        grad_norms.append(float(grad_norm))
        bar.update()
    bar.close()
    return sums, grad_norms


# ---- 7. log: held-out accuracy ----
# Copied from train_grlo.evaluate_heldout
def evaluate_heldout(
    llm, model, accelerator, args: Args, rows: list, prompt_ids: list, eos_ids: list, pad_id, tokenizer
):
    """Greedy accuracy on held-out rows, judged by `reward.compute_rewards` like evaluate.py (the verifier for rows
    with ground truth: the gold measure, never a training reward); data-parallel over ranks."""
    greedy = dataclasses.replace(args, temperature=0.0, num_generations=1)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    scores = []
    # a rank without rows still decodes one (discarded): under ZeRO-3/FSDP every HF decoding step is a collective
    _, completion_ids, _, truncated = rollout(
        llm, model, accelerator, greedy, prompt_ids, mine or [0], 0, eos_ids, pad_id
    )
    truncated = truncated[: len(mine)]
    if mine:
        responses = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        scores, _, _ = reward.compute_rewards([rows[i] for i in mine], responses)
    totals = torch.tensor([sum(scores), len(scores), sum(truncated)], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, "sum")
    return {"eval/accuracy": float(totals[0] / totals[1]), "eval/clipped_ratio": float(totals[2] / totals[1])}


# ---- setup ----
# Copied from train_grlo.build_models
def build_models(args: Args, accelerator, max_steps: int, log, need_reward_model: bool = True):
    """The policy with AdamW and its schedule; the frozen reward model (if needed) and reference (if --kl-coef),
    whole on every rank; this rank's vLLM engine (or None). Frozen models and vLLM run in the compute dtype."""
    if need_reward_model:  # before any weights load
        bookkeeping.check_model_path("--reward-model", args.reward_model)
    model, optimizer, scheduler = build_policy(args, accelerator, max_steps)
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32  # frozen models and vLLM
    with distributed.replicated_loading():  # frozen models: whole on every rank, never prepared
        reward_model = reward.RewardModel(args.reward_model, device=str(accelerator.device), dtype=dtype,
                                          batch_size=args.rm_batch_size, max_length=args.rm_max_length,
                                          share_prefix=args.share_prompt, dummy_weights=args.dummy_weights,
                                          ) if need_reward_model else None  # fmt: skip
        ref_model = (distributed.frozen_policy(args.model, dtype, accelerator.device, args.share_prompt,
                                               args.dummy_weights) if args.kl_coef > 0 else None)  # fmt: skip
    max_len, seed = args.max_prompt_length + args.max_new_tokens, args.seed + accelerator.process_index
    llm = generation.build_vllm(args.model, dtype, seed, max_len, accelerator, args.vllm_gpu_memory_utilization,
                                args.vllm_sleep, args.dummy_weights) if args.use_vllm else None  # fmt: skip
    precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
    run = f"{distributed.backend(accelerator)}, {accelerator.num_processes} process(es), {precision}"
    log(f"backend: {run}, grad clip {distributed.clip_norm(model, accelerator, args.max_grad_norm)}")
    return model, optimizer, scheduler, reward_model, ref_model, llm


def main(args: Args):
    accelerator, log, writer = bookkeeping.start_run(args, check_args)  # the launched backend; only rank 0 logs
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    # ---- 1. data: rows with ground truth, the policy's chat template, overlong prompts dropped; held-out set ----
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = reward.load_rows(
        args.dataset, args.dataset_split, reward.to_rlvr_row
    )  # bad records stop here, with file:line
    rows, prompt_ids_all, n_dropped = tokenize_prompts(rows, tokenizer, args.max_prompt_length)
    if not rows:
        raise ValueError(f"{args.dataset}: no prompt fits --max-prompt-length {args.max_prompt_length}")
    eval_rows, eval_ids = [], []
    if args.eval_dataset and args.eval_every:
        eval_rows = reward.load_rows(args.eval_dataset, "test", reward.to_rlvr_row)[: args.eval_limit or None]
        eval_rows, eval_ids, _ = tokenize_prompts(eval_rows, tokenizer, args.max_prompt_length)
    reward.check_sandbox(rows + eval_rows)  # rows judged by running code: the sandbox must work before anything loads
    max_steps = args.max_steps or args.num_epochs * math.ceil(len(rows) / args.prompts_per_step)
    if writer is not None:  # --max-prompt-length silently shortens the data otherwise
        writer.add_scalar("charts/prompts_dropped", n_dropped, 0)
    # EOS ids and the chat template's turn end; none with --dummy-weights: every completion runs to the limit
    eos_ids = [] if args.dummy_weights else generation.eos_token_ids(tokenizer, args.model)
    log(f"stop ids: {eos_ids}")
    log(f"data: {len(rows)} prompts ({n_dropped} over {args.max_prompt_length} tokens dropped), {max_steps} steps")

    # ---- setup: policy + optimizer, reward model only if a row asks for it, optional reference, vLLM; resume ----
    need_rm = any(r["reward_model"]["style"] == "model" for r in rows)
    phases = bookkeeping.Phases(device)  # time and peak memory of each phase, every step
    with phases("setup"):
        model, optimizer, scheduler, reward_model, ref_model, llm = build_models(
            args, accelerator, max_steps, log, need_rm
        )
    sleep = llm is not None and args.vllm_sleep and torch.cuda.is_available()  # GPU only
    # data_round counts rollout rounds (the data cursor): dynamic sampling makes it run ahead of the step
    saved = bookkeeping.resume(accelerator, args.output_dir, log) if args.resume else {"step": 0}
    start_step, data_round = saved["step"], saved.get("data_round", 0)
    if llm is not None and start_step > 0:
        generation.sync_weights(llm, model, accelerator)
    rollouts_path = os.path.join(args.output_dir, "rollouts.jsonl")
    rollout_file = open(rollouts_path, "a") if accelerator.is_main_process else None
    if eval_rows and start_step == 0:
        model.eval()
        accuracy = evaluate_heldout(llm, model, accelerator, args, eval_rows, eval_ids, eos_ids, pad_id, tokenizer)
        log(f"eval before training | accuracy {accuracy['eval/accuracy']:.4f} on {len(eval_rows)} held-out problems")
        if writer is not None:
            writer.add_scalar("eval/accuracy", accuracy["eval/accuracy"], 0)

    B_local, G = args.prompts_per_step // world, args.num_generations
    for step in range(start_step, max_steps):
        t_step = time.time()
        # ---- 1-3. data, rollout and verification, in rounds of fresh prompts until B groups carry signal ----
        # TRY NOT TO MODIFY: every rank runs the same number of rounds (the stop test is all-reduced), and
        # prompts come from the global order by round, so resume needs only the round cursor.
        model.eval()
        kept, dropped, seen_scores, count_stats, n_math_seen = [], [], [], {}, 0
        for rounds in range(1, args.max_sampling_rounds + 1):
            indices = step_prompt_indices(data_round, len(rows), args.prompts_per_step, args.seed)
            indices = indices[rank * B_local : (rank + 1) * B_local]
            with phases("rollout"):  # rounds add up
                out = rollout(llm, model, accelerator, args, prompt_ids_all, indices, data_round, eos_ids, pad_id)
            prompt_ids, completion_ids, sampler_logprobs, truncated = out
            batch_rows = [rows[i] for i in indices for _ in range(G)]
            responses = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            with phases("reward"):
                scores, reward_stats, outcomes = reward.compute_rewards(batch_rows, responses, reward_model)
            data_round += 1
            seen_scores += scores
            n_math_seen += sum(r["ability"] == "math" for r in batch_rows)
            # counts add up over rounds; per-source means are re-derived below
            count_stats |= {k: count_stats.get(k, 0.0) + v for k, v in reward_stats.items() if not k.endswith("_mean")}
            signal = has_signal(torch.tensor(scores), G)  # eq. 8
            fields = {"rows": batch_rows, "prompt_ids": prompt_ids, "completion_ids": completion_ids,
                      "sampler_logprobs": sampler_logprobs or [None] * len(scores), "truncated": truncated,  # None: HF
                      "responses": responses, "scores": scores, "outcomes": outcomes}  # fmt: skip
            for g in range(len(indices)):  # one record per group: each field's G samples
                group = {k: v[g * G : (g + 1) * G] for k, v in fields.items()}
                (kept if signal[g] or not args.dynamic_sampling else dropped).append(group)
            if not args.dynamic_sampling or distributed.every_rank(len(kept) >= B_local, accelerator):
                break
        # ALGO LOGIC: a short batch (round cap hit) is topped up with dropped groups: zero advantage, same shapes
        batch, n_signal = (kept + dropped)[:B_local], min(len(kept), B_local)
        flat = {k: [x for group in batch for x in group[k]] for k in fields}  # the groups' samples, in group order
        batch_rows, prompt_ids, completion_ids, sampler_logprobs, truncated, responses, scores, outcomes = flat.values()
        sampler_logprobs = sampler_logprobs if llm is not None else None
        if sleep:  # free GPU memory for the update; the trained weights are pushed at wake-up (never stale)
            with phases("sleep"):
                generation.vllm_sleep(llm)
        scores_t = torch.tensor(scores, dtype=torch.float32, device=device)  # (B_local*G,)
        rewards, loss_mask_seq = shape_rewards(scores_t, completion_ids, truncated, args)  # eq. 7

        # ---- 4. advantages (eq. 1) ----
        all_rewards = accelerator.gather(rewards)
        advantages = compute_advantages(rewards, G, args.scale_rewards, batch_std=all_rewards.std())  # (B_local*G,)

        # ---- 5. update: mini-batches x epochs, micro-batches by token budget (eq. 2-6) ----
        samples = (prompt_ids, completion_ids, sampler_logprobs, advantages, loss_mask_seq)
        with phases("train"):
            sums, grad_norms = train_on_batch(
                model, ref_model, optimizer, scheduler, accelerator, args, samples, pad_id, step
            )

        # ---- 6. sync: the new weights into vLLM ----
        with phases("weight_sync"):
            if sleep:
                generation.vllm_wake_and_sync(llm, model, accelerator)
            elif llm is not None:
                generation.sync_weights(llm, model, accelerator)

        # ---- 7. log: one console line, TensorBoard, rollouts.jsonl; held-out accuracy every eval_every ----
        tis, kl = sampler_logprobs is not None and args.tis_cap > 0, ref_model is not None
        metrics = bookkeeping.train_metrics(sums, grad_norms, scheduler, accelerator, tis, kl)
        metrics |= bookkeeping.completion_metrics(completion_ids, truncated, eos_ids, tokenizer, accelerator)
        seen = accelerator.gather(torch.tensor(seen_scores, device=device))
        counts = accelerator.reduce(torch.tensor([n_signal, len(batch)], dtype=torch.float32, device=device), "sum")
        step_time, phase_times = time.time() - t_step, phases.line()
        metrics |= {
            "charts/tokens_per_sec": metrics.pop("completions/tokens") / max(phases.seconds["rollout"], 1e-9),
            "charts/episodes": data_round * args.prompts_per_step * G,
            "charts/sampling_rounds": rounds,
            "rewards/accuracy": float(seen.mean()),
            "rewards/mean": float(all_rewards.mean()),
            "rewards/std": float(all_rewards.std()),
            "rewards/frac_zero_std": float(1 - has_signal(seen.float().cpu(), G).float().mean()),
            "rewards/batch_signal_frac": float(counts[0] / counts[1]),
            **{k: float(v) for k, v in count_stats.items()},  # per-rank counts: rank 0's share
            **phases.take(),  # time/rollout, memory/rollout_gib, ... (bookkeeping.Phases)
            "time/step": step_time,
        }
        if n_math_seen and "rewards/math_no_answer" in count_stats:  # share of math answers math-verify could parse
            metrics["rewards/format"] = 1 - count_stats["rewards/math_no_answer"] / n_math_seen
        if eval_rows and ((step + 1) % args.eval_every == 0 or step + 1 == max_steps):
            model.eval()
            metrics |= evaluate_heldout(llm, model, accelerator, args, eval_rows, eval_ids, eos_ids, pad_id, tokenizer)
        if accelerator.is_main_process:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step + 1)
            bookkeeping.write_rollouts(rollout_file, step, batch_rows, responses, scores, rewards, truncated, outcomes)
        m = metrics
        log(
            f"step {step + 1:>5}/{max_steps} | acc {m['rewards/accuracy']:.3f} reward {m['rewards/mean']:+.4f} "
            f"| rounds {rounds} signal {m['rewards/batch_signal_frac']:.2f} | len {m['completions/mean_length']:6.1f} "
            f"clip {m['completions/clipped_ratio']:.2f} | loss {m['losses/policy_loss']:+.5f} "
            f"gnorm {m['losses/grad_norm']:.3f} "
            + (f"| eval {m['eval/accuracy']:.4f} " if "eval/accuracy" in m else "")
            + f"| {step_time:5.1f}s ({phase_times})"
        )
        if args.sample_every and (step + 1) % args.sample_every == 0:
            prompt, completion = batch_rows[0]["prompt"][-1]["content"], responses[0]
            log(f"--- sample @ step {step + 1} (score {scores[0]:.0f})\n[prompt] {prompt}\n[completion] {completion}")

        # ---- 8. checkpoint, with the data cursor ----
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == max_steps:
            with phases("checkpoint"):
                bookkeeping.save_checkpoint(
                    accelerator, model, tokenizer, args.output_dir, step + 1, args.keep_last, {"data_round": data_round}
                )

    if args.dummy_weights:  # the fit check: each phase's time and memory against the plan (fit_check.py)
        fit_check.report(phases, args, accelerator, prompt_ids, completion_ids, reward_model is not None, llm, log)
    if accelerator.is_main_process:
        rollout_file.close()
        writer.close()
        log(bookkeeping.reward_trend(rollouts_path))
    if llm is not None:  # before Accelerate destroys the process group the engine still holds
        llm.llm_engine.engine_core.shutdown()
    accelerator.end_training()


if __name__ == "__main__":
    main(bookkeeping.cli(Args, PRESETS, __doc__))
