"""PPO stage: GRLO's released recipe, PPO with a learned critic and GAE (verl `adv_estimator=gae`), beside GRPO.

One step, numbered as in train_grlo.py and docs/train_ppo.md (equations continue train_grlo's: eq. 10 onward):
  1. data: B prompts (official GRLO JSONL) in a seeded order, ONE completion each (the release's n = 1);
  2. rollout: an in-process vLLM engine (or HF `generate`), one seed per completion;
  3. reward: `reward.compute_rewards` scores each completion, `shape_rewards` shapes it (eq. 7), and the score
     sits on the completion's last token, 0 on the others (eq. 10);
  4. advantages: the value pass gives V(s_t) at every completion token; GAE runs backward over the tokens (eq. 11),
     returns = A + V, and the advantages are whitened over all completion tokens of the batch (eq. 12);
  5. update: GRPO's clipped policy loss with a per-token A (eq. 2-6) plus the clipped value loss (eq. 13); one
     AdamW with two parameter groups, the actor's and the critic's learning rates (eq. 14);
  6. sync: the policy's weights into vLLM (the critic never goes there);  7. log;  8. checkpoint (critic in critic/).

What the critic adds: `ActorCritic`, `token_rewards`, `rollout_values`, `compute_gae`, `whiten`, `value_loss`,
`clip_gradients` and the value half of `train_on_batch`; the rest is marked copies of train_grlo.py. Departures
from verl (docs/train_ppo.md): policy and critic are one module with one optimizer.

    python local_models.py --which tiny && python train_ppo.py --preset cpu-smoke                        # CPU
    accelerate launch --config_file configs/deepspeed_zero3.yaml train_ppo.py --dataset train.jsonl  # the release
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer, get_scheduler
from transformers.utils import ModelOutput

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
    preset: Literal["release", "cpu-smoke", "cpu-arith", "cpu-arith-rm"] = "release"
    """named config whose values become the defaults; give it first, later flags override it"""
    exp_name: str = "ppo"
    """run name in wandb (with --track); TensorBoard shows runs by their --output-dir"""
    seed: int = 1
    """seed for data order, sampling and init"""
    output_dir: str = "runs/ppo"
    """checkpoints, TensorBoard events and rollouts.jsonl go here; a new run refuses a folder holding another run's"""

    # model
    model: str = "Qwen/Qwen3-4B-Base"
    """policy: hub id or local HF folder (a base model, as in the paper)"""
    critic_model: Optional[str] = None
    """critic's starting weights (a new scalar head on top); None = --model, as verl does"""
    reward_model: str = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"
    """sequence-classification reward model: hub id or local folder"""
    rm_max_length: int = 4096
    """reward-model max tokens; longer conversations keep the response's end (logged as rewards/rm_truncated)"""

    # data
    dataset: str = os.path.join(HERE, "data", "open_prompts.jsonl")
    """hub id or local .jsonl/.json/.parquet in the official GRLO format (or with a messages/prompt column)"""
    dataset_split: str = "train"
    """split for hub datasets"""
    max_prompt_length: int = 1024
    """prompts longer than this many tokens (after the chat template) are dropped and counted"""
    eval_dataset: Optional[str] = None
    """held-out rows with ground truth, answered greedily and verified every eval_every steps; None disables"""
    eval_limit: int = 0
    """score only the first N held-out rows; 0 = all"""

    # rollout
    num_generations: int = 1
    """completions per prompt (the release: 1; the critic, not a group, is the baseline)"""
    prompts_per_step: int = 1024
    """B: prompts per step, over all processes (must divide by the number of processes)"""
    max_new_tokens: int = 3072
    """max tokens per completion; longer ones are cut (logged as completions/clipped_ratio)"""
    temperature: float = 1.0
    """sampling temperature (also divides the trainer's logits so log-probs match)"""
    top_p: float = 1.0
    """nucleus sampling; 1.0 disables"""

    # algorithm
    judge: Literal["row", "reward-model"] = "row"
    """who scores a completion: each row's reward_model.style (reward.py), or the reward model for every row"""
    gamma: float = 1.0
    """GAE discount (eq. 11; the release: 1)"""
    lam: float = 1.0
    """GAE lambda (eq. 11; the release: 1, so A_t = R - V(s_t))"""
    whiten_advantages: bool = True
    """whiten the advantages over the batch's completion tokens, all ranks (eq. 12; verl does)"""
    value_clip: float = 0.5
    """value-loss clip: V may move this far from the rollout's value before the clipped term takes over (eq. 13)"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "constant"] = "token-mean"
    """loss aggregation of both losses: over all tokens, per sequence then mean, or Dr. GRPO's constant"""
    clip_eps_low: float = 0.2
    """PPO clip: ratio lower bound 1 - eps_low"""
    clip_eps_high: float = 0.2
    """PPO clip: ratio upper bound 1 + eps_high"""
    kl_coef: float = 0.0
    """KL-to-reference coefficient in the loss; 0 disables and loads no reference model (the release: 0)"""
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
    """actor (policy) learning rate"""
    critic_learning_rate: float = 1e-5
    """critic learning rate (the release: 10x the actor's)"""
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """learning-rate schedule of both groups after --warmup-steps (one step per optimizer step)"""
    warmup_steps: int = 0
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm, per model (under DeepSpeed one norm over both, inside its engine)"""
    num_minibatches: int = 4
    """optimizer steps per rollout batch (the release: 1,024 / 256 = 4)"""
    ppo_epochs: int = 1
    """passes over each rollout batch"""
    num_epochs: int = 15
    """passes over the prompt set; sets the step count when max_steps is 0 (the release: 15)"""
    max_steps: int = 0
    """stop after this many steps; 0 = num_epochs over the data"""

    # eval / checkpoint
    eval_every: int = 10
    """verify the held-out set every N steps (and before the first and after the last); 0 disables"""
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
    """recompute activations in backward, in the policy and the critic"""
    token_budget: int = 16384
    """max padded tokens per forward micro-batch; sets gradient accumulation"""
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
    """--dummy-weights: config.json fields to change in every model, e.g. num_hidden_layers=4 (a CPU-sized run)"""


LOCAL = os.path.join(HERE, "local_models")
ARITH_FILE = os.path.join(HERE, "data", "arith_{}.jsonl")
# The CPU presets match train_grlo.py's sample budget (prompts x completions a step) with one completion a prompt.
CPU = dict(num_generations=1, num_minibatches=1, gradient_checkpointing=False, num_epochs=1)
# the settings of train_rlvr.py --preset cpu-arith and train_grlo.py --preset cpu-arith-rm: 64 samples a step
ARITH = dict(model=f"{LOCAL}/smollm2-135m", dataset=ARITH_FILE.format("train"), eval_dataset=ARITH_FILE.format("test"),
             prompts_per_step=64, max_prompt_length=256, max_new_tokens=128, temperature=0.7, clip_eps_high=0.28,
             overlong="penalty", overlong_buffer=32, learning_rate=1e-5, critic_learning_rate=1e-4, max_steps=20,
             eval_every=5, save_every=20, **CPU,
             token_budget=2048)  # policy + critic activations: ~4 MB a token in fp32; 4096 ran out  # fmt: skip
# fmt: off
PRESETS = {
    "release": Args(),
    "cpu-smoke": Args(
        preset="cpu-smoke", model=f"{LOCAL}/tiny-qwen3", reward_model=f"{LOCAL}/tiny-qwen3-rm",
        output_dir="runs/ppo-cpu-smoke", prompts_per_step=32, max_prompt_length=128, max_new_tokens=24,
        learning_rate=3e-3, critic_learning_rate=3e-3, max_steps=30, save_every=10, **CPU,
    ),
    "cpu-arith": Args(preset="cpu-arith", output_dir="runs/ppo-cpu-arith", **ARITH),  # the verifier is the reward
    # train_rm.py's learned RM is the only reward; the verifier only measures (gold held-out accuracy)
    "cpu-arith-rm": Args(preset="cpu-arith-rm", output_dir="runs/ppo-cpu-arith-rm", judge="reward-model",
                         reward_model="runs/rm-cpu-arith/final", **ARITH),
}
# fmt: on


def check_args(args: Args, world: int) -> list:
    """Refuse impossible configurations in seconds, before any weights load, naming the flags to change."""
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must divide by {world} processes")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1) or args.value_clip <= 0 or args.critic_learning_rate < 0:
        raise ValueError("--gamma and --lam must lie in [0, 1], --value-clip > 0, --critic-learning-rate >= 0")
    bookkeeping.check_model_path("--model", args.model)
    bookkeeping.check_model_path("--critic-model", args.critic_model or args.model)
    flags = f"--max-prompt-length {args.max_prompt_length} + --max-new-tokens {args.max_new_tokens}"
    bookkeeping.check_context_length(args.model, args.max_prompt_length + args.max_new_tokens, flags)
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
class ActorCritic(torch.nn.Module):
    """The policy and the critic as ONE module, so each backend wraps them once (one DDP, one DeepSpeed engine, one
    FSDP tree) and one AdamW holds both (eq. 14). `forward(**inputs)` is the policy's; with values=True one call
    also runs the critic on the same rows and adds `critic_values` (rows, columns kept) to the output: V at each
    column whose logits the policy returns, i.e. the state before each completion token; logits=False skips the
    policy."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.config = policy.config  # what accelerate and DeepSpeed read (hidden size for their buckets)
        # FSDP's TRANSFORMER_BASED_WRAP wraps these classes (accelerate/utils/fsdp_utils.py reads the attribute)
        self._no_split_modules = sorted({*(policy._no_split_modules or []), *(critic._no_split_modules or [])})
        self.hf_parts = {"": "policy.", "critic": "critic."}  # checkpoint folders: the policy on top, critic/ inside

    def generate(self, *args, **kwargs):  # HF generate (the --no-use-vllm rollout) is the policy's
        return self.policy.generate(*args, **kwargs)

    def forward(self, values: bool = False, logits: bool = True, **inputs):
        out = self.policy(**inputs) if logits else ModelOutput()  # logits=False: the critic alone
        if values:
            keep = inputs["logits_to_keep"]
            plain = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")}
            out["critic_values"] = self.critic(**plain).logits[:, keep, 0].float()  # the scalar head, (rows, kept)
        return out


