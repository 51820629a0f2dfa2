"""The sampling engine: this rank's vLLM engine (colocated, sleep mode on GPU), its weight sync from the trainer,
the HF-generate fallback with the same semantics, and the stop ids of a base model. None of it is the algorithm.
Importing it has no side effects.
"""

import torch
from accelerate import Accelerator
from transformers import GenerationConfig

import distributed


def build_vllm(
    model: str,
    dtype: torch.dtype,
    seed: int,
    max_model_len: int,
    accelerator: Accelerator,
    gpu_memory_utilization: float,
    sleep: bool,
    dummy_weights: bool = False,
):
    """This rank's in-process vLLM engine for `model`; on several processes one engine per rank inside the
    launcher's processes (`external_launcher`, TRL's colocate mode, trl/trainer/grpo_trainer.py).

    GPU: CUDA graphs, `gpu_memory_utilization` of the GPU, sleep mode if `sleep`. CPU: eager (compiling costs
    ~100 s of start-up), a 1 GiB KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE=<GiB> overrides it; there
    gpu_memory_utilization would reserve that share of all RAM), and every prompt prefilled whole: vLLM 0.32 CPU
    crashes ("CPU Generator does not use offset") when a seeded request's prompt is prefilled in chunks.
    Log-probs come back after temperature (`processed_logprobs`), as the trainer computes them. `dummy_weights`:
    random weights in the config's shapes (vLLM's load_format="dummy"; the first sync brings the trainer's)."""
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
        load_format="dummy" if dummy_weights else "auto",
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
    max_new_tokens. No stop ids (--dummy-weights): every completion runs to max_new_tokens, EOS included."""
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
            ignore_eos=not stop_ids,
            detokenize=False,  # only token ids are used: no detokenizing in the engine loop
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


def full_state_dict(model, accelerator: Accelerator, prefix: str = ""):
    """Yield (name, full tensor) on EVERY rank, whatever the sharding; tied lm_head included. With a `prefix`
    (train_ppo.py's "policy."), only the tensors under it, named without it.

    DDP: plain state_dict. FSDP2: DTensor.full_tensor() all-gathers each parameter. DeepSpeed ZeRO-3:
    GatheredParameters one parameter at a time (trl/trainer/grpo_trainer.py, _move_model_to_vllm), tested
    on CPU under accelerate launch with configs/deepspeed_zero3.yaml."""
    unwrapped = accelerator.unwrap_model(model)
    if distributed.backend(accelerator) == "deepspeed-zero3":
        import deepspeed

        for name, param in unwrapped.named_parameters(remove_duplicate=False):  # keeps the tied lm_head
            if name.startswith(prefix):
                with deepspeed.zero.GatheredParameters([param]):
                    yield name[len(prefix) :], param.data
        return
    for name, tensor in unwrapped.state_dict().items():  # state_dict, NOT named_parameters: tied lm_head
        if name.startswith(prefix):
            yield name[len(prefix) :], tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _push_weights(llm, model, accelerator: Accelerator, prefix: str = "") -> None:
    """The worker's `reload_weights` (reached through collective_rpc, in-process) sets vLLM's config context
    around the model runner's in-place reload; `model.load_weights` fails on the CPU build because the
    weights were post-processed at load time."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_state_dict(model, accelerator, prefix)})


def sync_weights(llm, model, accelerator: Accelerator, prefix: str = "") -> None:
    """Reload the trained weights (those under `prefix`) into this rank's vLLM engine in place, then drop KV
    blocks cached under the old weights."""
    _push_weights(llm, model, accelerator, prefix)
    llm.reset_prefix_cache()


def vllm_sleep(llm) -> None:
    """Free all of vLLM's GPU memory for the update: level 2 discards weights and KV cache (TRL's colocate
    mode, trl/trainer/grpo_trainer.py). Level 1 would copy the weights to pinned CPU memory only for
    `vllm_wake_and_sync` to overwrite them."""
    llm.sleep(level=2)


def vllm_wake_and_sync(llm, model, accelerator: Accelerator, prefix: str = "") -> None:
    """Wake vLLM after `vllm_sleep` with the TRAINED weights, never the discarded ones: weights first, push them,
    then the KV cache (verl/workers/sharding_manager/fsdp_vllm.py, __enter__). Each wake_up empties torch's
    cache itself (vllm/device_allocator/cumem.py, wake_up), so the update's blocks make room; the sleep cleared
    the prefix cache."""
    llm.wake_up(tags=["weights"])
    _push_weights(llm, model, accelerator, prefix)
    llm.wake_up(tags=["kv_cache"])
