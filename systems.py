"""Systems code the stage scripts call in one line: distributed backends, vLLM plumbing, speed and memory,
checkpoints and the command line. None of it is the algorithm; the stage scripts are.

Sections: 1. distributed backends; 2. sampling: vLLM engine, its weight sync and sleep, the HF fallback;
3. speed and memory: fused log-probs, micro-batches and the shared-prompt packing; 4. checkpoints and CLI.

Each function states what it guarantees. The GPU-only paths follow the peers' working code (cited where used);
what can run on CPU is tested in tests/test_systems.py (2-process gloo runs under `accelerate launch` with the
DDP and DeepSpeed ZeRO-2/3 configs, FSDP2 under torchrun), and docs/gpu.md holds the memory plan for what cannot.
Importing this module has no side effects.
"""

import contextlib
import ctypes
import datetime
import functools
import glob
import json
import math
import os
import shutil
import sys
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from transformers import GenerationConfig

# ---- 1. distributed backends ----
# Rollouts of 3072-token answers and checkpoint gathers of a 4B model can keep one rank away from the next
# collective for many minutes; torch's default (10 min NCCL, 30 min gloo) would kill the run.
DIST_TIMEOUT = datetime.timedelta(hours=2)


def _launched_with(name: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() in ("1", "true", "yes")


def make_accelerator(use_bf16: bool, max_grad_norm: float) -> Accelerator:
    """The Accelerator both stages use, correct for DDP, DeepSpeed ZeRO-2/3 and FSDP2 on GPU and on CPU.

    - step_scheduler_with_optimizer=False: accelerate's AcceleratedScheduler otherwise steps the LR schedule
      `num_processes` times per call (it assumes the dataloader's batch grew with the process count).
    - DeepSpeed: `prepare` without a dataloader needs an integer train_micro_batch_size_per_gpu (we feed our
      own micro-batches; the value only feeds DeepSpeed's throughput log), DeepSpeed clips inside its own
      engine step with its config's gradient_clipping, which accelerate fills with 1.0 unless we set it, and
      with bf16 its gradient reductions run in fp32 (communication_data_type).
    - FSDP2: gradients are reduced in fp32, as verl does (`reduce_dtype` in verl/workers/fsdp_workers.py);
      accelerate's bf16 policy would reduce them in bf16.
    - CPU: with `cpu=True` accelerate silently drops a DeepSpeed plugin and wraps the model in DDP, so a
      DeepSpeed launch on CPU builds the Accelerator with cpu=False over gloo instead (the measured recipe).
      FSDP cannot run on CPU through accelerate at all, so that launch is refused.
    """
    cpu, deepspeed = not torch.cuda.is_available(), _launched_with("DEEPSPEED")
    if cpu and _launched_with("FSDP"):
        raise RuntimeError(
            "accelerate 1.15 cannot run FSDP on CPU: its FSDP branch (accelerate/state.py) excludes CPU "
            "processes, so the run would silently become DDP or N unconnected copies. On CPU launch with "
            "--multi_gpu (DDP) or a DeepSpeed config; raw FSDP2 on CPU is covered by tests/fsdp2_sync_check.py."
        )
    if cpu and deepspeed:  # a C++ extension for inference all-reduce, ~2 min to compile, unused
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1  # by accelerate launch or torchrun
    pg = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=DIST_TIMEOUT)] if launched else []
    accelerator = Accelerator(
        mixed_precision="bf16" if use_bf16 else "no",
        cpu=cpu and not deepspeed,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=pg,
    )
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{os.environ['WORLD_SIZE']} processes were launched, but accelerate set up no distributed "
            "backend: each would train alone. Check the launch command and config file."
        )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        plugin.deepspeed_config["gradient_clipping"] = max_grad_norm
        if use_bf16:  # reduce gradients in fp32, as the FSDP2 policy below does (DeepSpeed would use bf16)
            plugin.deepspeed_config["communication_data_type"] = "fp32"
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp is not None and use_bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        fsdp.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return accelerator