def build_actor_critic(args: Args, accelerator: Accelerator, max_steps: int):
    """Policy and critic (fp32 master weights) in one `ActorCritic`, AdamW with an actor and a critic parameter
    group (eq. 14) and the LR schedule, prepared by Accelerate for the launched backend. The critic is the base
    checkpoint with a new scalar head (verl's AutoModelForTokenClassification, dropout off)."""
    policy = fit_check.from_pretrained(AutoModelForCausalLM, args.model, args.dummy_weights, dtype=torch.float32)
    config = AutoConfig.from_pretrained(args.critic_model or args.model, num_labels=1)
    config.classifier_dropout = 0.0  # verl turns the head's dropout off: V is a regression, not a guess to regularise
    critic = fit_check.from_pretrained(AutoModelForTokenClassification, args.critic_model or args.model,
                                       args.dummy_weights, config=config, dtype=torch.float32)  # fmt: skip
    for m in (policy, critic):
        if args.gradient_checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.config.use_cache = False
    model = ActorCritic(policy, critic)
    groups = [{"params": list(policy.parameters()), "lr": args.learning_rate},
              {"params": list(critic.parameters()), "lr": args.critic_learning_rate}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=True)
    updates_per_step = args.num_minibatches * args.ppo_epochs
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


# ---- 3. reward ----
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


