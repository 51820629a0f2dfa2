"""GRLO stage: GRPO RLHF "from zero" on a base LLM with open-ended prompts and a reward model.

The method, one step at a time (docs/train_grlo.md "Implementation details" uses the same numbers):
  1. take B prompts (official GRLO JSONL), render them with the policy's chat template;
  2. sample G completions each with vLLM in-process (or HF `generate`), stopping on every EOS id;
  3. score each (prompt, completion) with `reward.compute_rewards` (reward model for style "model");
  4. group-relative advantages A_i = (r_i - mean_G r) / (std_G r + eps)                     (eq. 1);
  5. clipped surrogate with optional TIS, KL and entropy terms, aggregated per `--loss-agg` (eq. 2-5);
  6. push the new weights into the vLLM engine; log, checkpoint, repeat.

Departures from the official release (verl PPO + GAE with a critic): we use GRPO (no critic, G samples
per prompt, group baseline), so `prompts_per_step * num_generations` = 128 x 8 = 1024 samples per step
matches the release's 1024-sample batch. Everything else follows the release: lr 1e-6, no KL, clip 0.2,
temperature 1.0, token-mean loss, prompt 1024 / response 3072 tokens, 4 PPO mini-batches, 15 epochs.

    python local_models.py --which tiny && python train_grlo.py --preset cpu-smoke        # CPU, minutes
    accelerate launch --multi_gpu --num_processes 2 train_grlo.py --preset cpu-smoke       # 2 CPU ranks
    accelerate launch --config_file configs/ddp.yaml train_grlo.py --dataset train.jsonl   # 4 GPUs, paper
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # keep the engine in this process (weight sync reaches it)
import numpy as np
import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, get_scheduler

import reward
import systems

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    # experiment / tracking
    preset: Literal["paper", "cpu-smoke", "cpu-smollm2"] = "paper"
    """named config whose values become the defaults; give it first, later flags override it"""
    exp_name: str = "grlo"
    """run name for TensorBoard and wandb"""
    seed: int = 1
    """seed for data order, sampling and init"""
    output_dir: str = "runs/grlo"
    """checkpoints, TensorBoard events and rollouts.jsonl go here"""
    track: bool = False
    """mirror TensorBoard to wandb"""
    wandb_project: str = "grlo"
    """wandb project (with --track)"""
    wandb_entity: Optional[str] = None
    """wandb entity (with --track); None uses your default"""
    sample_every: int = 10
    """print one prompt, completion and reward every N steps; 0 disables"""

    # model
    model: str = "Qwen/Qwen3-4B-Base"
    """policy: hub id or local HF folder (a base model, as in the paper)"""
    reward_model: str = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"
    """sequence-classification reward model: hub id or local folder"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """compute dtype: bf16 autocast (fp32 master weights) or fp32; auto = bf16 on GPU, fp32 on CPU"""
    gradient_checkpointing: bool = True
    """recompute activations in backward: a 16K-token micro-batch of a 4B model needs ~100 GiB without it"""
    rm_batch_size: int = 8
    """reward-model forward batch size"""
    rm_max_length: int = 4096
    """reward-model max tokens; longer conversations keep the response's end (logged as rewards/rm_truncated)"""

    # data
    dataset: str = os.path.join(HERE, "data", "open_prompts.jsonl")
    """hub id or local .jsonl/.json/.parquet in the official GRLO format (or with a messages/prompt column)"""
    dataset_split: str = "train"
    """split for hub datasets"""
    max_prompt_length: int = 1024
    """prompts longer than this many tokens (after the chat template) are dropped and counted"""

    # rollout
    use_vllm: bool = True
    """sample with an in-process vLLM engine; --no-use-vllm falls back to HF generate"""
    num_generations: int = 8
    """G: completions per prompt"""
    prompts_per_step: int = 128
    """B: prompts per step, over all processes (must divide by the number of processes)"""
    max_new_tokens: int = 3072
    """max tokens per completion; longer ones are cut (logged as completions/clipped_ratio)"""
    temperature: float = 1.0
    """sampling temperature (also divides the trainer's logits so log-probs match)"""
    top_p: float = 1.0
    """nucleus sampling; 1.0 disables"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory vLLM may take (GPU only; checked at start-up, before AdamW state exists: docs/gpu.md)"""
    vllm_cpu_kv_cache_gb: float = 1.0
    """KV-cache GiB per engine on CPU (there gpu_memory_utilization would reserve a fraction of RAM)"""
    vllm_sleep: bool = True
    """GPU only: free vLLM's weights and KV cache during the update (sleep level 2, trained weights re-pushed)"""

    # algorithm
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """advantage scale: group std (GRPO), whole-batch std, or none (Dr. GRPO)"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "constant"] = "token-mean"
    """loss aggregation: over all tokens, per sequence then mean, or sum / (sequences * max_new_tokens) (Dr. GRPO)"""
    clip_eps_low: float = 0.2
    """PPO clip: ratio lower bound 1 - eps_low"""
    clip_eps_high: float = 0.2
    """PPO clip: ratio upper bound 1 + eps_high (0.28 = DAPO clip-higher)"""
    kl_coef: float = 0.0
    """KL-to-reference coefficient in the loss; 0 disables and loads no reference model"""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator: k1 = log ratio, k3 = exp(-d) + d - 1 (unbiased, >= 0)"""
    entropy_coef: float = 0.0
    """entropy bonus coefficient; 0 disables"""
    tis_cap: float = 2.0
    """truncated importance sampling cap C on pi_train / pi_vllm; 0 disables"""
    overlong: Literal["none", "mask", "penalty"] = "none"
    """truncated completions: keep, mask out of the loss, or a soft length penalty (DAPO)"""
    overlong_buffer: int = 256
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
    token_budget: int = 16384
    """max padded tokens per forward micro-batch; sets gradient accumulation"""
    share_prompt: bool = False
    """forward each prompt once per group, in the update and the RM: its G completions follow it in one row, masked apart (eq. 8)"""
    keep_freed_memory: bool = True
    """CPU runs: glibc keeps freed memory for reuse instead of returning it to the OS (systems.keep_freed_memory)"""
    num_epochs: int = 2
    """passes over the prompt set; sets the step count when max_steps is 0 (2 x G=8 ~ the release's 15 x n=1)"""
    max_steps: int = 0
    """stop after this many steps; 0 = num_epochs over the data"""

    # eval / checkpoint
    save_every: int = 50
    """save a checkpoint every N steps (and at the end); 0 = only at the end"""
    keep_last: int = 2
    """keep this many newest checkpoints"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir"""