def backend(accelerator: Accelerator) -> str:
    """'deepspeed-zero2', 'deepspeed-zero3', 'fsdp', 'ddp' or 'single': what actually wraps the policy."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def forwards_are_collective(accelerator: Accelerator) -> bool:
    """True when every policy forward all-gathers parameters (ZeRO-3, FSDP): then every rank must run the same
    number of forwards in every pass, or the ranks deadlock."""
    return accelerator.num_processes > 1 and backend(accelerator) in ("deepspeed-zero3", "fsdp")


def steps_inside_backward(accelerator: Accelerator) -> bool:
    """True under DeepSpeed: its engine clips and steps inside `accelerator.backward` of the last micro-batch,
    before the caller sees the gradient norm, so a non-finite norm is noticed after the update."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def lockstep(micro: list, accelerator: Accelerator) -> list:
    """Split the largest micro-batches until this rank has as many as the rank with the most. Equals: the same
    samples, so the same summed gradient. Every rank must run the same number of forwards and backwards: DDP
    all-reduces gradients on the last one, and under ZeRO-3 and FSDP every forward all-gathers the weights.
    Unequal counts deadlock."""
    n = int(accelerator.reduce(torch.tensor(len(micro), device=accelerator.device), "max"))
    while len(micro) < n:
        big = max(range(len(micro)), key=lambda k: len(micro[k]))
        if len(micro[big]) < 2:
            raise RuntimeError(f"cannot split {len(micro)} micro-batches into {n}: ranks hold unequal sample counts")
        micro[big : big + 1] = [micro[big][: len(micro[big]) // 2], micro[big][len(micro[big]) // 2 :]]
    return micro


def clip_norm(model, accelerator: Accelerator, max_grad_norm: float) -> float:
    """The gradient-clipping norm in force: DeepSpeed's engine's own (it ignores the caller's), else the flag."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return model.gradient_clipping()
    return max_grad_norm


def no_sync(model, accelerator: Accelerator, last: bool):
    """Gradient accumulation over micro-batches: `accelerator.no_sync` on all but the `last` one (DDP skips its
    all-reduce; DeepSpeed reads the boundary from sync_gradients), except under FSDP2. There no_sync would keep
    unsharded gradients in the bf16 param dtype across micro-batches; reducing every micro-batch instead
    accumulates them sharded in fp32, as verl does (verl/workers/actor/dp_actor.py, update_policy)."""
    if last or backend(accelerator) == "fsdp":
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


@contextlib.contextmanager
def replicated_loading():
    """Inside this block, `from_pretrained` gives every rank the full, real weights, whatever the launcher.

    Needed for the frozen models (reward model, reference model) that never go through `accelerator.prepare`:
    - ZeRO-3: once accelerate registered its DeepSpeed config, transformers builds every model under
      `deepspeed.zero.Init`, partitioned (numel 0 per parameter), unusable outside a DeepSpeed engine.
      TRL instead wraps such models as DeepSpeed inference engines (trl/models/utils.py, prepare_deepspeed);
      we keep them whole on each GPU, which docs/gpu.md budgets for.
    - FSDP: `accelerate launch` exports FSDP_CPU_RAM_EFFICIENT_LOADING=true, and transformers then fills every
      model with zeros on local ranks other than 0, relying on `prepare` to broadcast rank 0's weights.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved_ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    saved_env = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    hf_deepspeed.unset_hf_deepspeed_config()
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved_ref
        if saved_env is None:
            del os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"]
        else:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved_env


def drop_fp32_output_cast(model, accelerator: Accelerator) -> None:
    """Undo accelerate's fp32 cast of the prepared model's outputs under bf16 autocast (DDP and single GPU).

    `prepare` wraps forward in autocast *and* `convert_outputs_to_fp32`, which keeps a second, fp32 copy of
    the logits: 10 GiB at 16K tokens x 151,936 vocabulary. The stages run every forward inside
    `accelerator.autocast()` themselves and upcast the logits in chunks (`TokenLogProbs`), so the plain forward
    is restored. Equals: the same logits, in the autocast dtype instead of fp32."""
    inner = accelerator.unwrap_model(model)
    if getattr(inner, "_original_forward", None) is not None:
        inner.forward = inner._original_forward


def check_model_path(flag: str, path: str) -> None:
    """Fail in seconds when `path` names a local folder that does not exist. A hub id has the form org/name; any
    other path (runs/rm-cpu-arith/final, ./x, /x) must be a folder, or transformers would fail later with a
    repo-id error. A `runs/` reward model comes from train_rm.py."""
    if not os.path.isdir(path) and (path.count("/") != 1 or path.startswith((".", "/"))):
        hint = " (train it first with train_rm.py)" if flag == "--reward-model" else ""
        raise ValueError(f"{flag} {path}: no such folder{hint}")


def check_context_length(model_path: str, needed: int, what: str) -> None:
    """Fail in seconds, before any weights load, when `needed` tokens exceed the model's context.

    vLLM would otherwise reject max_model_len after a minute of loading, with a pydantic traceback."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and needed > limit:
        raise ValueError(
            f"{model_path}: its context is {limit} tokens (config.json max_position_embeddings), but {what} "
            f"need {needed}. Lower those flags so they add up to at most {limit}."
        )


# ---- 2. sampling: the vLLM engine, the HF fallback, stop ids, weight sync, sleep ----
def build_vllm(
    model: str,
    dtype: torch.dtype,
    seed: int,
    max_model_len: int,
    accelerator: Accelerator,
    gpu_memory_utilization: float,
    sleep: bool,
):
    """This rank's in-process vLLM engine for `model`; on several processes one engine per rank inside the
    launcher's processes (`external_launcher`, TRL's colocate mode, trl/trainer/grpo_trainer.py).

    GPU: CUDA graphs, `gpu_memory_utilization` of the GPU, sleep mode if `sleep`. CPU: eager (compiling costs
    ~100 s of start-up), a 1 GiB KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE=<GiB> overrides it; there
    gpu_memory_utilization would reserve that share of all RAM), and every prompt prefilled whole: vLLM 0.32 CPU
    crashes ("CPU Generator does not use offset") when a seeded request's prompt is prefilled in chunks.
    Log-probs come back after temperature (`processed_logprobs`), as the trainer computes them."""
    from vllm import LLM

    cpu = accelerator.device.type == "cpu"
    kwargs = dict(
        model=model,
        dtype=dtype,
        seed=seed,
        enforce_eager=cpu,
        max_model_len=max_model_len,
        tensor_parallel_size=1,
        logprobs_mode="processed_logprobs",
    )
    if accelerator.num_processes > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if cpu:
        kwargs.update(
            kv_cache_memory_bytes=2**30, enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096)
        )
    else:
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
    return LLM(**kwargs)


def generate_vllm(
    llm,
    prompt_ids: list,
    seeds: list,
    stop_ids: list,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    show_progress: bool = False,
):
    """One vLLM request per completion, each with its own seed. Returns, per completion, its token ids (the stop
    token kept, so the policy learns to stop), the sampler's log-prob of each token, and whether it was cut at
    max_new_tokens."""
    from vllm import SamplingParams

    params = [
        SamplingParams(
            n=1,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=s,
            logprobs=0,
            stop_token_ids=stop_ids,
            ignore_eos=False,
            skip_special_tokens=True,
        )
        for s in seeds
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=show_progress)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs] for o in outs]
    truncated = [o.outputs[0].finish_reason == "length" for o in outs]
    return ids, logprobs, truncated


@torch.no_grad()
def generate_hf(
    model,
    prompt_ids: list,
    seed: int,
    stop_ids: list,
    pad_id: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    synced_gpus: bool = False,
):
    """`generate_vllm` without vLLM: same temperature/top-p, no top-k, stop on every stop id, temperature 0 greedy.

    HF cannot seed each request, so the call is seeded as a whole; the sampler log-probs are the trainer's own
    (None), which makes the TIS weight exactly 1. With sharded weights (ZeRO-3, FSDP) every decoding step
    all-gathers, so `synced_gpus` keeps a rank whose completions all stopped stepping until every rank is done."""
    torch.manual_seed(seed)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else {}
    gen_cfg = GenerationConfig(
        do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, **sampling
    )
    width = max(map(len, prompt_ids))
    dev = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=dev)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=dev)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, synced_gpus=synced_gpus)
    completions, truncated = [], []
    for row in out[:, width:].tolist():  # cut at the first stop id (kept) and drop the padding
        stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
        completions.append(row[: stop + 1] if stop is not None else row)
        truncated.append(stop is None and len(row) >= max_new_tokens)
    return completions, None, truncated


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
        special = after and (
            after[0] in tokenizer.all_special_ids
            or tokenizer.convert_ids_to_tokens(after[0]) in tokenizer.get_added_vocab()
        )
        if special:
            ids.add(after[0])
    return sorted(i for i in ids if i is not None)


def full_state_dict(model, accelerator: Accelerator):
    """Yield (name, full tensor) on EVERY rank, whatever the sharding; tied lm_head included.

    DDP: plain state_dict. FSDP2: DTensor.full_tensor() all-gathers each parameter. DeepSpeed ZeRO-3:
    GatheredParameters one parameter at a time (trl/trainer/grpo_trainer.py, _move_model_to_vllm), tested
    on CPU under accelerate launch with configs/deepspeed_zero3.yaml."""
    unwrapped = accelerator.unwrap_model(model)
    if backend(accelerator) == "deepspeed-zero3":
        import deepspeed

        for name, param in unwrapped.named_parameters(remove_duplicate=False):  # keeps the tied lm_head
            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data
        return
    for name, tensor in unwrapped.state_dict().items():  # state_dict, NOT named_parameters: tied lm_head
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _push_weights(llm, model, accelerator: Accelerator) -> None:
    """The worker's `reload_weights` (reached through collective_rpc, in-process) sets vLLM's config context
    around the model runner's in-place reload; `model.load_weights` fails on the CPU build because the
    weights were post-processed at load time."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_state_dict(model, accelerator)})


