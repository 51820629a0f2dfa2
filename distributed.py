"""Distributed backends: the Accelerator for whatever `accelerate launch` chose (DDP, DeepSpeed ZeRO-2/3, FSDP2),
what each backend needs from the stage scripts (lockstep forwards, the clip norm in force, gradient sync on the
last micro-batch), and frozen models loaded whole on every rank. None of it is the algorithm.

The GPU-only paths follow the peers' working code (cited where used); what runs on CPU is tested in
tests/test_systems.py (2-process gloo runs under `accelerate launch` with the DDP and DeepSpeed ZeRO-2/3 configs,
FSDP2 under torchrun), and docs/gpu.md holds the memory plan for what cannot. Importing it has no side effects.
"""

import contextlib
import datetime
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

import batching

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
      with bf16 its gradient reductions run in fp32 (communication_data_type) and, under ZeRO-3, gradients
      accumulate over micro-batches in fp32 (data_types.grad_accum_dtype; ZeRO-2 cannot, see below).
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
        if use_bf16 and plugin.zero_stage == 3:
            # accumulate gradients over micro-batches in fp32 (docs/gpu.md budgets fp32 gradients): ZeRO-3 sizes
            # its gradient partitions by data_types.grad_accum_dtype (deepspeed/runtime/zero/stage3.py,
            # grad_partitions_flat_buffer). ZeRO-2 cannot: it keeps its partition in the parameter dtype whatever
            # this says (stage_1_and_2.py, grads_in_partition), so under ZeRO-2 + bf16 they accumulate in bf16.
            plugin.deepspeed_config.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
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


def frozen_policy(path: str, dtype, device, shared_prompt: bool, dummy_weights: bool = False):
    """A frozen copy of a causal LM (the KL reference), whole on every rank; call inside `replicated_loading`.
    With --share-prompt it reads the same packed rows as the policy, so it gets the shared-prompt attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy_weights:  # --dummy-weights: random weights in the config's shapes (fit_check.py), nothing else read
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    if shared_prompt:
        batching.use_shared_prefix_attention(model, path)
    return model


def every_rank(flag: bool, accelerator) -> bool:
    """True when `flag` holds on every process: dynamic sampling stops only when every rank has enough groups.
    A sum, because accelerate's reduce knows mean/sum/max only and silently sums any other op ("min" too)."""
    count = accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")
    return count.item() == accelerator.num_processes