def token_rewards(rewards: torch.Tensor, completion_ids: list, width: int) -> torch.Tensor:
    """Eq. 10: the sequence reward on the completion's last token, 0 on every other token: (n, width)."""
    out = torch.zeros(len(completion_ids), width, device=rewards.device)
    last = torch.tensor([len(c) - 1 for c in completion_ids], device=rewards.device)
    out[torch.arange(len(completion_ids), device=rewards.device), last] = rewards
    return out


# ---- 4. advantages: the value pass, GAE, whitening ----
@torch.no_grad()
def rollout_values(model, ref_model, accelerator, args: Args, prompt_ids, completion_ids, pad_id):
    """One no-grad pass over the rollout batch before any update: the critic's V(s_t) at every completion token,
    and pi_old's log-probs (and pi_ref's, with --kl-coef) when the batch gets more than one optimizer step (with a
    single update pi_old is the update's own policy, detached, as in train_grlo.py: the policy is not run here).
    Returns (old_lp or None, ref_lp or None, values), (n, C) tensors padded with zeros."""
    n, C, device = len(completion_ids), max(map(len, completion_ids)), accelerator.device
    need_old = args.num_minibatches * args.ppo_epochs > 1 or ref_model is not None
    values = torch.zeros(n, C, device=device)
    old_lp, ref_lp = (torch.zeros(n, C, device=device) for _ in range(2)) if need_old else (None, None)
    micro = batching.make_microbatches(prompt_ids, completion_ids, args.token_budget)
    for mb in distributed.lockstep(micro, accelerator):  # every rank runs as many forwards (ZeRO-3/FSDP gather)
        b = batching.collate(mb, prompt_ids, completion_ids, pad_id, device)
        c, mask = b["completion_ids"].shape[1], b["completion_mask"]
        with accelerator.autocast():
            out = model(values=True, logits=need_old, **batching.model_inputs(b))
            values[mb, :c] = out.critic_values * mask
            if need_old:
                lp = batching.logprobs_from_logits(out.logits, b, args.temperature)[0]
                ref = batching.completion_logprobs(ref_model, b, args.temperature)[0] if ref_model is not None else lp
                old_lp[mb, :c], ref_lp[mb, :c] = lp * mask, ref * mask
    return old_lp, ref_lp, values


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """Eq. 11, generalised advantage estimation over each completion's tokens, backward from its end. rewards and
    values (n, C), 0 after each completion (so V after the last token is 0: the episode ends there).
        delta_t = r_t + gamma V(s_t+1) - V(s_t);   A_t = delta_t + gamma lam A_t+1;   R_t = A_t + V(s_t)
    With gamma = lam = 1 and the reward on the last token, A_t = r - V(s_t): the critic is a per-token baseline
    where GRPO's is the group mean. Returns (advantages, returns), (n, C)."""
    advantages, running = torch.zeros_like(values), torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def masked_moments(x: torch.Tensor, mask: torch.Tensor, accelerator):
    """Mean and unbiased variance of x over the masked tokens of every rank."""
    total, count = accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), "sum")
    mean = total / count
    return mean, accelerator.reduce(((x - mean) ** 2 * mask).sum(), "sum") / (count - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, accelerator, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 12: (x - mean) / sqrt(var + eps) over the masked tokens of the whole batch, every rank's (verl's
    masked_whiten); 0 off the mask."""
    mean, var = masked_moments(x, mask, accelerator)
    return (x - mean) * torch.rsqrt(var + eps) * mask


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


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float):
    """Eq. 13, per token (b, C): L_V = 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2), the value
    twin of eq. 2's clip (verl's compute_value_loss); and where the clipped term was the larger (the clipfrac)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    plain, capped = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.maximum(plain, capped), (capped > plain).float()


