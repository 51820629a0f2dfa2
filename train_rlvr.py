"""RLVR stage: continue a GRLO checkpoint with verifiable rewards (math answers, unit tests), DAPO-style.

The method, one step at a time (docs/train_rlvr.md uses the same numbers):
  1. take B prompts with ground truth (official JSONL with style "rule", or a hub set with problem/answer);
  2. sample G completions each with vLLM in-process (or HF `generate`), stopping on every EOS id;
  3. verify each with `reward.compute_rewards` (math-verify or sandboxed tests: 1 correct, 0 not);
  4. dynamic sampling: drop groups whose G rewards are all equal and refill from new prompts (DAPO);
  5. group-relative advantages and the clipped surrogate, as in train_grlo.py (eq. 1-6), with clip-higher
     and the soft overlong penalty on by default; push the weights into vLLM; evaluate, log, checkpoint.

The paper reports that this second stage adds a little, mostly on hard competition math. The defaults
follow DAPO where the paper is silent: clip 0.2/0.28, token-mean loss, dynamic sampling, overlong shaping.

    python local_models.py && python train_rlvr.py --preset cpu-arith                      # CPU, SmolLM2
    accelerate launch --config_file configs/ddp.yaml train_rlvr.py --model runs/grlo/checkpoint-80
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
# The common Qwen evaluation phrasing; appended to problems mapped from hub columns (evaluate.py uses it too).
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Args:
    # experiment / tracking
    preset: Literal["dapo", "cpu-smoke", "cpu-arith"] = "dapo"
    """named config whose values become the defaults; give it first, later flags override it"""
    exp_name: str = "rlvr"
    """run name for TensorBoard and wandb"""
    seed: int = 1
    """seed for data order, sampling and init"""
    output_dir: str = "runs/rlvr"
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
    """policy: hub id or local HF folder; pass a train_grlo.py checkpoint to continue the GRLO model"""
    reward_model: str = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"
    """reward model, loaded only if some row has reward_model.style == "model\""""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """compute dtype: bf16 autocast (fp32 master weights) or fp32; auto = bf16 on GPU, fp32 on CPU"""
    gradient_checkpointing: bool = True
    """recompute activations in backward: a 16K-token micro-batch of a 4B model needs ~100 GiB without it"""
    rm_batch_size: int = 8
    """reward-model forward batch size (only if a row asks for the reward model)"""
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
    use_vllm: bool = True
    """sample with an in-process vLLM engine; --no-use-vllm falls back to HF generate"""
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
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory vLLM may take (GPU only; checked at start-up, before AdamW state exists: docs/gpu.md)"""
    vllm_cpu_kv_cache_gb: float = 1.0
    """KV-cache GiB per engine on CPU (there gpu_memory_utilization would reserve a fraction of RAM)"""
    vllm_sleep: bool = True
    """GPU only: free vLLM's weights and KV cache during the update (sleep level 2, trained weights re-pushed)"""

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
    token_budget: int = 16384
    """max padded tokens per forward micro-batch; sets gradient accumulation"""
    share_prompt: bool = False
    """forward each prompt once per group, in the update and the RM: its G completions follow it in one row, masked apart (eq. 8)"""
    keep_freed_memory: bool = True
    """CPU runs: glibc keeps freed memory for reuse instead of returning it to the OS (systems.keep_freed_memory)"""
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


PRESETS = {
    "dapo": Args(),
    "cpu-smoke": Args(
        preset="cpu-smoke", model=os.path.join(HERE, "local_models", "tiny-qwen3"), output_dir="runs/rlvr-cpu-smoke",
        dataset=os.path.join(HERE, "data", "arith_train.jsonl"), eval_dataset=os.path.join(HERE, "data", "arith_test.jsonl"),
        eval_limit=16, max_prompt_length=128, num_generations=4, prompts_per_step=8, max_new_tokens=16,
        overlong_buffer=4, learning_rate=3e-3, num_minibatches=1, max_steps=4, eval_every=2, save_every=2,
        vllm_cpu_kv_cache_gb=0.25, gradient_checkpointing=False,
    ),
    "cpu-arith": Args(
        preset="cpu-arith", model=os.path.join(HERE, "local_models", "smollm2-135m"), output_dir="runs/rlvr-cpu-arith",
        dataset=os.path.join(HERE, "data", "arith_train.jsonl"), eval_dataset=os.path.join(HERE, "data", "arith_test.jsonl"),
        max_prompt_length=256, num_generations=8, prompts_per_step=8, max_new_tokens=128, overlong_buffer=32,
        temperature=0.7,  # at 1.0 SmolLM2 solves ~3% of samples, too few groups carry any signal
        learning_rate=1e-5, num_minibatches=1, max_steps=20, eval_every=10, save_every=20, sample_every=10,
        token_budget=4096,  # fp32 activations take ~2 MB per token: 16384 would not fit in 24 GB
        gradient_checkpointing=False,  # 4096-token micro-batches fit; recomputing would cost ~1/3 more train time
    ),
}  # fmt: skip


