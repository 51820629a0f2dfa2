"""Will it fit? `--dummy-weights`: a run at the models' real shapes with random weights, measured phase by phase
beside the memory plan of docs/gpu.md, before anything is downloaded. Importing it has no side effects.

- `SHIPPED`: the models the presets and docs name; their config.json ships in models/ (shapes only);
- `dummy_models`: at start-up, --model and --reward-model become local folders holding that config.json (with
  --dummy-overrides applied) and a word-level tokenizer of the model's vocabulary size;
- `from_pretrained`: the loaders' one switch: random weights from the config instead of the checkpoint
  (vLLM does the same with load_format="dummy", generation.build_vllm);
- `plan`: the memory plan, per GPU and per phase, as formulas of the shapes (docs/gpu.md prints its tables
  from here: `python fit_check.py`);
- `report`: after the last step, each phase's time, peak memory, tokens/s and the update's MFU, against the plan
  and the device's memory.

What the dummy run changes: the weights (random: every completion runs to --max-new-tokens, the worst case,
because no stop id is set) and the tokenizer (one token per word: prompts keep their words, not their real
token counts; completions keep their token counts through the reward model). Shapes, dtypes, backends and every
phase's code are the real run's.
"""

import atexit
import json
import math
import os
import shutil
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 2**30
SHIPPED = {  # hub id -> models/<folder>/config.json
    "Qwen/Qwen3-4B-Base": "Qwen3-4B-Base",
    "Qwen/Qwen3-1.7B-Base": "Qwen3-1.7B-Base",
    "Skywork/Skywork-Reward-V2-Llama-3.1-8B": "Skywork-Reward-V2-Llama-3.1-8B",
    "Skywork/Skywork-Reward-V2-Qwen3-0.6B": "Skywork-Reward-V2-Qwen3-0.6B",
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# dense bf16 peak of the GPUs a user is likely to hold, TFLOP/s (vendor data sheets, without sparsity)
PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "A6000": 155, "4090": 165}


def config_source(flag: str, name: str) -> str:
    """The folder whose config.json gives `name`'s shapes: a local folder, or models/<name> for a shipped hub id."""
    if os.path.isfile(os.path.join(name, "config.json")):
        return name
    if name in SHIPPED:
        return os.path.join(HERE, "models", SHIPPED[name])
    raise ValueError(f"{flag} {name}: --dummy-weights needs a folder with a config.json or a shipped config "
                     f"({', '.join(SHIPPED)}); put the model's config.json in a folder and pass that")  # fmt: skip


def parse_overrides(text: str) -> dict:
    """'num_hidden_layers=4,vocab_size=4096' -> {"num_hidden_layers": 4, "vocab_size": 4096} (JSON values)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--dummy-overrides: {item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def word_tokenizer(vocab_size: int):
    """A tokenizer of exactly `vocab_size` ids that maps one word to one token: ids 0-3 are <|endoftext|> (EOS and
    pad), <|im_start|>, <|im_end|>, <unk>; id k >= 4 is the word "t<k>". Any sampled id decodes to one word, and
    that word encodes back to one token (<unk> for ids beyond a smaller vocabulary), so a completion reaches the
    reward model with its token count. Chat template: ChatML."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=specials[0], pad_token=specials[0],
                                  unk_token="<unk>", additional_special_tokens=specials[1:3])  # fmt: skip
    tok.chat_template = CHATML
    return tok