PRESETS = {
    "paper": Args(),
    "cpu-smoke": Args(
        preset="cpu-smoke", model=os.path.join(HERE, "local_models", "tiny-qwen3"),
        reward_model=os.path.join(HERE, "local_models", "tiny-qwen3-rm"), output_dir="runs/cpu-smoke",
        max_prompt_length=128, num_generations=4, prompts_per_step=8, max_new_tokens=24, learning_rate=3e-3,
        num_minibatches=1, max_steps=30, save_every=10, sample_every=10, vllm_cpu_kv_cache_gb=0.25,
        gradient_checkpointing=False,  # tiny activations; recomputing them only costs time
    ),
    "cpu-smollm2": Args(
        preset="cpu-smollm2", model=os.path.join(HERE, "local_models", "smollm2-135m"),
        reward_model=os.path.join(HERE, "local_models", "smollm2-135m-rm"), output_dir="runs/cpu-smollm2",
        max_prompt_length=256, num_generations=4, prompts_per_step=8, max_new_tokens=64, learning_rate=2e-6,
        num_minibatches=1, max_steps=20, save_every=10, sample_every=5,
        token_budget=4096,  # fp32 activations take ~2 MB per token: 16384 would not fit in 24 GB
        share_prompt=True,  # short completions: the prompt is ~40% of each sample's tokens
        gradient_checkpointing=False,  # 4096-token micro-batches fit; recomputing would cost ~1/3 more train time
    ),
}  # fmt: skip


def check_args(args: Args, world: int) -> None:
    """Refuse impossible configurations in seconds, before any weights load, naming the flags to change."""
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must divide by {world} processes")
    systems.check_context_length(args.model, args.max_prompt_length + args.max_new_tokens,
                                 f"--max-prompt-length {args.max_prompt_length} + --max-new-tokens {args.max_new_tokens}")  # fmt: skip
    row = args.max_prompt_length + args.num_generations * args.max_new_tokens
    if args.share_prompt and row > args.token_budget:
        raise ValueError(f"--share-prompt puts a prompt and its {args.num_generations} completions in one row of up to {row} "
                         f"tokens, over --token-budget {args.token_budget}; drop --share-prompt or raise the budget")  # fmt: skip


# ---- data ----
def _to_row(obj, where: str) -> dict:
    """Validate one record into the official format; `where` ("file:line") goes into every error."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj and isinstance(obj["prompt"], str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    elif "prompt" in obj:
        messages = obj["prompt"]
    elif "messages" in obj:  # chat datasets: keep the conversation up to the last user turn
        messages = list(obj["messages"])
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()
    else:
        raise ValueError(f"{where}: field 'prompt' is missing (expected a list of chat messages, or 'messages')")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty list of {{role, content}} messages")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: field 'prompt[{k}]' must be {{'role': str, 'content': str}}, got {m!r:.80}")
    rm = obj.get("reward_model") or {"style": "model", "ground_truth": ""}
    if not isinstance(rm, dict) or rm.get("style") not in ("model", "rule"):
        raise ValueError(f"{where}: field 'reward_model.style' must be 'model' or 'rule', got {rm!r:.80}")
    if rm["style"] == "rule" and rm.get("ground_truth") in (None, ""):
        raise ValueError(f"{where}: field 'reward_model.ground_truth' is empty, but style 'rule' is verified against it")
    return {**obj, "prompt": messages, "reward_model": rm, "ability": obj.get("ability", "general")}


def read_records(dataset: str, split: str = "train"):
    """Yield ("file:line", record) from a local .jsonl/.json/.parquet or a hub dataset, naming bad lines."""
    if os.path.exists(dataset) and dataset.endswith(".jsonl"):
        with open(dataset) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{dataset}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield f"{dataset}:{n}", obj
        return
    import datasets  # only needed for hub ids, .json and .parquet

    if os.path.exists(dataset):
        kind = "parquet" if dataset.endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=dataset, split="train")
    else:
        ds = datasets.load_dataset(dataset, split=split)
    for n, obj in enumerate(ds):
        yield f"{dataset}:row {n}", obj


def load_rows(dataset: str, split: str = "train") -> list:
    """Validated rows in the official GRLO format (see `_to_row`)."""
    return [_to_row(obj, where) for where, obj in read_records(dataset, split)]


def tokenize_prompts(rows: list, tokenizer, max_prompt_length: int):
    """Render with the POLICY's chat template (as verl does) and drop overlong prompts; returns (rows, ids, n_dropped)."""
    kept_rows, kept_ids = [], []
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already has any BOS
        if len(ids) <= max_prompt_length:
            kept_rows.append(row)
            kept_ids.append(ids)
    return kept_rows, kept_ids, len(rows) - len(kept_rows)