def sync_weights(llm, model, accelerator: Accelerator) -> None:
    """Reload the trained weights into this rank's vLLM engine in place, then drop KV blocks cached under the
    old weights."""
    _push_weights(llm, model, accelerator)
    llm.reset_prefix_cache()


def vllm_sleep(llm) -> None:
    """Free all of vLLM's GPU memory for the update: level 2 discards weights and KV cache (TRL's colocate
    mode, trl/trainer/grpo_trainer.py). Level 1 would copy the weights to pinned CPU memory only for
    `vllm_wake_and_sync` to overwrite them."""
    llm.sleep(level=2)


def vllm_wake_and_sync(llm, model, accelerator: Accelerator) -> None:
    """Wake vLLM after `vllm_sleep` with the TRAINED weights, never the discarded ones: weights first, push them,
    then the KV cache (verl/workers/sharding_manager/fsdp_vllm.py, __enter__). Each wake_up empties torch's
    cache itself (vllm/device_allocator/cumem.py, wake_up), so the update's blocks make room; the sleep cleared
    the prefix cache."""
    llm.wake_up(tags=["weights"])
    _push_weights(llm, model, accelerator)
    llm.wake_up(tags=["kv_cache"])


def frozen_models_and_vllm(args, accelerator: Accelerator, need_reward_model: bool = True) -> tuple:
    """The stages' frozen models and this rank's vLLM engine, in the compute dtype (bf16 under mixed precision):
    reward.RewardModel if `need_reward_model`, the reference policy if args.kl_coef > 0, whole on every rank
    (`replicated_loading`), and `build_vllm` if args.use_vllm. Returns (reward_model, ref_model, llm), None for
    each one not built."""
    import reward
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    reward_model, ref_model, llm = None, None, None
    with replicated_loading():
        if need_reward_model:
            reward_model = reward.RewardModel(
                args.reward_model,
                device=str(accelerator.device),
                dtype=dtype,
                batch_size=args.rm_batch_size,
                max_length=args.rm_max_length,
                share_prefix=args.share_prompt,
            )
        if args.kl_coef > 0:  # only loaded when used
            ref_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(accelerator.device).eval()
            if args.share_prompt:  # the same rows as the policy
                use_shared_prefix_attention(ref_model, args.model)
    if args.use_vllm:
        max_len, seed = args.max_prompt_length + args.max_new_tokens, args.seed + accelerator.process_index
        llm = build_vllm(
            args.model, dtype, seed, max_len, accelerator, args.vllm_gpu_memory_utilization, args.vllm_sleep
        )
    return reward_model, ref_model, llm