def dummy_models(args, log) -> None:
    """--dummy-weights, at start-up: point --model and --reward-model (and train_ppo.py's --critic-model, if set) at
    folders holding their config.json (with --dummy-overrides) and a `word_tokenizer`, in a temporary folder of this
    process (removed at exit); then 2 steps (the first warms up: CUDA graphs, the allocator; the report reads the
    second), never a resume, no held-out evaluation, and (train_rlvr.py) one sampling round a step."""
    root = tempfile.mkdtemp(prefix="grlo-dummy-")
    atexit.register(shutil.rmtree, root, True)
    overrides = parse_overrides(args.dummy_overrides)
    for flag in ("model", "reward_model", "critic_model"):  # train_ppo.py's --critic-model, where it is set
        name = getattr(args, flag, None)
        if not name:
            continue
        with open(os.path.join(config_source(f"--{flag.replace('_', '-')}", name), "config.json")) as f:
            config = json.load(f) | overrides
        # the word tokenizer's ids: <|endoftext|> = 0 ends, pads and begins (the shipped ids may lie past an override)
        config |= {k: 0 for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        folder = os.path.join(root, flag)
        os.makedirs(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        word_tokenizer(config["vocab_size"]).save_pretrained(folder)
        setattr(args, flag, folder)
        # built on the meta device: a config that cannot build fails now
        kind = dict(sequence_classifier=flag == "reward_model", token_classifier=flag == "critic_model")
        n = shapes(folder, **kind)["params"]
        changed = f", changed: {overrides}" if overrides else ""
        log(f"dummy weights: --{flag.replace('_', '-')} {name}: {n / 1e9:.3f} B random parameters (config{changed})")
    args.max_steps = 2
    args.eval_dataset = None  # held-out accuracy is no phase of a step
    if hasattr(args, "max_sampling_rounds"):  # train_rlvr.py: random weights earn no signal; one round a step
        args.max_sampling_rounds = 1
    if args.resume:
        raise ValueError("--dummy-weights with --resume: a dummy run has nothing to resume")


def track_live_memory() -> bool:
    """CPU: make the process's RSS follow its live tensors, so a phase's peak RSS is that phase's own. glibc serves
    blocks under its dynamic mmap threshold (which grows to 32 MB) from a heap that keeps freed pages; with the
    threshold fixed at 1 MiB every tensor of 1 MiB or more gets its own mapping, returned to the OS when freed.
    Used instead of `batching.keep_freed_memory` (the opposite, for speed) in a --dummy-weights run."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>; setting it turns the dynamic threshold off
    return mallopt(M_MMAP_THRESHOLD, 2**20) == 1


def from_pretrained(cls, path: str, dummy: bool, **kwargs):
    """`cls.from_pretrained(path, **kwargs)`; with --dummy-weights the same architecture with random weights, built
    from path's config.json alone (nothing else is read)."""
    if not dummy:
        return cls.from_pretrained(path, **kwargs)
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
        path, **{k: kwargs.pop(k) for k in ("num_labels",) if k in kwargs}
    )
    return cls.from_config(config, **kwargs)


# ---- the plan ----
def shapes(path: str, sequence_classifier: bool = False, token_classifier: bool = False) -> dict:
    """Parameter counts (on the meta device: no memory) and the widths the plan needs, from a folder's config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    import distributed

    from transformers import AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path, **({"num_labels": 1} if sequence_classifier or token_classifier else {}))
    cls = AutoModelForSequenceClassification if sequence_classifier else AutoModelForCausalLM
    cls = AutoModelForTokenClassification if token_classifier else cls
    with torch.device("meta"), distributed.replicated_loading():  # never under ZeRO-3's zero.Init
        model = cls.from_config(config)
    c = getattr(config, "text_config", None) or config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return dict(
        params=sum(p.numel() for p in model.parameters()),
        largest=max(p.numel() for p in model.parameters()),
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        intermediate=c.intermediate_size,
        q_dim=c.num_attention_heads * head_dim,
        kv_dim=c.num_key_value_heads * head_dim,
        vocab=c.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)) and not (sequence_classifier or token_classifier),
    )


def plan(policy: dict, rm, *, backend: str, world: int, bf16: bool, tokens: int, gradient_checkpointing: bool,
         ref: bool, vllm_gib: float, sleep: bool, overhead_gib: float, logprob_chunk: int = 0, critic=None,
         rm_offloaded: bool = False) -> dict:  # fmt: skip
    """Memory per GPU (GiB), by component and by phase, for `policy` and `rm` (`shapes` dicts; rm None when no row
    asks for it); the tables of docs/gpu.md come from here. N policy parameters, M reward-model parameters, w ranks:

      resident: single/DDP fp32 weights 4N + AdamW 8N (+ DDP's 4N buckets); ZeRO-2 bf16 weights 2N + fp32 master
        4N/w + AdamW 8N/w + fp32 gradient partition 4N/w (DeepSpeed keeps it between steps); ZeRO-3 all of that /w;
        FSDP2 fp32 4N/w + 8N/w; sharded: + two gathered layers and the largest tensor; frozen RM 2M (bf16) or 4M
        (fp32), reference 2N or 4N with --kl-coef; overhead (CUDA context, NCCL, allocator slack);
      update: + gradients 4N (4N/w under FSDP2; `zero_grad` frees them between steps) + activations of a
        micro-batch of T tokens (a = 2 bytes in bf16, 4 in fp32; r = residual-stream bytes, fp32 under
        single-process autocast): checkpointed layer inputs T h L r and one layer recomputed T (5h + 4q + 5kv + 4I) a
        (all L layers without checkpointing), the completion logits and their gradient 2 T V a, the fp32 log-softmax
        chunks 4 min(chunk, T) V 4 (batching.completion_logprobs: 1024 rows on GPU, 2^18 / V on CPU), the LM head's
        weight gradient V h a before it is added in; with a tied embedding the update's peak is the larger of that
        and the end of backward (gradients, the held LM-head gradient and the embedding's dense one, 2 V h a);
      rollout = resident + vLLM; reward = resident (+ vLLM when it does not sleep); weight sync = resident + vLLM
        + the largest tensor twice in the compute dtype (gathered, and vLLM's copy while it loads it).
      critic (train_ppo.py; `shapes(path, token_classifier)`): a second trained model under the same backend, its
      state resident and its activations in the update (its layer inputs; its recomputed layer only where larger
      than the policy's, the two backward passes run one after the other; a scalar head, no vocabulary logits);
      rm_offloaded: the RM is in GPU memory only while it scores (the release offloads it)."""
    N, M, G = policy["params"], (rm or {}).get("params", 0), GIB
    a = 2 if bf16 else 4  # compute dtype bytes
    if critic is not None:  # the critic's state and activations, then the policy's (keys critic_*)
        c = plan(critic, None, backend=backend, world=world, bf16=bf16, tokens=tokens, ref=False, vllm_gib=0.0,
                 gradient_checkpointing=gradient_checkpointing, sleep=True, overhead_gib=0.0)  # fmt: skip
        p = plan(policy, rm, backend=backend, world=world, bf16=bf16, tokens=tokens, ref=ref, vllm_gib=vllm_gib,
                 gradient_checkpointing=gradient_checkpointing, sleep=sleep, overhead_gib=overhead_gib,
                 logprob_chunk=logprob_chunk, rm_offloaded=rm_offloaded)  # fmt: skip
        skip = ("logits_and_grad", "logprob_chunks", "lm_head_grad")  # the critic's head is a scalar
        p["resident"] |= {f"critic_{k}": v for k, v in c["resident"].items() if k not in ("reward_model", "overhead")}
        p["update"] |= {f"critic_{k}": v for k, v in c["update"].items() if k not in skip}
        # backward runs the critic's graph, then the policy's: one recomputed layer at a time, the larger one
        recomputed = p["update"].pop("critic_one_layer_recomputed", 0.0) - p["update"].get("one_layer_recomputed", 0.0)
        p["update"] |= {"critic_one_layer_recomputed": max(0.0, recomputed)} if gradient_checkpointing else {}
        extra_resident = sum(v for k, v in p["resident"].items() if k.startswith("critic_"))
        extra_update = sum(v for k, v in p["update"].items() if k.startswith("critic_"))
        p["phases"] = {k: v + extra_resident + (extra_update if k == "train" else 0) for k, v in p["phases"].items()}
        return p
    grads = {}
    if backend == "deepspeed-zero2":
        state = dict(weights=2 * N, master=4 * N / world, adam=8 * N / world, grads=4 * N / world)
    elif backend == "deepspeed-zero3":
        state = dict(weights=2 * N / world, master=4 * N / world, adam=8 * N / world, grads=4 * N / world)
    elif backend == "fsdp":
        state, grads = dict(weights=4 * N / world, adam=8 * N / world), dict(grads=4 * N / world)
    else:
        state, grads = dict(weights=4 * N, adam=8 * N), dict(grads=4 * N)
        state |= {"ddp_buckets": 4 * N} if backend == "ddp" else {}
    if backend in ("deepspeed-zero3", "fsdp"):  # a layer in use and the next prefetched, and the largest tensor
        layer = (N - policy["vocab"] * policy["hidden"]) / policy["layers"]
        state["gathered"] = (2 * layer + policy["largest"]) * (2 if backend == "deepspeed-zero3" else a)
    frozen = dict(reward_model=0 if rm_offloaded else M * a) | ({"reference": N * a} if ref else {})
    resident = dict(state, **frozen, overhead=overhead_gib * G)
    T, h, L, V = tokens, policy["hidden"], policy["layers"], policy["vocab"]
    r = 4 if (not bf16 or backend in ("single", "ddp")) else 2  # single/DDP autocast keeps an fp32 residual stream
    per_layer = T * (5 * h + 4 * policy["q_dim"] + 5 * policy["kv_dim"] + 4 * policy["intermediate"]) * a
    if gradient_checkpointing:
        update = dict(grads, layer_inputs=T * h * L * r, one_layer_recomputed=per_layer)
    else:
        update = dict(grads, all_layers=per_layer * L + T * h * L * r)
    chunk = logprob_chunk or max(1, 2**18 // V)
    update |= dict(logits_and_grad=2 * T * V * a, logprob_chunks=4 * min(chunk, T) * V * 4, lm_head_grad=V * h * a)
    # a tied embedding: autograd holds the LM head's weight gradient until the embedding's dense one arrives at the
    # end of backward, when the activations are gone: the update peaks at the LM head or there, whichever is larger
    update |= {"tied_embedding_grad": V * h * a} if policy["tied"] else {}
    total = lambda d: sum(d.values()) / G  # noqa: E731
    vllm = 0.0 if sleep else vllm_gib
    at_end = update.get("grads", 0) + update["lm_head_grad"] + update.get("tied_embedding_grad", 0)
    phases = {
        "rollout": total(resident) + vllm_gib,
        "reward": total(resident) + vllm + (M * a / G if rm_offloaded else 0.0),
        "train": total(resident) + vllm + max(total(update) - update.get("tied_embedding_grad", 0) / G, at_end / G),
        "weight_sync": total(resident) + vllm_gib + (2 * policy["largest"] * a / G if vllm_gib else 0.0),
    }
    to_gib = lambda d: {k: v / G for k, v in d.items()}  # noqa: E731
    return dict(resident=to_gib(resident), update=to_gib(update), vllm_gib=vllm_gib, phases=phases)


def update_flops(policy: dict, tokens: int, gradient_checkpointing: bool, extra_forwards: int) -> float:
    """Matmul FLOPs of the update over `tokens` (prompt + completion, every epoch): 6 per parameter and token for
    forward and backward, +2 for the recompute under checkpointing, +2 per no-grad pass (pi_old, pi_ref). The
    embedding lookup is no matmul (except when tied: it is the LM head); attention's own FLOPs are left out."""
    matmul_params = policy["params"] - (0 if policy["tied"] else policy["vocab"] * policy["hidden"])
    return tokens * matmul_params * (6 + 2 * gradient_checkpointing + 2 * extra_forwards)


def device_memory_gib(device) -> float:
    """What the device holds: the GPU's memory, or on CPU the machine's (MemTotal)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def peak_tflops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def report(phases, args, accelerator, prompt_ids: list, completion_ids: list, need_rm: bool, llm, log,
           critic_model: str | None = None) -> dict:  # fmt: skip
    """After a --dummy-weights run: per phase, the last step's time and the peak memory (max over ranks and steps)
    against the plan and the device; tokens/s of the rollout and the update; the update's MFU. Rank 0 prints a
    table and writes <output_dir>/fit_check.json. prompt_ids, completion_ids: this rank's last step.
    critic_model: train_ppo.py's critic folder; its state and activations join the plan and its FLOPs the
    update's (the value pass, a no-grad forward below the update by construction, is measured and not planned)."""
    import distributed

    phases.take()  # the last checkpoint, saved after the last step's metrics
    device, world, backend = accelerator.device, accelerator.num_processes, distributed.backend(accelerator)
    bf16 = accelerator.mixed_precision == "bf16"
    policy, rm = shapes(args.model), shapes(args.reward_model, sequence_classifier=True) if need_rm else None
    critic = shapes(critic_model, token_classifier=True) if critic_model else None
    total = device_memory_gib(device)  # on CPU the machine's, shared by the processes on it
    total /= int(os.environ.get("LOCAL_WORLD_SIZE", world)) if device.type == "cpu" else 1
    if device.type == "cuda":  # vLLM's share of the GPU; CUDA context, NCCL, allocator slack
        vllm_gib, overhead = (args.vllm_gpu_memory_utilization * total if llm is not None else 0.0), 3.0
    else:  # vLLM's CPU engine: its weights in the compute dtype and the 1 GiB KV cache generation.build_vllm sets
        vllm_gib = policy["params"] * (2 if bf16 else 4) / GIB + 1.0 if llm is not None else 0.0
        # what no formula counts (python, torch, the data, vLLM's engine buffers): the RSS after set-up, less the
        # weights it holds by the plan; every byte that comes after (gradients, AdamW, activations) is planned
        at_setup = plan(policy, rm, backend=backend, world=world, bf16=bf16, tokens=1, gradient_checkpointing=False,
                        ref=args.kl_coef > 0, vllm_gib=vllm_gib, sleep=False, overhead_gib=0.0,
                        critic=critic)["resident"]  # fmt: skip
        later = ("adam", "ddp_buckets", "critic_adam", "critic_ddp_buckets")  # AdamW's state: at step 1
        held = sum(v for k, v in at_setup.items() if k not in later) + vllm_gib
        overhead = phases.after_gib["setup"] - held
    sleep = llm is not None and args.vllm_sleep and device.type == "cuda"
    # the largest micro-batch: --token-budget, or a whole mini-batch of this rank's longest prompt + full completions
    per_minibatch = math.ceil(len(completion_ids) / args.num_minibatches) * (
        max(map(len, prompt_ids)) + args.max_new_tokens
    )
    tokens = min(args.token_budget, per_minibatch)
    p = plan(policy, rm, backend=backend, world=world, bf16=bf16, tokens=tokens,
             gradient_checkpointing=args.gradient_checkpointing, ref=args.kl_coef > 0, vllm_gib=vllm_gib, sleep=sleep,
             overhead_gib=overhead, logprob_chunk=1024 if device.type == "cuda" else 0, critic=critic)  # fmt: skip
    peaks = phases.peaks_over_ranks(accelerator)
    last = {"setup": phases.history[0]["setup"]}
    for step in phases.history[-2:]:  # the last step, and the checkpoint after it
        last |= step
    counts = [sum(map(len, prompt_ids)), sum(map(len, completion_ids))]
    n_prompt, n_completion = accelerator.reduce(
        torch.tensor(counts, dtype=torch.float64, device=device), "sum"
    ).tolist()
    # GRPO's pi_old/pi_ref passes run in its update; train_ppo.py runs them in the value pass, and trains the critic
    extra = int(args.num_minibatches * args.ppo_epochs > 1 or args.kl_coef > 0) + int(args.kl_coef > 0)
    n_update = (n_prompt + n_completion) * args.ppo_epochs
    flops = update_flops(policy, n_update, args.gradient_checkpointing, 0 if critic else extra)
    flops += update_flops(critic, n_update, args.gradient_checkpointing, 0) if critic else 0.0
    achieved = flops / world / max(last.get("train", 0.0), 1e-9) / 1e12  # per device
    peak = peak_tflops(device)
    rows = []
    for name, seconds in last.items():
        planned, measured = p["phases"].get(name), peaks.get(name, 0.0)
        rows.append(dict(phase=name, seconds=seconds, peak_gib=measured, plan_gib=planned,
                         fits_by_plan=None if planned is None else planned <= total,
                         fits_by_measurement=measured <= total))  # fmt: skip
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        device_gib=total,
        backend=backend,
        processes=world,
        precision="bf16" if bf16 else "fp32",
        sampler="vLLM" if llm is not None else "HF generate (no vLLM engine: --no-use-vllm or vLLM not installed)",
        memory_measured="max of torch's reserved peak and the device's used memory"
        if device.type == "cuda"
        else "peak RSS of the process",
        phases=rows,
        rollout_tokens_per_s=n_completion / max(last.get("rollout", 0.0), 1e-9),
        update_tokens_per_s=n_update / max(last.get("train", 0.0), 1e-9),
        update_tflops_per_device=achieved,
        update_mfu=achieved / peak if peak else None,
        plan=p | {"tokens_per_microbatch": tokens},
        policy=policy,
        reward_model=rm,
        critic=critic,
        args={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
    )
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "fit_check.json"), "w") as f:
            json.dump(result, f, indent=1)
        log(format_report(result))
    return result


def format_report(r: dict) -> str:
    lines = [
        f"fit check | {r['device']} ({r['device_gib']:.1f} GiB), {r['backend']} x {r['processes']}, {r['precision']}, "
        f"sampler {r['sampler']}; memory = {r['memory_measured']} (max over ranks)",
        f"{'phase':<12} {'time s':>8} {'peak GiB':>9} {'plan GiB':>9}  fits (plan / measured)",
    ]
    for row in r["phases"]:
        plan_gib = "-" if row["plan_gib"] is None else f"{row['plan_gib']:.2f}"
        fits = "-" if row["fits_by_plan"] is None else ("yes" if row["fits_by_plan"] else "NO")
        margin = r["device_gib"] - row["peak_gib"]
        lines.append(f"{row['phase']:<12} {row['seconds']:8.2f} {row['peak_gib']:9.2f} {plan_gib:>9}  {fits} / "
                     f"{'yes' if row['fits_by_measurement'] else 'NO'} ({margin:+.1f} GiB free)")  # fmt: skip
    mfu = f", MFU {100 * r['update_mfu']:.1f}%" if r["update_mfu"] is not None else " (MFU: peak unknown for device)"
    lines.append(f"rollout {r['rollout_tokens_per_s']:.0f} completion tokens/s | update {r['update_tokens_per_s']:.0f}"
                 f" tokens/s, {r['update_tflops_per_device']:.2f} TFLOP/s a device{mfu}")  # fmt: skip
    return "\n".join(lines)


def plan_table(policy: dict, rm, backends: list, world: int, gpu_gib: float, vllm_share: float, **kw) -> str:
    """docs/gpu.md's plan tables: one column per backend, GiB per GPU, at --token-budget 16384 with checkpointing."""
    plans = {b: plan(policy, rm, backend=b, world=world if b != "single" else 1, vllm_gib=vllm_share * gpu_gib,
                     sleep=True, **kw) for b in backends}  # fmt: skip
    rows = [f"| GiB per GPU | {' | '.join(backends)} |", "|---|" + "---:|" * len(backends)]
    for part in ("resident", "update"):
        for key in dict.fromkeys(k for p in plans.values() for k in p[part]):
            rows.append(f"| {part}: {key} | " + " | ".join(f"{p[part].get(key, 0):.2f}" for p in plans.values()) + " |")
    for phase in ("rollout", "reward", "train", "weight_sync"):
        cells = [f"{p['phases'][phase]:.1f} ({100 * p['phases'][phase] / gpu_gib:.0f}%)" for p in plans.values()]
        rows.append(f"| **{phase}** | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # the plan tables of docs/gpu.md, from the shipped configs
    paper = dict(bf16=True, tokens=16384, gradient_checkpointing=True, ref=False, overhead_gib=3.0, logprob_chunk=1024)
    q4, q17 = (shapes(config_source("", f"Qwen/Qwen3-{n}-Base")) for n in ("4B", "1.7B"))
    sky8, sky06 = (
        shapes(config_source("", f"Skywork/Skywork-Reward-V2-{n}"), True) for n in ("Llama-3.1-8B", "Qwen3-0.6B")
    )
    print(f"Qwen3-4B-Base {q4['params'] / 1e9:.2f} B + Skywork-Reward-V2-Llama-3.1-8B {sky8['params'] / 1e9:.2f} B, "
          "4 x 80 GB (79.3 GiB), vLLM 0.3 (sleeping in reward and train):\n")  # fmt: skip
    print(plan_table(q4, sky8, ["ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"], 4, 79.3, 0.3, **paper))
    print(f"\nQwen3-1.7B-Base {q17['params'] / 1e9:.2f} B + Skywork-Reward-V2-Qwen3-0.6B "
          f"{sky06['params'] / 1e9:.2f} B, one 80 GB GPU, vLLM 0.3:\n")  # fmt: skip
    print(plan_table(q17, sky06, ["single"], 1, 79.3, 0.3, **paper))
    print("\nQwen3-4B-Base + Skywork-Reward-V2-Llama-3.1-8B, one process on one H200 (139 GiB; bench/gpu_check.sh):\n")
    print(plan_table(q4, sky8, ["single"], 1, 139.0, 0.3, **paper))
    critic4 = shapes(config_source("", "Qwen/Qwen3-4B-Base"), token_classifier=True)
    print(f"\ntrain_ppo.py, the release: + a Qwen3-4B critic ({critic4['params'] / 1e9:.2f} B), 4 x 80 GB, vLLM 0.3:\n")
    print(plan_table(q4, sky8, ["deepspeed-zero3", "fsdp"], 4, 79.3, 0.3, critic=critic4, **paper))
    print("\nthe same with vLLM's share at 0.2:\n")
    print(plan_table(q4, sky8, ["deepspeed-zero3", "fsdp"], 4, 79.3, 0.2, critic=critic4, **paper))
    print("\nthe same, the reward model in GPU memory only while it scores (the release offloads it):\n")
    print(plan_table(q4, sky8, ["deepspeed-zero3", "fsdp"], 4, 79.3, 0.3, critic=critic4, rm_offloaded=True, **paper))