# Copied from train_grlo.token_weights
def token_weights(completion_mask: torch.Tensor, mode: str, num_seqs: float, num_tokens: float, max_new_tokens: int):
    """Eq. 6, aggregation as per-token weights, so micro-batches and ranks add up to the right total.

    token-mean: 1/T_total;  seq-mean-token-mean: 1/(N * |o_i|);  constant (Dr. GRPO): 1/(N * max_new_tokens)."""
    if mode == "token-mean":
        return completion_mask / num_tokens
    if mode == "seq-mean-token-mean":
        return completion_mask / completion_mask.sum(-1, keepdim=True).clamp(min=1) / num_seqs
    return completion_mask / (num_seqs * max_new_tokens)


# Copied from train_grlo.draw_minibatches
def draw_minibatches(n: int, mb_size: int, epochs: int, seed: int, step: int) -> list:
    """`epochs` passes over samples 0..n-1, each in mini-batches of mb_size (in index order) drawn anew from
    (seed, step, epoch) only: the same after a resume."""
    out = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + epoch))
        out += [sorted(order[k : k + mb_size].tolist()) for k in range(0, n, mb_size)]
    return out


def clip_gradients(model, accelerator, max_norm: float):
    """Each model's gradient norm, each clipped to max_norm on its own, as verl's two optimizers do: the critic's
    early gradients are far larger than the actor's and would otherwise shrink the actor's step. DeepSpeed clips
    inside its engine, over both at once (the departure); its norm is returned for both."""
    if distributed.steps_inside_backward(accelerator):
        norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        return norm, norm
    inner = accelerator.unwrap_model(model)
    return tuple(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm) for m in (inner.policy, inner.critic))