def step_prompt_indices(step: int, num_prompts: int, prompts_per_step: int, seed: int) -> list:
    """Prompt indices of a global step: a fresh permutation per epoch, a pure function of (seed, step).

    Resume needs nothing but the step number, and rows travel with their index, so a prompt can never
    be desynced from its ground truth by shuffling or sharding."""
    out, perms = [], {}  # draw each epoch's permutation once, not once per prompt
    for pos in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, offset = divmod(pos, num_prompts)
        if epoch not in perms:
            perms[epoch] = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][offset]))
    return out


def request_seed(seed: int, step: int, prompt_index: int, sample: int) -> int:
    """Per-completion sampling seed from (seed, step, prompt, sample): reproducible on any rank count."""
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ---- policy ----
def build_policy(args: Args, accelerator: Accelerator, max_steps: int):
    """Policy (fp32 master weights), AdamW and the LR schedule, prepared by Accelerate for the launched backend."""
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.share_prompt:  # sdpa that skips the attention blocks the eq. 8 mask hides (~3x less attention work)
        reward.use_shared_prefix_attention(model, args.model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # fused: one kernel over all tensors (CPU and CUDA); on CPU it is ~4x faster than the foreach default
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    updates_per_step = args.num_minibatches * args.ppo_epochs
    schedule = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler  # "constant" has no warmup
    scheduler = get_scheduler(schedule, optimizer, args.warmup_steps * updates_per_step, max_steps * updates_per_step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    systems.drop_fp32_output_cast(model, accelerator)  # TokenLogProbs upcasts the logits chunk by chunk
    return model, optimizer, scheduler


# ---- rollout ----
def eos_token_ids(tokenizer, model_path: str) -> list:
    """Every id that ends a completion: the tokenizer's EOS, generation_config's (Qwen3 has two), and the token
    the chat template puts right after an assistant turn. A base model's tokenizer and generation config may
    name only the document end (<|endoftext|>) while its template closes a turn with <|im_end|>: without the
    last one the model writes invented turns until --max-new-tokens, and the RM scores all of it."""
    ids = {tokenizer.eos_token_id}
    try:
        gen_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    except OSError:  # no generation_config.json
        pass
    if tokenizer.chat_template:  # render a dummy turn and read off the first token after the reply
        marker = "GRLO_TURN_END_PROBE"
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(turn, tokenize=False)
        after = tokenizer(text[text.rindex(marker) + len(marker) :].lstrip(" "), add_special_tokens=False)["input_ids"]
        if after and (after[0] in tokenizer.all_special_ids or tokenizer.convert_ids_to_tokens(after[0]) in tokenizer.get_added_vocab()):
            ids.add(after[0])
    return sorted(i for i in ids if i is not None)


def build_vllm(args: Args, accelerator: Accelerator, model_dtype: torch.dtype):
    from vllm import LLM

    kwargs = dict(
        # eager on CPU, where compiling costs ~100 s of start-up; CUDA graphs on GPU
        model=args.model, dtype=model_dtype, seed=args.seed + accelerator.process_index,
        enforce_eager=accelerator.device.type == "cpu",
        max_model_len=args.max_prompt_length + args.max_new_tokens, tensor_parallel_size=1,
        logprobs_mode="processed_logprobs",  # log-probs after temperature, like the trainer's
    )  # fmt: skip
    if accelerator.num_processes > 1:  # one engine per rank inside the launcher's processes (TRL's colocate)
        kwargs["distributed_executor_backend"] = "external_launcher"
    if accelerator.device.type == "cpu":  # there gpu_memory_utilization would reserve that share of all RAM
        kwargs["kv_cache_memory_bytes"] = int(args.vllm_cpu_kv_cache_gb * 2**30)
        # vLLM 0.32 CPU crashes ("CPU Generator does not use offset") when a seeded request's prompt is
        # prefilled in chunks, so prefill every prompt whole.
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(kwargs["max_model_len"], 4096))
    else:
        kwargs.update(gpu_memory_utilization=args.vllm_gpu_memory_utilization, enable_sleep_mode=args.vllm_sleep)
    return LLM(**kwargs)


def generate_vllm(llm, prompt_ids: list, seeds: list, args: Args, eos_ids: list, show_progress: bool):
    """One request per completion, each with its own seed. Returns (ids, sampler logprobs, truncated)."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=1, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens, seed=s,
            logprobs=0, stop_token_ids=eos_ids, ignore_eos=False, skip_special_tokens=True,
        )  # fmt: skip
        for s in seeds
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=show_progress)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs] for o in outs]
    truncated = [o.outputs[0].finish_reason == "length" for o in outs]
    return ids, logprobs, truncated


@torch.no_grad()
def generate_hf(model, prompt_ids: list, seed: int, args: Args, eos_ids: list, pad_id: int, synced_gpus: bool = False):
    """HF fallback with vLLM's semantics: same temperature/top-p, no top-k, stop on every EOS id.

    HF cannot seed each request, so the step is seeded as a whole; sampler log-probs are the trainer's
    own (None), which makes the TIS weight exactly 1. Temperature 0 is greedy, as in vLLM. With sharded
    weights (ZeRO-3, FSDP) every decoding step all-gathers, so `synced_gpus` keeps a rank whose completions
    all stopped stepping until every rank is done."""
    torch.manual_seed(seed)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=0) if args.temperature > 0 else {}
    gen_cfg = GenerationConfig(
        do_sample=args.temperature > 0, max_new_tokens=args.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
        **sampling,
    )  # fmt: skip
    width = max(map(len, prompt_ids))
    dev = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=dev)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=dev)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, synced_gpus=synced_gpus)
    out = out[:, width:].tolist()
    completions, truncated = [], []
    for row in out:  # cut at the first EOS (kept, so the policy learns to stop) and drop the padding
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        completions.append(row[: stop + 1] if stop is not None else row)
        truncated.append(stop is None and len(row) >= args.max_new_tokens)
    return completions, None, truncated


def rollout(llm, model, accelerator, args: Args, prompt_ids_all: list, indices: list, step: int, eos_ids: list, pad_id: int):
    """G completions per prompt index, each group contiguous (so `view(-1, G)` is a group).

    Returns (prompt_ids, completion_ids, sampler_logprobs or None, truncated), one entry per completion."""
    G = args.num_generations
    prompt_ids = [prompt_ids_all[i] for i in indices for _ in range(G)]
    if llm is not None:
        seeds = [request_seed(args.seed, step, i, j) for i in indices for j in range(G)]
        out = generate_vllm(llm, prompt_ids, seeds, args, eos_ids, accelerator.is_main_process)
    else:
        seed = request_seed(args.seed, step, accelerator.process_index, 0)
        synced = systems.forwards_are_collective(accelerator)
        with accelerator.autocast():  # bf16 on GPU, as the update computes
            out = generate_hf(accelerator.unwrap_model(model), prompt_ids, seed, args, eos_ids, pad_id, synced)
    return (prompt_ids, *out)


# ---- advantages ----
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


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 until max - buffer, then linear down to -penalty at max."""
    over = (lengths - (max_new_tokens - buffer)).clamp(min=0).float()
    return -penalty * over / max(buffer, 1)


# ---- log-probs ----
def completion_logprobs(model, batch: dict, temperature: float, chunk_tokens: Optional[int] = None):
    """Per-token log-probs and entropies of the completion tokens. Returns two (b, C) tensors.

    The lm_head runs only on the columns in batch["logits_keep"], the ones that predict completion tokens
    (see collate), and `systems.TokenLogProbs` takes the fp32 log-softmax `chunk_tokens` rows at a time, so a full
    (b, C, V) fp32 softmax never exists, not even for backward. Default chunk: 1024 rows on GPU (few kernel
    launches); on CPU ~1 MB of fp32 logits, which stays in cache for the dozen passes over each row
    (measured 4-5x faster than 1024-row chunks on SmolLM2's 49k vocabulary)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   logits_to_keep=batch["logits_keep"], shared_prefix_slots=batch["shared_prefix_slots"]
                   ).logits  # (rows, S*C, V): S completion slots per row
    C, V = batch["completion_ids"].shape[1], logits.shape[-1]
    logits = logits.reshape(-1, C, V)  # one row per slot
    if logits.shape[0] != len(batch["slot_rows"]):  # a group with fewer than S samples leaves empty slots
        logits = logits[batch["slot_rows"]]
    chunk = chunk_tokens or (max(1, 2**18 // V) if logits.device.type == "cpu" else 1024)
    logprobs, entropy = systems.TokenLogProbs.apply(logits.reshape(-1, V), batch["completion_ids"].reshape(-1), temperature, chunk)
    return logprobs.view(-1, C), entropy.view(-1, C)


def prompt_groups(indices: list, prompt_ids: list, group_size: int) -> list:
    """Runs of consecutive indices with the same prompt, at most group_size long (rollout keeps each
    group's G samples contiguous). group_size 1 gives one sample per run."""
    groups = []
    for i in indices:
        if groups and len(groups[-1]) < group_size and prompt_ids[groups[-1][-1]] == prompt_ids[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def make_microbatches(prompt_ids: list, completion_ids: list, token_budget: int, group_size: int = 1) -> list:
    """Split sample indices into micro-batches whose padded size (rows x (P + S*C)) fits the token budget.

    A row is one sample, or with group_size > 1 (--share-prompt) one group: its prompt once and S slots of
    C columns (see collate); groups are never split here. Sorting rows by length first keeps padding low; a
    row larger than the budget gets its own micro-batch. Returns lists of sample indices, groups contiguous."""
    size = lambda g: (len(prompt_ids[g[0]]), max(len(completion_ids[i]) for i in g), len(g))  # noqa: E731
    batches, cur, p_max, c_max, s_max = [], [], 0, 0, 0
    for g in sorted(prompt_groups(range(len(prompt_ids)), prompt_ids, group_size), key=size):
        p, c, s = (max(a, b) for a, b in zip(size(g), (p_max, c_max, s_max)))
        if cur and (len(cur) + 1) * (p + s * c) > token_budget:
            batches.append(cur)
            cur, (p, c, s) = [], size(g)
        cur.append(g)
        p_max, c_max, s_max = p, c, s
    return [[i for g in b for i in g] for b in batches + [cur] if b]


def collate(indices: list, prompt_ids: list, completion_ids: list, pad_id: int, device, group_size: int = 1) -> dict:
    """Model inputs for a micro-batch. Prompts are left-padded to end at column P-1; completion_ids and
    completion_mask come out as (b, C), and completion_mask is 1 exactly on completion tokens, so prompt and
    pad tokens never enter the loss.

    Each row holds one group from prompt_groups: its prompt once, then S slots of C columns, one completion
    per slot (S = 1 without --share-prompt: the usual prompt + completion row). Eq. 8: every slot's
    positions continue from the prompt's end, and the attention mask lets a token see the prompt and the
    earlier tokens of its own slot only, so each completion gets exactly the logits it would get in a row
    of its own, and the prompt is forwarded (and back-propagated) once per group instead of G times.
    logits_keep lists, slot by slot, the columns whose logits predict the slot's tokens: P-1 (the prompt's
    last token) for the first one, then the slot's own columns. shared_prefix_slots = (S, C) tells the
    policy's attention (reward.shared_prefix_attention, set in main) to skip the blocks the mask hides.
    With S = 1 the mask stays 2-D (padding only) and the model builds its usual causal mask."""
    groups = prompt_groups(indices, prompt_ids, group_size)
    P = max(len(prompt_ids[g[0]]) for g in groups)
    C = max(max(len(completion_ids[i]) for i in indices), 1)
    S = max(len(g) for g in groups)
    L = P + S * C
    ids = torch.full((len(groups), L), pad_id, dtype=torch.long)
    seg = torch.full((len(groups), L), -1)  # -1 padding, 0 prompt, k + 1 slot k
    pos = torch.zeros(len(groups), L, dtype=torch.long)
    comp = torch.full((len(indices), C), pad_id, dtype=torch.long)
    cmask = torch.zeros(len(indices), C)
    slot_rows = []  # which slot (row * S + k) holds each sample, in order
    for r, g in enumerate(groups):
        p = torch.tensor(prompt_ids[g[0]], dtype=torch.long)
        ids[r, P - len(p) : P], seg[r, P - len(p) : P], pos[r, P - len(p) : P] = p, 0, torch.arange(len(p))
        for k, i in enumerate(g):
            c = torch.tensor(completion_ids[i], dtype=torch.long)
            s = P + k * C
            ids[r, s : s + len(c)], seg[r, s : s + len(c)] = c, k + 1
            pos[r, s : s + len(c)] = torch.arange(len(p), len(p) + len(c))
            comp[len(slot_rows), : len(c)], cmask[len(slot_rows), : len(c)] = c, 1
            slot_rows.append(r * S + k)
    keep = torch.cat([torch.cat([torch.tensor([P - 1]), torch.arange(P + k * C, P + k * C + C - 1)]) for k in range(S)])
    if S == 1:
        attn = (seg >= 0).long()  # (rows, L)
    else:
        attn = reward.shared_prefix_mask(seg)  # (rows, 1, L, L)
    batch = {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "logits_keep": keep,
             "slot_rows": torch.tensor(slot_rows), "completion_ids": comp, "completion_mask": cmask}  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()} | {"shared_prefix_slots": (S, C) if S > 1 else None}


# ---- loss ----
def policy_loss(logprobs, old_logprobs, advantages, completion_mask, args: Args, sampler_logprobs=None,
                ref_logprobs=None, entropy=None):  # fmt: skip
    """Per-token loss (b, C) before aggregation, plus detached statistics.

    eq. 2  ratio = pi/pi_old;  L = -min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A)
    eq. 3  TIS: L *= min(pi_old / pi_vllm, C)     (vLLM sampled; corrects the sampler/trainer mismatch)
    eq. 4  L += kl_coef * KL_k(pi || pi_ref),  k1 = log(pi/pi_ref), k3 = exp(-d) + d - 1 with d = log(pi/pi_ref)
    eq. 5  L -= entropy_coef * H(pi)"""
    A = advantages[:, None]  # (b, 1)
    ratio = torch.exp(logprobs - old_logprobs)  # (b, C)
    clipped = torch.clamp(ratio, 1 - args.clip_eps_low, 1 + args.clip_eps_high)
    per_token = torch.maximum(-A * ratio, -A * clipped)
    stats = {"clipfrac": ((ratio - clipped).abs() > 0).float(), "ratio": ratio.detach()}
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


def token_weights(completion_mask: torch.Tensor, mode: str, num_seqs: float, num_tokens: float, max_new_tokens: int):
    """Aggregation as per-token weights, so micro-batches and ranks add up to the right total.

    token-mean: 1/T_total;  seq-mean-token-mean: 1/(N * |o_i|);  constant (Dr. GRPO): 1/(N * max_new_tokens)."""
    if mode == "token-mean":
        return completion_mask / num_tokens
    if mode == "seq-mean-token-mean":
        return completion_mask / completion_mask.sum(-1, keepdim=True).clamp(min=1) / num_seqs
    return completion_mask / (num_seqs * max_new_tokens)


def pad_values(values: list, indices: list, width: int, device) -> torch.Tensor:
    """Right-pad per-sample 1-D values (lists or tensors, e.g. log-probs) to (len(indices), width)."""
    out = torch.zeros(len(indices), width, device=device)
    for row, i in enumerate(indices):
        v = torch.as_tensor(values[i], dtype=torch.float32, device=device)
        out[row, : len(v)] = v
    return out


def lockstep(micro: list, accelerator) -> list:
    """Split the largest micro-batches until this rank has as many as the rank with the most. Every rank must
    run the same number of forwards and backwards: DDP all-reduces gradients on the last one, and under
    ZeRO-3 and FSDP every forward all-gathers the weights. Unequal counts deadlock."""
    n = int(accelerator.reduce(torch.tensor(len(micro), device=accelerator.device), "max"))
    while len(micro) < n:
        big = max(range(len(micro)), key=lambda k: len(micro[k]))
        if len(micro[big]) < 2:
            raise RuntimeError(f"cannot split {len(micro)} micro-batches into {n}: ranks hold unequal sample counts")
        micro[big : big + 1] = [micro[big][: len(micro[big]) // 2], micro[big][len(micro[big]) // 2 :]]
    return micro


def train_on_batch(model, ref_model, optimizer, scheduler, accelerator, args, prompt_ids, completion_ids,
                   sampler_logprobs, advantages, loss_mask_seq, pad_id):  # fmt: skip
    """Eq. 2-6 over one rollout batch: `num_minibatches` optimizer steps, `ppo_epochs` times.

    Returns (sums of per-token statistics, grad norms). Raises FloatingPointError before an optimizer
    step whose gradient norm is not finite (all ranks see the same all-reduced norm, so all stop); under
    DeepSpeed just after it, since its engine steps inside backward, and the message says which."""
    device, world = accelerator.device, accelerator.num_processes
    model.train()
    n = len(completion_ids)
    mb_size = math.ceil(n / args.num_minibatches)
    minibatches = [list(range(k, min(k + mb_size, n))) for k in range(0, n, mb_size)]
    group = args.num_generations if args.share_prompt else 1  # eq. 8: one prompt forward per group
    # pi_old (and pi_ref) log-probs: one no-grad pass, needed only when the policy moves before a sample is
    # used; with a single update pi_old is the current policy, detached, and this pass is skipped.
    old_lp, ref_lp = None, None
    if args.num_minibatches * args.ppo_epochs > 1 or ref_model is not None:
        old_lp, ref_lp = [None] * n, [None] * n
        with torch.no_grad():
            for mb in lockstep(make_microbatches(prompt_ids, completion_ids, args.token_budget, group), accelerator):
                b = collate(mb, prompt_ids, completion_ids, pad_id, device, group)
                with accelerator.autocast():
                    lp = completion_logprobs(model, b, args.temperature)[0]
                    ref = completion_logprobs(ref_model, b, args.temperature)[0] if ref_model is not None else lp
                for row, i in enumerate(mb):
                    old_lp[i], ref_lp[i] = lp[row, : len(completion_ids[i])], ref[row, : len(completion_ids[i])]
    sums = {k: torch.zeros((), device=device) for k in ("loss", "clipfrac", "ratio", "tis_weight", "kl", "entropy", "tokens")}
    grad_norms = []
    bar = tqdm(total=args.ppo_epochs * len(minibatches), desc="update", leave=False, disable=not accelerator.is_main_process)
    for _ in range(args.ppo_epochs):
        for mb in minibatches:
            # global sequence and token counts of this mini-batch (summed over ranks) for the eq. 6 weights
            counts = torch.tensor([len(mb), sum(len(completion_ids[i]) for i in mb)], dtype=torch.float32, device=device)
            num_seqs, num_tokens = accelerator.reduce(counts, "sum").clamp(min=1).tolist()
            micro = [[mb[j] for j in m] for m in make_microbatches([prompt_ids[i] for i in mb], [completion_ids[i] for i in mb], args.token_budget, group)]
            micro = lockstep(micro, accelerator)
            n_micro = len(micro)
            for k, m in enumerate(micro):
                b = collate(m, prompt_ids, completion_ids, pad_id, device, group)
                C = b["completion_ids"].shape[1]
                # Gradients sync (DDP) and DeepSpeed steps its engine only on the last micro-batch; Accelerate
                # reads the boundary from sync_gradients, which its own accumulate() sets the same way.
                accelerator.gradient_state._set_sync_gradients(k == n_micro - 1)
                with systems.no_sync(model, accelerator, last=k == n_micro - 1):
                    with accelerator.autocast():
                        logprobs, entropy = completion_logprobs(model, b, args.temperature)  # (b, C)
                    old = pad_values(old_lp, m, C, device) if old_lp is not None else logprobs.detach()
                    ref = pad_values(ref_lp, m, C, device) if ref_model is not None else None
                    samp = pad_values(sampler_logprobs, m, C, device) if sampler_logprobs is not None else None
                    per_token, stats = policy_loss(logprobs, old, advantages[m], b["completion_mask"], args, samp, ref, entropy)
                    mask = b["completion_mask"] * loss_mask_seq[m][:, None]  # (b, C); 0 on prompt/pad tokens
                    weights = token_weights(mask, args.loss_agg, num_seqs, num_tokens, args.max_new_tokens)
                    # DDP averages gradients over ranks; the weights already divide by GLOBAL counts, so undo it
                    loss = (per_token * weights).sum() * world
                    accelerator.backward(loss)
                with torch.no_grad():
                    cm = b["completion_mask"]
                    sums["loss"] += loss.detach() / world
                    sums["tokens"] += cm.sum()
                    sums["entropy"] += (entropy.detach() * cm).sum()
                    for key in ("clipfrac", "ratio", "tis_weight", "kl"):
                        if key in stats:
                            sums[key] += (stats[key] * cm).sum()
            # (DeepSpeed clips inside its engine step and reports the norm it saw)
            grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient norm ({grad_norm}); " + (
                    "DeepSpeed's engine already applied this update inside backward, so the weights in memory are not "
                    "to be trusted" if systems.steps_inside_backward(accelerator) else "this update was not applied"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            grad_norms.append(float(grad_norm))
            bar.update()
    bar.close()
    return sums, grad_norms


# ---- checkpoint ----
def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints, oldest first (a checkpoint only exists once its rename has happened)."""
    return sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))


def save_checkpoint(accelerator, model, tokenizer, output_dir: str, step: int, keep_last: int, extra_state=None):
    """HF folder (vLLM and evaluate.py load it) + Accelerate state (optimizer, scheduler, RNG), atomically.

    `trainer_state/step.json` holds the step and any `extra_state` (e.g. a data cursor)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers sharded weights; full on rank 0
    accelerator.save_state(os.path.join(tmp, "trainer_state"))  # every rank writes its own RNG file
    accelerator.wait_for_everyone()  # ... before rank 0 renames the folder under it
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "trainer_state", "step.json"), "w") as f:
            json.dump({"step": step, **(extra_state or {})}, f)
        if os.path.exists(final):  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def reward_trend(rollouts_path: str, windows: int = 6) -> str:
    """Mean reward over equal windows of steps, read back from rollouts.jsonl (so it spans resumes)."""
    by_step = {}
    with open(rollouts_path) as f:
        for line in f:
            r = json.loads(line)
            by_step.setdefault(r["step"], []).append(r["reward"])
    steps = sorted(by_step)
    size = max(1, math.ceil(len(steps) / windows))
    chunks = [steps[k : k + size] for k in range(0, len(steps), size)]
    parts = [f"steps {c[0] + 1}-{c[-1] + 1}: {np.mean([x for s in c for x in by_step[s]]):+.4f}" for c in chunks]
    return "reward trend | " + " | ".join(parts)


def main(args: Args):
    # ---- 0. setup: accelerator, logging, seeds ----
    cpu = not torch.cuda.is_available()
    malloc_kept = cpu and args.keep_freed_memory and systems.keep_freed_memory()  # before the big allocations
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and not cpu)
    accelerator = systems.make_accelerator(use_bf16, args.max_grad_norm)
    rank, world = accelerator.process_index, accelerator.num_processes
    check_args(args, world)
    set_seed(args.seed)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    if cpu and args.keep_freed_memory and not malloc_kept:
        log("note: no glibc mallopt here, so --keep-freed-memory has no effect")
    writer = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.exp_name,
                       config=dataclasses.asdict(args), sync_tensorboard=True)  # fmt: skip
        writer = SummaryWriter(args.output_dir)
        writer.add_text("args", "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))

    # ---- 1. data: rows, chat template, overlong filter ----
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, prompt_ids_all, n_dropped = tokenize_prompts(load_rows(args.dataset, args.dataset_split), tokenizer, args.max_prompt_length)
    if not rows:
        raise ValueError(f"{args.dataset}: no prompt fits --max-prompt-length {args.max_prompt_length}")
    reward.check_sandbox(rows)  # rows judged by running code: the sandbox must work before anything loads
    steps_per_epoch = math.ceil(len(rows) / args.prompts_per_step)
    max_steps = args.max_steps or args.num_epochs * steps_per_epoch
    if writer is not None:  # --max-prompt-length silently shortens the data otherwise
        writer.add_scalar("charts/prompts_dropped", n_dropped, 0)
    log(f"data: {len(rows)} prompts ({n_dropped} dropped as longer than {args.max_prompt_length} tokens), {max_steps} steps")

    # ---- 2. models: policy, optimizer, reward model, optional reference, vLLM engine ----
    model, optimizer, scheduler = build_policy(args, accelerator, max_steps)
    rm_dtype = torch.bfloat16 if use_bf16 else torch.float32
    with systems.replicated_loading():  # frozen models: whole on every rank, under ZeRO-3 and FSDP too
        reward_model = reward.RewardModel(args.reward_model, device=str(accelerator.device), dtype=rm_dtype,
                                          batch_size=args.rm_batch_size, max_length=args.rm_max_length,
                                          share_prefix=args.share_prompt)  # fmt: skip
        ref_model = None
        if args.kl_coef > 0:  # only loaded when used
            ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=rm_dtype).to(accelerator.device).eval()
            if args.share_prompt:  # the same rows as the policy
                reward.use_shared_prefix_attention(ref_model, args.model)
    eos_ids = eos_token_ids(tokenizer, args.model)
    llm = build_vllm(args, accelerator, rm_dtype) if args.use_vllm else None
    sleep = llm is not None and args.vllm_sleep and not cpu
    log(f"backend: {systems.backend(accelerator)}, {world} process(es), {'bf16' if use_bf16 else 'fp32'}, "
        f"grad clip {systems.clip_norm(model, accelerator, args.max_grad_norm)}, stop ids {eos_ids}")

    # ---- 3. resume: model/optimizer/scheduler/RNG from the newest checkpoint; data order from its step ----
    start_step = 0
    rollouts_path = os.path.join(args.output_dir, "rollouts.jsonl")
    if args.resume and list_checkpoints(args.output_dir):
        ckpt = list_checkpoints(args.output_dir)[-1]
        accelerator.load_state(os.path.join(ckpt, "trainer_state"))
        with open(os.path.join(ckpt, "trainer_state", "step.json")) as f:
            start_step = json.load(f)["step"]
        if accelerator.is_main_process and os.path.exists(rollouts_path):  # drop rows the resumed run redoes
            with open(rollouts_path) as f:
                kept = [line for line in f if json.loads(line)["step"] < start_step]
            with open(rollouts_path, "w") as f:
                f.writelines(kept)
        log(f"resumed from {ckpt} at step {start_step}")
    if llm is not None and start_step > 0:
        systems.sync_weights(llm, model, accelerator)
    rollout_file = open(rollouts_path, "a") if accelerator.is_main_process else None

    B_local, G = args.prompts_per_step // world, args.num_generations
    for step in range(start_step, max_steps):
        t_step = time.time()
        # ---- 4. rollout: this rank's share of the step's prompts, G completions each ----
        # TRY NOT TO MODIFY: prompts are sliced per rank from the global order, then repeated G times
        # (contiguously, so that view(-1, G) is a group).
        indices = step_prompt_indices(step, len(rows), args.prompts_per_step, args.seed)[rank * B_local : (rank + 1) * B_local]
        batch_rows = [rows[i] for i in indices for _ in range(G)]
        model.eval()
        t0 = time.time()
        prompt_ids, completion_ids, sampler_logprobs, truncated = rollout(
            llm, model, accelerator, args, prompt_ids_all, indices, step, eos_ids, pad_id
        )
        t_rollout = time.time() - t0
        if sleep:  # free GPU memory for the update; the trained weights are pushed at wake-up (never stale)
            systems.vllm_sleep(llm)

        # ---- 5. rewards (reward.compute_rewards routes by reward_model.style) ----
        t0 = time.time()
        responses = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards_list, reward_stats = reward.compute_rewards(batch_rows, responses, reward_model)
        rewards = torch.tensor(rewards_list, dtype=torch.float32, device=accelerator.device)  # (B_local*G,)
        lengths = torch.tensor([len(c) for c in completion_ids], device=accelerator.device)
        is_truncated = torch.tensor(truncated, dtype=torch.float32, device=accelerator.device)
        if args.overlong == "penalty":
            rewards = rewards + overlong_penalty(lengths, args.max_new_tokens, args.overlong_buffer, args.overlong_penalty)
        t_reward = time.time() - t0

        # ---- 6. group-relative advantages (eq. 1) ----
        # ALGO LOGIC: groups never straddle ranks, so the group statistics are local.
        all_rewards = accelerator.gather(rewards)
        advantages = compute_advantages(rewards, G, args.scale_rewards, batch_std=all_rewards.std())  # (B_local*G,)
        loss_mask_seq = 1.0 - is_truncated if args.overlong == "mask" else torch.ones_like(rewards)

        # ---- 7. policy update: mini-batches x epochs, micro-batches by token budget (eq. 2-6) ----
        t0 = time.time()
        try:
            sums, grad_norms = train_on_batch(model, ref_model, optimizer, scheduler, accelerator, args, prompt_ids,
                                              completion_ids, sampler_logprobs, advantages, loss_mask_seq, pad_id)  # fmt: skip
        except FloatingPointError as e:  # the message says whether the update was applied (DeepSpeed) or not
            last = (list_checkpoints(args.output_dir) or ["(none)"])[-1]
            raise FloatingPointError(
                f"step {step + 1}: {e}; nothing was saved (rewards/mean {all_rewards.mean():.4g}). The last good "
                f"checkpoint is {last}. Check the rewards, lower --learning-rate or use fp32."
            ) from None
        t_train = time.time() - t0

        # ---- 8. weight sync into vLLM ----
        t0 = time.time()
        if sleep:
            systems.vllm_wake_and_sync(llm, model, accelerator)
        elif llm is not None:
            systems.sync_weights(llm, model, accelerator)
        t_sync = time.time() - t0

        # ---- 9. logging: one console line, TensorBoard, rollouts.jsonl ----
        sums = {k: accelerator.reduce(v, "sum") for k, v in sums.items()}
        tok = sums["tokens"].clamp(min=1)
        g_len, g_trunc = accelerator.gather(lengths.float()), accelerator.gather(is_truncated)
        frac_zero_std = (all_rewards.view(-1, G).std(dim=1) < 1e-6).float().mean()
        stops = accelerator.reduce(torch.tensor([sum(c[-1:] == [e] for c in completion_ids) for e in eos_ids],
                                                dtype=torch.float32, device=accelerator.device), "sum")  # fmt: skip
        step_time = time.time() - t_step
        metrics = {
            "charts/learning_rate": scheduler.get_last_lr()[0],
            "charts/tokens_per_sec": float(g_len.sum()) / max(t_rollout, 1e-9),
            "charts/episodes": (step + 1) * args.prompts_per_step * G,
            "rewards/mean": float(all_rewards.mean()),
            "rewards/std": float(all_rewards.std()),
            "rewards/frac_zero_std": float(frac_zero_std),
            "completions/mean_length": float(g_len.mean()),
            "completions/clipped_ratio": float(g_trunc.mean()),
            **{f"completions/stop_{tokenizer.convert_ids_to_tokens(e)}": float(n) / len(g_len) for e, n in zip(eos_ids, stops)},
            "losses/policy_loss": float(sums["loss"]) / max(len(grad_norms), 1),
            "losses/entropy": float(sums["entropy"] / tok),
            "losses/grad_norm": sum(grad_norms) / len(grad_norms),
            "policy/clipfrac": float(sums["clipfrac"] / tok),
            "policy/ratio_mean": float(sums["ratio"] / tok),
            "time/rollout": t_rollout,
            "time/reward": t_reward,
            "time/train": t_train,
            "time/weight_sync": t_sync,
            "time/step": step_time,
            **{k: float(v) for k, v in reward_stats.items()},  # per-rank: rank 0's share
        }
        if sampler_logprobs is not None and args.tis_cap > 0:
            metrics["policy/tis_weight_mean"] = float(sums["tis_weight"] / tok)
        if ref_model is not None:
            metrics["losses/kl"] = float(sums["kl"] / tok)
        if accelerator.is_main_process:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step + 1)
            for i in range(len(completion_ids)):
                rollout_file.write(json.dumps({
                    "step": step, "prompt": batch_rows[i]["prompt"], "completion": responses[i],
                    "reward": rewards_list[i], "finish_reason": "length" if truncated[i] else "stop",
                }) + "\n")  # fmt: skip
            rollout_file.flush()
        log(
            f"step {step + 1:>5}/{max_steps} | reward {metrics['rewards/mean']:+.4f} ± {metrics['rewards/std']:.4f} "
            f"| len {metrics['completions/mean_length']:6.1f} clip {metrics['completions/clipped_ratio']:.2f} "
            f"| loss {metrics['losses/policy_loss']:+.5f} ent {metrics['losses/entropy']:.3f} gnorm {metrics['losses/grad_norm']:.3f} "
            f"| {step_time:5.1f}s (roll {t_rollout:.1f} rew {t_reward:.1f} train {t_train:.1f} sync {t_sync:.2f})"
        )
        if args.sample_every and (step + 1) % args.sample_every == 0:
            log(f"--- sample @ step {step + 1} (reward {rewards_list[0]:+.3f})\n[prompt] {batch_rows[0]['prompt'][-1]['content']}\n[completion] {responses[0]}\n---")

        # ---- 10. checkpoint ----
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == max_steps:
            save_checkpoint(accelerator, model, tokenizer, args.output_dir, step + 1, args.keep_last)

    if accelerator.is_main_process:
        rollout_file.close()
        writer.close()
        log(reward_trend(rollouts_path))
    if llm is not None:  # before Accelerate destroys the process group the engine still holds
        llm.llm_engine.engine_core.shutdown()
    accelerator.end_training()


def cli(argv=None) -> Args:
    """tyro CLI whose defaults come from `--preset NAME` (the first preset by default); later flags override it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = next(iter(PRESETS))
    for k, a in enumerate(argv):
        if a == "--preset" and k + 1 < len(argv):
            preset = argv[k + 1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
    if preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {list(PRESETS)}, got {preset!r}")
    return tyro.cli(Args, default=PRESETS[preset], args=argv, description=__doc__)


if __name__ == "__main__":
    main(cli())