# Copied from train_grlo.check_args
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
# Copied from train_grlo._to_row
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


# Copied from train_grlo.read_records
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


def to_rlvr_row(obj, where: str) -> dict:
    """Official rows pass through `_to_row`; hub rows with problem/question + answer/solution columns are
    mapped first (ability math, style rule, the boxed-answer instruction appended). GSM8K's "#### N" is cut."""
    if isinstance(obj, dict) and "prompt" not in obj and "messages" not in obj:
        question = next((obj[k] for k in ("problem", "question", "query") if isinstance(obj.get(k), str)), None)
        answer = next((obj[k] for k in ("answer", "final_answer", "ground_truth", "solution") if obj.get(k) is not None), None)
        if question is None or answer is None:
            raise ValueError(f"{where}: need official fields, or a problem/question column and an answer/solution column; got {sorted(obj)}")
        answer = str(answer).split("####")[-1].strip()
        obj = {
            "prompt": [{"role": "user", "content": f"{question}\n\n{MATH_INSTRUCTION}"}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer}, "extra_info": {"source": where},
        }  # fmt: skip
    return _to_row(obj, where)


# Copied from train_grlo.tokenize_prompts
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


# Copied from train_grlo.step_prompt_indices
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


# Copied from train_grlo.request_seed
def request_seed(seed: int, step: int, prompt_index: int, sample: int) -> int:
    """Per-completion sampling seed from (seed, step, prompt, sample): reproducible on any rank count."""
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")

# ---- policy ----
# Copied from train_grlo.build_policy
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
# Copied from train_grlo.eos_token_ids
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


# Copied from train_grlo.build_vllm
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


# Copied from train_grlo.generate_vllm
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


# Copied from train_grlo.generate_hf
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


# Copied from train_grlo.rollout
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
def has_signal(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(B,) True where a group's G rewards are not all equal. Equal rewards give zero advantage (eq. 1),
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


# Copied from train_grlo.overlong_penalty
def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 until max - buffer, then linear down to -penalty at max."""
    over = (lengths - (max_new_tokens - buffer)).clamp(min=0).float()
    return -penalty * over / max(buffer, 1)

# ---- log-probs ----
# Copied from train_grlo.completion_logprobs
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


# Copied from train_grlo.prompt_groups
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


# Copied from train_grlo.make_microbatches
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


# Copied from train_grlo.collate
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
# Copied from train_grlo.policy_loss
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


# Copied from train_grlo.token_weights
def token_weights(completion_mask: torch.Tensor, mode: str, num_seqs: float, num_tokens: float, max_new_tokens: int):
    """Aggregation as per-token weights, so micro-batches and ranks add up to the right total.

    token-mean: 1/T_total;  seq-mean-token-mean: 1/(N * |o_i|);  constant (Dr. GRPO): 1/(N * max_new_tokens)."""
    if mode == "token-mean":
        return completion_mask / num_tokens
    if mode == "seq-mean-token-mean":
        return completion_mask / completion_mask.sum(-1, keepdim=True).clamp(min=1) / num_seqs
    return completion_mask / (num_seqs * max_new_tokens)


# Copied from train_grlo.pad_values
def pad_values(values: list, indices: list, width: int, device) -> torch.Tensor:
    """Right-pad per-sample 1-D values (lists or tensors, e.g. log-probs) to (len(indices), width)."""
    out = torch.zeros(len(indices), width, device=device)
    for row, i in enumerate(indices):
        v = torch.as_tensor(values[i], dtype=torch.float32, device=device)
        out[row, : len(v)] = v
    return out


# Copied from train_grlo.lockstep
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


# Copied from train_grlo.train_on_batch
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

# ---- eval ----
def evaluate_heldout(llm, model, accelerator, args: Args, rows: list, prompt_ids: list, eos_ids: list, pad_id: int, tokenizer):
    """Greedy accuracy on held-out rows, judged by `reward.compute_rewards` like evaluate.py; data-parallel."""
    greedy = dataclasses.replace(args, temperature=0.0, num_generations=1)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    scores, truncated = [], []
    # a rank without rows still decodes one (discarded): under ZeRO-3/FSDP every HF decoding step is a collective
    _, completion_ids, _, truncated = rollout(llm, model, accelerator, greedy, prompt_ids, mine or [0], 0, eos_ids, pad_id)
    truncated = truncated[: len(mine)]
    if mine:
        responses = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        scores, _ = reward.compute_rewards([rows[i] for i in mine], responses)
    totals = accelerator.reduce(torch.tensor([sum(scores), len(scores), sum(truncated)], dtype=torch.float64, device=accelerator.device), "sum")
    return {"eval/accuracy": float(totals[0] / totals[1]), "eval/clipped_ratio": float(totals[2] / totals[1])}

# ---- checkpoint ----
# Copied from train_grlo.list_checkpoints
def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints, oldest first (a checkpoint only exists once its rename has happened)."""
    return sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))