def train_on_batch(model, ref_model, optimizer, scheduler, accelerator, args: Args, samples, pad_id, step):
    """Eq. 2-6 and 13 over one rollout batch: `num_minibatches` optimizer steps, `ppo_epochs` times; one forward
    a micro-batch gives the policy's log-probs and the critic's values, one backward both gradients.

    samples = (prompt_ids, completion_ids, sampler_logprobs or None, loss_mask_seq (n,), and (n, C) tensors:
    advantages, returns, old log-probs and ref log-probs (both None with a single update), old values). Returns
    (sums of per-token statistics, (actor, critic) grad norms per optimizer step); raises FloatingPointError on a
    non-finite norm, as GRPO's."""
    prompt_ids, completion_ids, sampler_logprobs, loss_mask_seq, advantages, returns, old_lp, ref_lp, old_v = samples
    device, world, n = accelerator.device, accelerator.num_processes, len(completion_ids)
    model.train()
    keys = ("loss", "value_loss", "vf_clipfrac", "values", "clipfrac", "ratio", "approx_kl", "old_approx_kl",
            "tis_weight", "kl", "entropy", "tokens")  # fmt: skip
    sums, grad_norms = {k: torch.zeros((), device=device) for k in keys}, []
    minibatches = draw_minibatches(n, math.ceil(n / args.num_minibatches), args.ppo_epochs, args.seed, step)
    bar = tqdm(total=len(minibatches), desc="update", leave=False, disable=not accelerator.is_main_process)
    for mb in minibatches:
        # global counts of the samples and tokens in the loss, for the eq. 6 weights of both losses
        in_loss, lengths = loss_mask_seq[mb], torch.tensor([len(completion_ids[i]) for i in mb], device=device)
        counts = torch.stack([in_loss.sum(), (in_loss * lengths).sum()]).float()
        num_seqs, num_tokens = accelerator.reduce(counts, "sum").clamp(min=1).tolist()
        micro = batching.make_microbatches(prompt_ids, completion_ids, args.token_budget, indices=mb)
        micro = distributed.lockstep(micro, accelerator)  # every rank runs as many forwards and backwards
        for k, m in enumerate(micro):
            b = batching.collate(m, prompt_ids, completion_ids, pad_id, device)
            C, last = b["completion_ids"].shape[1], k == len(micro) - 1
            accelerator.sync_gradients = last  # gradients all-reduce (DDP) / DeepSpeed steps on the last one
            with distributed.no_sync(model, accelerator, last):
                with accelerator.autocast():
                    out = model(values=True, **batching.model_inputs(b))  # policy logits and critic values
                    logprobs, entropy = batching.logprobs_from_logits(out.logits, b, args.temperature)  # (b, C)
                ref = ref_lp[m, :C] if ref_model is not None else None
                old = old_lp[m, :C] if old_lp is not None else logprobs.detach()  # one update: pi_old = pi, detached
                samp = batching.pad_values(sampler_logprobs, m, C, device) if sampler_logprobs is not None else None
                per_token, stats = policy_loss(logprobs, old, advantages[m, :C], args, samp, ref, entropy)
                v_loss, stats["vf_clipfrac"] = value_loss(
                    out.critic_values, old_v[m, :C], returns[m, :C], args.value_clip
                )
                stats["values"] = out.critic_values.detach()
                mask = b["completion_mask"] * loss_mask_seq[m][:, None]  # (b, C); 0 on prompt/pad tokens
                weights = token_weights(mask, args.loss_agg, num_seqs, num_tokens, args.max_new_tokens)
                # eq. 14: one backward; the two losses reach disjoint parameter groups (policy, critic)
                loss, v_loss = (per_token * weights).sum() * world, (v_loss * weights).sum() * world
                accelerator.backward(loss + v_loss)
            with torch.no_grad():  # statistics over the tokens in the loss
                sums["loss"] += loss.detach() / world
                sums["value_loss"] += v_loss.detach() / world
                sums["tokens"] += mask.sum()
                sums["entropy"] += (entropy.detach() * mask).sum()
                for key in stats:
                    sums[key] += (stats[key] * mask).sum()
        norms = torch.stack(
            [torch.as_tensor(x, device=device) for x in clip_gradients(model, accelerator, args.max_grad_norm)]
        )
        if not torch.isfinite(norms).all():  # nothing of this step is saved; say where to restart from
            last = (bookkeeping.list_checkpoints(args.output_dir) or ["(none)"])[-1]
            what = "this update was not applied"
            if distributed.steps_inside_backward(accelerator):
                what = "DeepSpeed's engine already applied this update; the weights in memory are suspect"
            raise FloatingPointError(
                f"non-finite gradient norm (actor, critic: {norms.tolist()}); {what}. Nothing of this step was "
                f"saved; the last good checkpoint is {last}. Check the rewards, lower the learning rates or use fp32."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        grad_norms.append(norms.tolist())
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
def build_models(args: Args, accelerator, max_steps: int, log, need_reward_model: bool = True):
    """Policy and critic with AdamW and its schedule; the frozen reward model (if needed) and reference (if
    --kl-coef), whole on every rank; this rank's vLLM engine (or None) for the policy."""
    if need_reward_model:  # before any weights load
        bookkeeping.check_model_path("--reward-model", args.reward_model)
    model, optimizer, scheduler = build_actor_critic(args, accelerator, max_steps)
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32  # frozen models and vLLM
    with distributed.replicated_loading():  # frozen models: whole on every rank, never prepared
        reward_model = reward.RewardModel(args.reward_model, device=str(accelerator.device), dtype=dtype,
                                          batch_size=args.rm_batch_size, max_length=args.rm_max_length,
                                          dummy_weights=args.dummy_weights) if need_reward_model else None  # fmt: skip
        ref_model = (distributed.frozen_policy(args.model, dtype, accelerator.device, False, args.dummy_weights)
                     if args.kl_coef > 0 else None)  # fmt: skip
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

    # ---- 1. data: rows in the official format, the policy's chat template, overlong prompts dropped ----
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = reward.load_rows(args.dataset, args.dataset_split, reward.to_rlvr_row)  # bad records stop here
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

    # ---- setup: policy + critic + optimizer, reward model, optional reference, vLLM engine; resume ----
    need_rm = args.judge == "reward-model" or any(r["reward_model"]["style"] == "model" for r in rows)
    phases = bookkeeping.Phases(device)  # time and peak memory of each phase, every step
    with phases("setup"):
        model, optimizer, scheduler, reward_model, ref_model, llm = build_models(
            args, accelerator, max_steps, log, need_rm
        )
    sleep = llm is not None and args.vllm_sleep and torch.cuda.is_available()  # GPU only
    start_step = bookkeeping.resume(accelerator, args.output_dir, log)["step"] if args.resume else 0
    if llm is not None and start_step > 0:
        generation.sync_weights(llm, model, accelerator, prefix="policy.")
    rollouts_path = os.path.join(args.output_dir, "rollouts.jsonl")
    rollout_file = open(rollouts_path, "a") if accelerator.is_main_process else None
    if eval_rows and start_step == 0:
        model.eval()
        accuracy = evaluate_heldout(llm, model, accelerator, args, eval_rows, eval_ids, eos_ids, pad_id, tokenizer)
        log(f"eval before training | accuracy {accuracy['eval/accuracy']:.4f} on {len(eval_rows)} held-out problems")
        if writer is not None:
            writer.add_scalar("eval/accuracy", accuracy["eval/accuracy"], 0)

    B_local = args.prompts_per_step // world
    for step in range(start_step, max_steps):
        t_step = time.time()
        # ---- 1. data: this step's prompts, sliced per rank from the global order ----
        indices = step_prompt_indices(step, len(rows), args.prompts_per_step, args.seed)
        indices = indices[rank * B_local : (rank + 1) * B_local]
        batch_rows = [rows[i] for i in indices for _ in range(args.num_generations)]

        # ---- 2. rollout ----
        model.eval()
        with phases("rollout"):
            out = rollout(llm, model, accelerator, args, prompt_ids_all, indices, step, eos_ids, pad_id)
        prompt_ids, completion_ids, sampler_logprobs, truncated = out
        if sleep:  # free GPU memory for the update; the trained weights are pushed at wake-up (never stale)
            with phases("sleep"):
                generation.vllm_sleep(llm)

        # ---- 3. reward: the judge's score, shaped (eq. 7), on the last token (eq. 10) ----
        responses = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        judged = batch_rows if args.judge == "row" else [{**r, "reward_model": {"style": "model"}} for r in batch_rows]
        with phases("reward"):
            scores_list, reward_stats, outcomes = reward.compute_rewards(judged, responses, reward_model)
        scores = torch.tensor(scores_list, dtype=torch.float32, device=device)  # (B_local,)
        rewards, loss_mask_seq = shape_rewards(scores, completion_ids, truncated, args)
        C = max(map(len, completion_ids))
        r_tok = token_rewards(rewards, completion_ids, C)  # (B_local, C)

        # ---- 4. advantages: the value pass, GAE (eq. 11), whitening (eq. 12) ----
        # ALGO LOGIC: the critic's V(s_t) replaces GRPO's group mean as the baseline, token by token
        with phases("values"):
            old_lp, ref_lp, old_v = rollout_values(
                model, ref_model, accelerator, args, prompt_ids, completion_ids, pad_id
            )
        advantages, returns = compute_gae(r_tok, old_v, args.gamma, args.lam)
        mask = batching.pad_values([[1.0] * len(c) for c in completion_ids], range(len(completion_ids)), C, device)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask, accelerator)

        # ---- 5. update: mini-batches x epochs, micro-batches by token budget (eq. 2-6, 13, 14) ----
        samples = (prompt_ids, completion_ids, sampler_logprobs, loss_mask_seq, advantages, returns, old_lp, ref_lp,
                   old_v)  # fmt: skip
        with phases("train"):
            sums, grad_norms = train_on_batch(
                model, ref_model, optimizer, scheduler, accelerator, args, samples, pad_id, step
            )

        # ---- 6. sync: the policy's new weights into vLLM ----
        with phases("weight_sync"):
            if sleep:
                generation.vllm_wake_and_sync(llm, model, accelerator, prefix="policy.")
            elif llm is not None:
                generation.sync_weights(llm, model, accelerator, prefix="policy.")

        # ---- 7. log: one console line, TensorBoard, every sample to rollouts.jsonl ----
        tis, kl = sampler_logprobs is not None and args.tis_cap > 0, ref_model is not None
        actor_norms = [a for a, _ in grad_norms]
        metrics = bookkeeping.train_metrics(sums, actor_norms, scheduler, accelerator, tis, kl)
        metrics |= bookkeeping.completion_metrics(completion_ids, truncated, eos_ids, tokenizer, accelerator)
        tok = accelerator.reduce(sums["tokens"], "sum").clamp(min=1)
        # explained variance of the returns by the rollout's values, every rank's tokens: 1 = a perfect critic
        returns_mean, returns_var = masked_moments(returns, mask, accelerator)
        explained = 1 - masked_moments(returns - old_v, mask, accelerator)[1] / returns_var.clamp(min=1e-8)
        all_rewards = accelerator.gather(rewards)
        step_time, phase_times = time.time() - t_step, phases.line()
        metrics |= {
            "charts/tokens_per_sec": metrics.pop("completions/tokens") / max(phases.seconds["rollout"], 1e-9),
            "charts/episodes": (step + 1) * args.prompts_per_step * args.num_generations,
            "charts/critic_learning_rate": scheduler.get_last_lr()[1],
            "rewards/mean": float(all_rewards.mean()),
            "rewards/std": float(all_rewards.std()),
            "losses/value_loss": float(accelerator.reduce(sums["value_loss"], "sum")) / max(len(grad_norms), 1),
            "critic/grad_norm": sum(c for _, c in grad_norms) / len(grad_norms),
            "critic/vf_clipfrac": float(accelerator.reduce(sums["vf_clipfrac"], "sum") / tok),
            "critic/values_mean": float(accelerator.reduce(sums["values"], "sum") / tok),
            "critic/returns_mean": float(returns_mean),
            "critic/explained_variance": float(explained),
            **{k: float(v) for k, v in reward_stats.items()},  # per-rank: rank 0's share
            **phases.take(),  # time/rollout, memory/rollout_gib, ... (bookkeeping.Phases)
            "time/step": step_time,
        }
        if eval_rows and ((step + 1) % args.eval_every == 0 or step + 1 == max_steps):
            model.eval()
            metrics |= evaluate_heldout(llm, model, accelerator, args, eval_rows, eval_ids, eos_ids, pad_id, tokenizer)
        if accelerator.is_main_process:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step + 1)
            bookkeeping.write_rollouts(
                rollout_file, step, batch_rows, responses, scores_list, rewards, truncated, outcomes
            )
        m = metrics
        log(
            f"step {step + 1:>5}/{max_steps} | reward {m['rewards/mean']:+.4f} ± {m['rewards/std']:.4f} "
            f"| len {m['completions/mean_length']:6.1f} clip {m['completions/clipped_ratio']:.2f} "
            f"| loss {m['losses/policy_loss']:+.5f} vloss {m['losses/value_loss']:.4f} "
            f"ev {m['critic/explained_variance']:+.2f} "
            + (f"| eval {m['eval/accuracy']:.4f} " if "eval/accuracy" in m else "")
            + f"| {step_time:5.1f}s ({phase_times})"
        )
        if args.sample_every and (step + 1) % args.sample_every == 0:
            prompt, completion = batch_rows[0]["prompt"][-1]["content"], responses[0]
            log(f"--- sample @ step {step + 1} (reward {float(rewards[0]):+.3f})\n[prompt] {prompt}")
            log(f"[completion] {completion}")

        # ---- 8. checkpoint: the policy as an HF folder, the critic in critic/ ----
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == max_steps:
            with phases("checkpoint"):
                bookkeeping.save_checkpoint(accelerator, model, tokenizer, args.output_dir, step + 1, args.keep_last)

    if args.dummy_weights:  # the fit check: each phase's time and memory against the plan, the critic's included
        fit_check.report(phases, args, accelerator, prompt_ids, completion_ids, reward_model is not None, llm, log,
                         critic_model=args.critic_model or args.model)  # fmt: skip
    if accelerator.is_main_process:
        rollout_file.close()
        writer.close()
        log(bookkeeping.reward_trend(rollouts_path))
    if llm is not None:  # before Accelerate destroys the process group the engine still holds
        llm.llm_engine.engine_core.shutdown()
    accelerator.end_training()


if __name__ == "__main__":
    main(bookkeeping.cli(Args, PRESETS, __doc__))