# ---- 3. speed and memory (CPU and GPU); each states what it equals ----
class TokenLogProbs(torch.autograd.Function):
    """Equals `(log_softmax(z).gather(targets), entropy(softmax(z)))` with z = logits.float() / T, computed in fp32
    `chunk` rows at a time (tests/test_train_grlo.py checks values and gradients against autograd).

    Autograd through log_softmax keeps an (N, V) fp32 softmax for backward (or recomputes the whole
    chunk under checkpointing). Here backward rebuilds p = exp(z - logZ) from the logits it already
    holds and the saved log-normaliser, and applies the closed-form gradients:
        d log p_y / dz = onehot(y) - p        dH / dz = -p * (log p + H)        (then / T for d/d logits)
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, chunk: int):  # logits (N, V), targets (N,)
        logz, logprobs, entropy = [], [], []
        for i in range(0, logits.shape[0], chunk):
            z = logits[i : i + chunk].float() / temperature
            lz = torch.logsumexp(z, dim=-1)
            logz.append(lz)
            logprobs.append(z.gather(-1, targets[i : i + chunk, None]).squeeze(-1) - lz)
            entropy.append(lz - (torch.exp(z - lz[:, None]) * z).sum(-1))
        logz, logprobs, entropy = torch.cat(logz), torch.cat(logprobs), torch.cat(entropy)
        ctx.save_for_backward(logits, targets, logz, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an unused output (entropy, usually) arrives as None: skip its term
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, logz, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.chunk):
            s = slice(i, i + ctx.chunk)
            logp = logits[s].float() / ctx.temperature - logz[s, None]  # (n, V) log p
            p = logp.exp()
            g = -grad_logprobs[s, None] * p if grad_logprobs is not None else torch.zeros_like(p)
            if grad_logprobs is not None:
                g[torch.arange(len(g), device=g.device), targets[s]] += grad_logprobs[s]
            if grad_entropy is not None:
                g -= grad_entropy[s, None] * p * (logp + entropy[s, None])
            torch.div(g, ctx.temperature, out=grad[s])  # straight into the slice: no temporary, no copy
        return grad, None, None, None


def completion_logprobs(model, batch: dict, temperature: float, chunk_tokens: Optional[int] = None):
    """Equals, per completion token of each sample in a `collate` micro-batch,
    `log_softmax(model(prompt + completion).logits / T).gather(completion)` and the entropy of that softmax, as if
    the sample were forwarded alone: two (b, C) tensors, zero-padded after each completion
    (tests/test_train_grlo.py compares both, with and without the shared prompt, against that reference).

    The lm_head runs only on the columns in batch["logits_keep"], the ones that predict completion tokens, and
    `TokenLogProbs` takes the fp32 log-softmax `chunk_tokens` rows at a time, so a full (b, C, V) fp32 softmax
    never exists, not even for backward: at 16K tokens x 151,936 vocabulary it would take 10 GiB. Default chunk:
    1024 rows on GPU (few kernel launches); on CPU ~1 MB of fp32 logits, which stays in cache for the dozen passes
    over each row (measured 4-5x faster than 1024-row chunks on SmolLM2's 49k vocabulary)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=batch["logits_keep"],
        shared_prefix_slots=batch["shared_prefix_slots"],
    ).logits  # (rows, S*C, V): S slots per row
    C, V = batch["completion_ids"].shape[1], logits.shape[-1]
    logits = logits.reshape(-1, C, V)  # one row per slot
    if logits.shape[0] != len(batch["slot_rows"]):  # a group with fewer than S samples leaves empty slots
        logits = logits[batch["slot_rows"]]
    chunk = chunk_tokens or (max(1, 2**18 // V) if logits.device.type == "cpu" else 1024)
    targets = batch["completion_ids"].reshape(-1)
    logprobs, entropy = TokenLogProbs.apply(logits.reshape(-1, V), targets, temperature, chunk)
    return logprobs.view(-1, C), entropy.view(-1, C)


def prompt_groups(indices: list, prompt_ids: list, group_size: int) -> list:
    """Runs of consecutive indices with the same prompt, at most group_size long (the rollout keeps each
    group's G samples contiguous). group_size 1 gives one sample per run."""
    groups = []
    for i in indices:
        if groups and len(groups[-1]) < group_size and prompt_ids[groups[-1][-1]] == prompt_ids[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def make_microbatches(prompt_ids: list, completion_ids: list, token_budget: int, group_size: int = 1, indices=None):
    """Split sample `indices` (default: all) into micro-batches whose padded size (rows x (P + S*C)) fits the token
    budget. Equals: a partition of `indices`; only the gradient-accumulation split changes.

    A row is one sample, or with group_size > 1 (--share-prompt) one group: its prompt once and S slots of
    C columns (see collate); groups are never split here. Sorting rows by length first keeps padding low; a
    row larger than the budget gets its own micro-batch. Returns lists of sample indices, groups contiguous."""
    size = lambda g: (len(prompt_ids[g[0]]), max(len(completion_ids[i]) for i in g), len(g))  # noqa: E731
    batches, cur, p_max, c_max, s_max = [], [], 0, 0, 0
    indices = range(len(prompt_ids)) if indices is None else indices
    for g in sorted(prompt_groups(indices, prompt_ids, group_size), key=size):
        p, c, s = (max(a, b) for a, b in zip(size(g), (p_max, c_max, s_max)))
        if cur and (len(cur) + 1) * (p + s * c) > token_budget:
            batches.append(cur)
            cur, (p, c, s) = [], size(g)
        cur.append(g)
        p_max, c_max, s_max = p, c, s
    return [[i for g in b for i in g] for b in batches + [cur] if b]


def collate(indices: list, prompt_ids: list, completion_ids: list, pad_id: int, device, group_size: int = 1) -> dict:
    """Model inputs for a micro-batch, read by `completion_logprobs`. completion_ids and completion_mask come out
    as (b, C), one row per sample in `indices` order, and completion_mask is 1 exactly on completion tokens, so
    prompt and pad tokens never enter the loss.

    Each row holds one group from prompt_groups: its prompt once (left-padded to end at column P-1), then S
    slots of C columns, one completion per slot. S = 1 (group_size 1) is the usual prompt + completion row with
    a 2-D padding mask. With --share-prompt (S = G) every slot's positions continue from the prompt's end and
    the attention mask lets a token see the prompt and the earlier tokens of its own slot only, so each
    completion gets exactly the logits it would get in a row of its own, and the prompt is forwarded (and
    back-propagated) once per group instead of G times. logits_keep lists, slot by slot, the columns whose
    logits predict the slot's tokens: P-1 (the prompt's last token) for the first one, then the slot's own
    columns. shared_prefix_slots = (S, C) lets `shared_prefix_attention` skip the blocks the mask hides."""
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
    attn = (seg >= 0).long() if S == 1 else shared_prefix_mask(seg)  # (rows, L) or (rows, 1, L, L)
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": pos,
        "logits_keep": keep,
        "slot_rows": torch.tensor(slot_rows),
        "completion_ids": comp,
        "completion_mask": cmask,
    }
    return {k: v.to(device) for k, v in batch.items()} | {"shared_prefix_slots": (S, C) if S > 1 else None}


def shared_prefix_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean attention mask for rows that pack one shared prefix and several continuations
    (`collate` with --share-prompt, `reward.RewardModel(share_prefix=True)`). seg (B, L): 0 on the prefix, k + 1
    on continuation k, -1 on padding. A token sees the prefix and the earlier tokens of its own continuation
    only; every row also sees itself, because a fully masked row (padding) would give NaN."""
    L = seg.shape[1]
    q, kv = seg[:, :, None], seg[:, None, :]
    mask = torch.ones(L, L, dtype=torch.bool).tril() & (kv >= 0) & ((kv == 0) | (kv == q))
    return (mask | torch.eye(L, dtype=torch.bool))[:, None]


SHARED_PREFIX_ATTENTION = "grlo_shared_prefix"  # registered by use_shared_prefix_attention, on first use


def shared_prefix_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, shared_prefix_slots=None, **kwargs
):
    """Equals sdpa with the whole `shared_prefix_mask`, for rows laid out as [prefix: P columns | S slots of C
    columns] (tests/test_reward.py compares the two).

    That mask is False everywhere except three kinds of blocks: prefix x prefix, slot k x prefix and slot k x
    slot k. sdpa with the whole (L, L) mask still scores every pair, about 3x the needed work for 4 slots of
    64 tokens after a 47-token prompt. Here the prefix and the slots get one sdpa call each, a slot's queries
    attending over P + C keys (its row's prefix, then itself) instead of L, so only the skipped, fully masked
    blocks differ from plain sdpa, and they contributed nothing. The caller passes shared_prefix_slots=(S, C)
    to the model's forward; any forward without it (HF generate, a 2-D mask) is plain sdpa.
    query (B, H, L, D); key, value (B, H_kv, L, D); attention_mask (B, 1, L, L) bool. Returns (B, L, H, D)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if shared_prefix_slots is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    S, C = shared_prefix_slots
    B, H, L, D = query.shape
    P = L - S * C
    key, value = repeat_kv(key, H // key.shape[1]), repeat_kv(value, H // value.shape[1])  # GQA: one per head
    sdpa = functools.partial(
        torch.nn.functional.scaled_dot_product_attention, scale=scaling, dropout_p=dropout if module.training else 0.0
    )
    mask = attention_mask[:, 0]  # (B, L, L)
    out_prefix = sdpa(query[:, :, :P], key[:, :, :P], value[:, :, :P], attn_mask=mask[:, None, :P, :P])  # (B, H, P, D)

    def by_slot(x):  # (B, H, L, D) -> (B*S, H, C, D): slot k of row b becomes row b*S + k
        return x[:, :, P:].unflatten(2, (S, C)).transpose(1, 2).flatten(0, 1)

    def prefix_then_slot(x):  # (B, H, L, D) -> (B*S, H, P + C, D)
        prefix = x[:, None, :, :P].expand(B, S, H, P, D).flatten(0, 1)
        return torch.cat([prefix, by_slot(x)], dim=2)

    rows = mask[:, P:].unflatten(1, (S, C))  # (B, S, C, L): the mask rows of slot k's queries
    own = rows[..., P:].unflatten(-1, (S, C)).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, S, C, C): k x k
    slot_mask = torch.cat([rows[..., :P], own], dim=-1).flatten(0, 1)[:, None]  # (B*S, 1, C, P + C)
    out = sdpa(by_slot(query), prefix_then_slot(key), prefix_then_slot(value), attn_mask=slot_mask)  # (B*S, H, C, D)
    out = out.unflatten(0, (B, S)).transpose(1, 2).flatten(2, 3)  # (B, H, S*C, D)
    return torch.cat([out_prefix, out], dim=2).transpose(1, 2).contiguous(), None


def use_shared_prefix_attention(model, name: str) -> None:
    """Switch a model loaded with sdpa attention to `shared_prefix_attention` (registering it with transformers on
    first use), for --share-prompt rows: the policy and reference, and RewardModel(share_prefix=True). Other
    attentions would misread the bool mask (eager adds it as 0/1), so they are refused, naming the model."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if model.config._attn_implementation not in ("sdpa", SHARED_PREFIX_ATTENTION):
        raise ValueError(
            f"{name}: --share-prompt needs sdpa attention, the model uses "
            f"{model.config._attn_implementation!r}: use --no-share-prompt"
        )
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)  # 2-D masks: built as for sdpa
    model.set_attn_implementation(SHARED_PREFIX_ATTENTION)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS. Used on CPU only.

    Every step frees gigabytes of activations and allocates them again. By default glibc gives large blocks
    back to the OS (munmap, heap trim), so the next step writes to fresh pages, and each fresh page costs a
    page fault plus zeroing: 1-4 GiB/s on our VMs, against ~12 GiB/s for memory that is reused. With this
    setting every block comes from the heap (M_MMAP_MAX 0: no block gets a mapping of its own, not even the
    400 MB logits) and the heap is never trimmed (M_TRIM_THRESHOLD -1), so once the heap has grown to a
    step's peak (a step or two later than that, where small objects left between the big blocks fragment
    it), a step reuses the pages of the last one. The process keeps its peak memory until it exits.
    Measured on the cpu-smollm2 preset in docs/train_grlo.md "Speed on CPU". Equals: nothing changes
    but where freed memory goes (tests/test_train_grlo.py counts the page faults). Returns False where the C library
    has no mallopt (not glibc), or if GRLO_KEEP_FREED_MEMORY=0 (glibc's defaults, for an A/B)."""
    if os.environ.get("GRLO_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # constants from glibc's <malloc.h>
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


# ---- 4. checkpoints, the run's logs and the command line ----
def start_run(args, check_args) -> tuple:
    """The Accelerator for the launched backend (`make_accelerator`), `check_args(args, num_processes)` before
    anything is written or loaded, seeds, and rank 0's TensorBoard writer (mirrored to wandb with --track).
    Returns (accelerator, log, writer); other ranks get a no-op log and no writer."""
    import dataclasses

    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter

    cpu = not torch.cuda.is_available()
    if cpu:
        keep_freed_memory()  # before the big allocations
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and not cpu)
    accelerator = make_accelerator(use_bf16, args.max_grad_norm)
    notes = check_args(args, accelerator.num_processes) or []
    check_fresh_output_dir(args.output_dir, args.resume)
    set_seed(args.seed)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    for note in notes:
        log(f"note: {note}")
    writer = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        config = dataclasses.asdict(args)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project, name=args.exp_name, config=config, sync_tensorboard=True)
        writer = SummaryWriter(args.output_dir)
        writer.add_text("args", "\n".join(f"|{k}|{v}|" for k, v in config.items()))
    return accelerator, log, writer


RUN_FILES = ("rollouts.jsonl", "events.out.tfevents.*", "checkpoint-*", ".tmp-checkpoint-*", "final")


def check_fresh_output_dir(output_dir: str, resume: bool) -> None:
    """A run owns its output directory: a new run (no --resume) refuses a folder that already holds another run's
    files, instead of appending to its rollouts.jsonl and TensorBoard logs and overwriting its checkpoints."""
    found = sorted({os.path.basename(p) for pattern in RUN_FILES for p in glob.glob(os.path.join(output_dir, pattern))})
    if found and not resume:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise SystemExit(f"--output-dir {output_dir} already holds a run ({shown}). Pass --resume to continue that "
                         "run, or a new --output-dir for a new one: a run never appends to or overwrites another "
                         "run's files.")  # fmt: skip


def pad_values(values: list, indices: list, width: int, device) -> torch.Tensor:
    """Right-pad per-sample 1-D values (lists or tensors, e.g. log-probs) to (len(indices), width)."""
    out = torch.zeros(len(indices), width, device=device)
    for row, i in enumerate(indices):
        v = torch.as_tensor(values[i], dtype=torch.float32, device=device)
        out[row, : len(v)] = v
    return out


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints, oldest first (a checkpoint only exists once its rename has happened)."""
    return sorted(glob.glob(os.path.join(output_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))


def save_checkpoint(accelerator, model, tokenizer, output_dir: str, step: int, keep_last: int, extra_state=None):
    """HF folder (vLLM and evaluate.py load it) + Accelerate state (optimizer, scheduler, RNG), atomically,
    under any backend (sharded weights are gathered to rank 0). `trainer_state/step.json` holds the step and
    any `extra_state` (e.g. a data cursor)."""
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


def resume(accelerator, output_dir: str, log=print) -> dict:
    """Load model, optimizer, scheduler and RNG state from the newest checkpoint in `output_dir` and return its
    step.json ({"step": 0} without one). Rows of rollouts.jsonl from the steps the resumed run redoes are dropped,
    so the file reads as one uninterrupted run."""
    if not list_checkpoints(output_dir):
        return {"step": 0}
    ckpt = list_checkpoints(output_dir)[-1]
    accelerator.load_state(os.path.join(ckpt, "trainer_state"))
    with open(os.path.join(ckpt, "trainer_state", "step.json")) as f:
        saved = json.load(f)
    rollouts = os.path.join(output_dir, "rollouts.jsonl")
    if accelerator.is_main_process and os.path.exists(rollouts):
        with open(rollouts) as f:
            kept = [line for line in f if json.loads(line)["step"] < saved["step"]]
        with open(rollouts, "w") as f:
            f.writelines(kept)
    log(f"resumed from {ckpt} at step {saved['step']}")
    return saved


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
    parts = [
        f"steps {c[0] + 1}-{c[-1] + 1}: {sum(xs := [x for s in c for x in by_step[s]]) / len(xs):+.4f}" for c in chunks
    ]
    return "reward trend | " + " | ".join(parts)


def write_rollouts(
    file, step: int, rows: list, responses: list, scores: list, rewards, truncated: list, outcomes: list
) -> None:
    """One JSON line per sample: the judge's raw `score`, its `outcome` for rule rows (reward.compute_rewards:
    "pass: 3/3 passed", "timeout: ...", math's "no_answer", ...) and the shaped `reward` (eq. 7) the advantages used."""
    for i, response in enumerate(responses):
        record = {"step": step, "prompt": rows[i]["prompt"], "completion": response, "score": scores[i]}
        record |= {"outcome": outcomes[i]} if outcomes[i] else {}
        record |= {"reward": float(rewards[i]), "finish_reason": "length" if truncated[i] else "stop"}
        file.write(json.dumps(record) + "\n")
    file.flush()


def train_metrics(sums: dict, grad_norms: list, scheduler, accelerator, tis: bool, kl: bool) -> dict:
    """losses/ and policy/ metrics of one step's update, from train_on_batch's per-rank sums."""
    sums = {k: accelerator.reduce(v, "sum") for k, v in sums.items()}
    tok = sums["tokens"].clamp(min=1)
    metrics = {
        "charts/learning_rate": scheduler.get_last_lr()[0],
        "losses/policy_loss": float(sums["loss"]) / max(len(grad_norms), 1),
        "losses/entropy": float(sums["entropy"] / tok),
        "losses/grad_norm": sum(grad_norms) / len(grad_norms),
        "policy/clipfrac": float(sums["clipfrac"] / tok),
        "policy/ratio_mean": float(sums["ratio"] / tok),
        # KL(pi_old || pi) estimated from the ratios (CleanRL's): k3 = (r - 1) - log r, and the plain -log r
        "policy/approx_kl": float(sums["approx_kl"] / tok),
        "policy/old_approx_kl": float(sums["old_approx_kl"] / tok),
    }
    if tis:
        metrics["policy/tis_weight_mean"] = float(sums["tis_weight"] / tok)
    if kl:
        metrics["losses/kl"] = float(sums["kl"] / tok)
    return metrics


def completion_metrics(completion_ids: list, truncated: list, eos_ids: list, tokenizer, accelerator) -> dict:
    """completions/ metrics over all ranks: mean length, share cut at max_new_tokens, share ending on each stop id."""
    lengths = accelerator.gather(torch.tensor([len(c) for c in completion_ids], device=accelerator.device).float())
    clipped = accelerator.gather(torch.tensor(truncated, device=accelerator.device).float())
    stops = torch.tensor([sum(c[-1:] == [e] for c in completion_ids) for e in eos_ids], device=accelerator.device)
    stops = (accelerator.reduce(stops.float(), "sum") / len(lengths)).tolist()
    metrics = {"completions/mean_length": float(lengths.mean()), "completions/clipped_ratio": float(clipped.mean())}
    metrics |= {f"completions/stop_{tokenizer.convert_ids_to_tokens(e)}": n for e, n in zip(eos_ids, stops)}
    return metrics | {"completions/tokens": float(lengths.sum())}


def cli(args_class, presets: dict, description: str, argv=None):
    """tyro CLI whose defaults come from `--preset NAME` (the first preset by default); later flags override it."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    preset = next(iter(presets))
    for k, a in enumerate(argv):
        if a == "--preset" and k + 1 < len(argv):
            preset = argv[k + 1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
    if preset not in presets:
        raise SystemExit(f"--preset must be one of {list(presets)}, got {preset!r}")
    return tyro.cli(args_class, default=presets[preset], args=argv, description=description)