# Copied from train_grlo.save_checkpoint
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


# Copied from train_grlo.reward_trend
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

    # ---- 1. data: rows with ground truth, chat template, overlong filter; optional held-out set ----
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    raw = [to_rlvr_row(obj, where) for where, obj in read_records(args.dataset, args.dataset_split)]
    rows, prompt_ids_all, n_dropped = tokenize_prompts(raw, tokenizer, args.max_prompt_length)
    if not rows:
        raise ValueError(f"{args.dataset}: no prompt fits --max-prompt-length {args.max_prompt_length}")
    eval_rows, eval_ids = [], []
    if args.eval_dataset and args.eval_every:
        eval_raw = [to_rlvr_row(obj, where) for where, obj in read_records(args.eval_dataset, "test")]
        eval_rows, eval_ids, _ = tokenize_prompts(eval_raw[: args.eval_limit or None], tokenizer, args.max_prompt_length)
    reward.check_sandbox(rows + eval_rows)  # rows judged by running code: the sandbox must work before anything loads
    steps_per_epoch = math.ceil(len(rows) / args.prompts_per_step)
    max_steps = args.max_steps or args.num_epochs * steps_per_epoch
    if writer is not None:  # --max-prompt-length silently shortens the data otherwise
        writer.add_scalar("charts/prompts_dropped", n_dropped, 0)
    log(f"data: {len(rows)} prompts ({n_dropped} dropped as longer than {args.max_prompt_length} tokens), "
        f"{len(eval_rows)} held-out, {max_steps} steps")  # fmt: skip

    # ---- 2. models: policy, optimizer, reward model only if a row asks for it, optional reference, vLLM ----
    model, optimizer, scheduler = build_policy(args, accelerator, max_steps)
    rm_dtype = torch.bfloat16 if use_bf16 else torch.float32
    reward_model, ref_model = None, None
    with systems.replicated_loading():  # frozen models: whole on every rank, under ZeRO-3 and FSDP too
        if any(r["reward_model"]["style"] == "model" for r in rows):
            reward_model = reward.RewardModel(args.reward_model, device=str(accelerator.device), dtype=rm_dtype,
                                              batch_size=args.rm_batch_size, max_length=args.rm_max_length,
                                              share_prefix=args.share_prompt)  # fmt: skip
        if args.kl_coef > 0:  # only loaded when used
            ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=rm_dtype).to(accelerator.device).eval()
            if args.share_prompt:  # the same rows as the policy
                reward.use_shared_prefix_attention(ref_model, args.model)
    eos_ids = eos_token_ids(tokenizer, args.model)
    llm = build_vllm(args, accelerator, rm_dtype) if args.use_vllm else None
    sleep = llm is not None and args.vllm_sleep and not cpu
    log(f"backend: {systems.backend(accelerator)}, {world} process(es), {'bf16' if use_bf16 else 'fp32'}, "
        f"grad clip {systems.clip_norm(model, accelerator, args.max_grad_norm)}, stop ids {eos_ids}")

    # ---- 3. resume: state from the newest checkpoint; data position from its rollout-round cursor ----
    start_step, data_round = 0, 0  # data_round counts rollout rounds: dynamic sampling makes it differ from step
    rollouts_path = os.path.join(args.output_dir, "rollouts.jsonl")
    if args.resume and list_checkpoints(args.output_dir):
        ckpt = list_checkpoints(args.output_dir)[-1]
        accelerator.load_state(os.path.join(ckpt, "trainer_state"))
        with open(os.path.join(ckpt, "trainer_state", "step.json")) as f:
            saved = json.load(f)
        start_step, data_round = saved["step"], saved["data_round"]
        if accelerator.is_main_process and os.path.exists(rollouts_path):  # drop rows the resumed run redoes
            with open(rollouts_path) as f:
                kept = [line for line in f if json.loads(line)["step"] < start_step]
            with open(rollouts_path, "w") as f:
                f.writelines(kept)
        log(f"resumed from {ckpt} at step {start_step}")
    if llm is not None and start_step > 0:
        systems.sync_weights(llm, model, accelerator)
    rollout_file = open(rollouts_path, "a") if accelerator.is_main_process else None
    if eval_rows and start_step == 0:
        model.eval()
        metrics = evaluate_heldout(llm, model, accelerator, args, eval_rows, eval_ids, eos_ids, pad_id, tokenizer)
        log(f"eval before training | accuracy {metrics['eval/accuracy']:.4f} on {len(eval_rows)} held-out problems")
        if accelerator.is_main_process:
            writer.add_scalar("eval/accuracy", metrics["eval/accuracy"], 0)

    B_local, G = args.prompts_per_step // world, args.num_generations
    for step in range(start_step, max_steps):
        t_step = time.time()
        # ---- 4. rollout + verification with dynamic sampling: rounds of fresh prompts until B groups carry signal ----
        # TRY NOT TO MODIFY: every rank runs the same number of rounds (the stop test is all-reduced), and
        # prompts come from the global order by round, so resume needs only the round cursor.
        model.eval()
        kept, dropped, seen_scores, count_stats, n_math_seen = [], [], [], {}, 0
        t_rollout = t_reward = 0.0
        for rounds in range(1, args.max_sampling_rounds + 1):
            indices = step_prompt_indices(data_round, len(rows), args.prompts_per_step, args.seed)[rank * B_local : (rank + 1) * B_local]
            t0 = time.time()
            prompt_ids, completion_ids, sampler_logprobs, truncated = rollout(
                llm, model, accelerator, args, prompt_ids_all, indices, data_round, eos_ids, pad_id
            )
            t_rollout += time.time() - t0
            t0 = time.time()
            batch_rows = [rows[i] for i in indices for _ in range(G)]
            responses = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            scores, reward_stats = reward.compute_rewards(batch_rows, responses, reward_model)
            t_reward += time.time() - t0
            data_round += 1
            seen_scores += scores
            n_math_seen += sum(r["ability"] == "math" for r in batch_rows)
            for k, v in reward_stats.items():
                if not k.endswith("_mean"):  # counts add up over rounds; per-source means are re-derived below
                    count_stats[k] = count_stats.get(k, 0.0) + v
            signal = has_signal(torch.tensor(scores), G)
            for g in range(len(indices)):
                sl = slice(g * G, (g + 1) * G)
                group = dict(rows=batch_rows[sl], prompt_ids=prompt_ids[sl], completion_ids=completion_ids[sl],
                             sampler_logprobs=sampler_logprobs[sl] if sampler_logprobs is not None else None,
                             truncated=truncated[sl], responses=responses[sl], scores=scores[sl])  # fmt: skip
                (kept if signal[g] or not args.dynamic_sampling else dropped).append(group)
            enough = torch.tensor(float(len(kept) >= B_local), device=accelerator.device)
            if not args.dynamic_sampling or accelerator.reduce(enough, "min") > 0:
                break
        # ALGO LOGIC: a short batch (round cap hit) is topped up with dropped groups: zero advantage, same shapes
        batch = (kept + dropped)[:B_local]
        n_signal = min(len(kept), B_local)
        flat = lambda key: [x for g in batch for x in g[key]]  # noqa: E731
        batch_rows, prompt_ids, completion_ids, truncated, responses = (flat(k) for k in ("rows", "prompt_ids", "completion_ids", "truncated", "responses"))
        sampler_logprobs = flat("sampler_logprobs") if llm is not None else None
        scores = torch.tensor(flat("scores"), dtype=torch.float32, device=accelerator.device)  # (B_local*G,)
        if sleep:  # free GPU memory for the update; the trained weights are pushed at wake-up (never stale)
            systems.vllm_sleep(llm)

        # ---- 5. reward shaping: the soft overlong penalty (DAPO) on top of the verifier's 0/1 ----
        lengths = torch.tensor([len(c) for c in completion_ids], device=accelerator.device)
        is_truncated = torch.tensor(truncated, dtype=torch.float32, device=accelerator.device)
        rewards = scores.clone()
        if args.overlong == "penalty":
            rewards = rewards + overlong_penalty(lengths, args.max_new_tokens, args.overlong_buffer, args.overlong_penalty)

        # ---- 6. group-relative advantages (eq. 1) ----
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

        # ---- 9. logging: one console line, TensorBoard, rollouts.jsonl; held-out accuracy every eval_every ----
        sums = {k: accelerator.reduce(v, "sum") for k, v in sums.items()}
        tok = sums["tokens"].clamp(min=1)
        g_len, g_trunc = accelerator.gather(lengths.float()), accelerator.gather(is_truncated)
        seen = accelerator.gather(torch.tensor(seen_scores, device=accelerator.device))
        counts = accelerator.reduce(torch.tensor([n_signal, len(batch)], dtype=torch.float32, device=accelerator.device), "sum")
        stops = accelerator.reduce(torch.tensor([sum(c[-1:] == [e] for c in completion_ids) for e in eos_ids],
                                                dtype=torch.float32, device=accelerator.device), "sum")  # fmt: skip
        step_time = time.time() - t_step
        metrics = {
            "charts/learning_rate": scheduler.get_last_lr()[0],
            "charts/tokens_per_sec": float(g_len.sum()) / max(t_rollout, 1e-9),
            "charts/episodes": data_round * args.prompts_per_step * G,
            "charts/sampling_rounds": rounds,
            "rewards/accuracy": float(seen.mean()),
            "rewards/mean": float(all_rewards.mean()),
            "rewards/std": float(all_rewards.std()),
            "rewards/frac_zero_std": float(1 - has_signal(seen.float().cpu(), G).float().mean()),
            "rewards/batch_signal_frac": float(counts[0] / counts[1]),
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
            **{k: float(v) for k, v in count_stats.items()},  # per-rank counts: rank 0's share
        }
        if n_math_seen and "rewards/math_no_answer" in count_stats:  # share of math answers math-verify could parse
            metrics["rewards/format"] = 1 - count_stats["rewards/math_no_answer"] / n_math_seen
        if sampler_logprobs is not None and args.tis_cap > 0:
            metrics["policy/tis_weight_mean"] = float(sums["tis_weight"] / tok)
        if ref_model is not None:
            metrics["losses/kl"] = float(sums["kl"] / tok)
        if eval_rows and ((step + 1) % args.eval_every == 0 or step + 1 == max_steps):
            model.eval()
            metrics.update(evaluate_heldout(llm, model, accelerator, args, eval_rows, eval_ids, eos_ids, pad_id, tokenizer))
        if accelerator.is_main_process:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step + 1)
            for i in range(len(completion_ids)):
                rollout_file.write(json.dumps({
                    "step": step, "prompt": batch_rows[i]["prompt"], "completion": responses[i],
                    "reward": float(rewards[i]), "score": float(scores[i]), "finish_reason": "length" if truncated[i] else "stop",
                }) + "\n")  # fmt: skip
            rollout_file.flush()
        log(
            f"step {step + 1:>5}/{max_steps} | acc {metrics['rewards/accuracy']:.3f} reward {metrics['rewards/mean']:+.4f} "
            f"| rounds {rounds} signal {metrics['rewards/batch_signal_frac']:.2f} | len {metrics['completions/mean_length']:6.1f} "
            f"clip {metrics['completions/clipped_ratio']:.2f} | loss {metrics['losses/policy_loss']:+.5f} gnorm {metrics['losses/grad_norm']:.3f} "
            + (f"| eval {metrics['eval/accuracy']:.4f} " if "eval/accuracy" in metrics else "")
            + f"| {step_time:5.1f}s (roll {t_rollout:.1f} rew {t_reward:.1f} train {t_train:.1f} sync {t_sync:.2f})"
        )
        if args.sample_every and (step + 1) % args.sample_every == 0:
            log(f"--- sample @ step {step + 1} (score {float(scores[0]):.0f})\n[prompt] {batch_rows[0]['prompt'][-1]['content']}\n[completion] {responses[0]}\n---")

        # ---- 10. checkpoint (with the data cursor) ----
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == max_steps:
            save_checkpoint(accelerator, model, tokenizer, args.output_dir, step + 1, args.keep_last, {"data_round": data_round})

    if accelerator.is_main_process:
        rollout_file.close()
        writer.close()
        log(reward_trend(rollouts_path))
    if llm is not None:  # before Accelerate destroys the process group the engine still holds
        llm.llm_engine.engine_core.shutdown()
    accelerator.end_training()


# Copied from train_grlo.cli
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
