"""Systems code both stage scripts call in one line: distributed backends, vLLM plumbing, speed and memory.

None of it is the algorithm.

Each function states what it guarantees. The GPU-only paths follow the peers' working code (cited where used);
what can run on CPU is tested in tests/test_systems.py (2-process gloo runs under `accelerate launch` with the
DDP and DeepSpeed ZeRO-2/3 configs, FSDP2 under torchrun), and docs/gpu.md holds the memory plan for what cannot.
Importing this module has no side effects.
"""

import contextlib
import ctypes
import datetime
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

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
        raise RuntimeError("accelerate 1.15 cannot run FSDP on CPU: its FSDP branch (accelerate/state.py) excludes CPU "
                           "processes, so the run would silently become DDP or N unconnected copies. On CPU launch with "
                           "--multi_gpu (DDP) or a DeepSpeed config; raw FSDP2 on CPU is covered by tests/fsdp2_sync_check.py.")  # fmt: skip
    if cpu and deepspeed:  # a C++ extension for inference all-reduce, ~2 min to compile, unused
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1  # by accelerate launch or torchrun
    pg = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=DIST_TIMEOUT)] if launched else []
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=cpu and not deepspeed,
                              step_scheduler_with_optimizer=False, kwargs_handlers=pg)  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(f"{os.environ['WORLD_SIZE']} processes were launched, but accelerate set up no distributed "
                           "backend: each would train alone. Check the launch command and config file.")  # fmt: skip
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


def check_context_length(model_path: str, needed: int, what: str) -> None:
    """Fail in seconds, before any weights load, when `needed` tokens exceed the model's context.

    vLLM would otherwise reject max_model_len after a minute of loading, with a pydantic traceback."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and needed > limit:
        raise ValueError(f"{model_path}: its context is {limit} tokens (config.json max_position_embeddings), but {what} "
                         f"need {needed}. Lower those flags so they add up to at most {limit}.")  # fmt: skip


# ---- vLLM weight sync ----
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


# ---- speed and memory (CPU and GPU); each states what it equals ----
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
    but where freed memory goes (tests/test_train_grlo.py counts the page faults). Returns False where the C library has no
    mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # constants from glibc's <malloc.h>
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
