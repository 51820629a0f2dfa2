"""RM stage: a Bradley-Terry reward model from preference pairs, scored exactly as `reward.RewardModel` scores.

One step, numbered as the banners in `main` and docs/train_rm.md (eq. 9 continues docs/train_grlo.md's numbering):
  1. data: this step's pairs (prompt, chosen response, rejected response) in a seeded order, each conversation
     rendered and cut by `reward.RewardModel.encode`, the code that renders it at scoring time;
  2. forward: every chosen and rejected conversation through the model, scored at its last real token
     (`reward.last_token_scores`, as `RewardModel.score` reads it);
  3. loss: -log sigmoid(r_chosen - r_rejected - margin), the Bradley-Terry likelihood (eq. 9);
  4. update: AdamW, gradient clipping, the LR schedule;
  5. log: loss, pairwise accuracy and mean margin; held-out accuracy and margin every --eval-every steps;
  6. checkpoint: a Hugging Face folder that `reward.RewardModel`, `train_grlo.py --reward-model` and
     `evaluate.py --reward-model` load unchanged, plus the trainer state for an exact resume.

The head is a sequence-classification head (num_labels=1) on a causal-LM backbone, as Skywork-Reward-V2's.

    python local_models.py && python train_rm.py --preset cpu-arith                         # CPU, SmolLM2
    accelerate launch --config_file configs/deepspeed_zero3.yaml train_rm.py                   # GPUs, hub data
"""

import math
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from tqdm import tqdm
from transformers import get_scheduler

import bookkeeping
import distributed
import reward

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    # experiment
    preset: Literal["skywork", "cpu-smoke", "cpu-arith"] = "skywork"
    """named config whose values become the defaults; give it first, later flags override it"""
    exp_name: str = "rm"
    """run name in wandb (with --track); TensorBoard shows runs by their --output-dir"""
    seed: int = 1
    """seed for data order and the new score head"""
    output_dir: str = "runs/rm"
    """checkpoints, TensorBoard events and eval results go here; a new run refuses a folder holding another run's"""

    # model
    model: str = "Qwen/Qwen3-0.6B"
    """backbone: a causal LM (hub id or local folder); its chat template renders the conversations"""
    max_length: int = 4096
    """max tokens per conversation; longer ones keep the response's end, as reward.RewardModel scores them"""

    # data
    dataset: str = "Skywork/Skywork-Reward-Preference-80K-v0.2"
    """hub id or local .jsonl/.json/.parquet with chosen/rejected message lists (optionally a shared prompt)"""
    dataset_split: str = "train"
    """split for hub datasets"""
    eval_dataset: Optional[str] = None
    """held-out pairs in the same format; None holds out --eval-fraction of the training pairs"""
    eval_fraction: float = 0.02
    """share of the pairs held out when --eval-dataset is None (a seeded split)"""

    # algorithm
    margin: float = 0.0
    """fixed margin m in -log sigmoid(r_c - r_r - m); 0 = plain Bradley-Terry"""

    # optimization
    learning_rate: float = 2e-6
    """AdamW learning rate"""
    lr_scheduler: Literal["constant", "cosine", "linear"] = "cosine"
    """learning-rate schedule after --warmup-steps"""
    warmup_steps: int = 10
    """linear warmup steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (under DeepSpeed written into its config: its engine clips)"""
    pairs_per_step: int = 128
    """pairs per optimizer step, over all processes (must divide by the number of processes)"""
    num_epochs: int = 1
    """passes over the training pairs; sets the step count when max_steps is 0"""
    max_steps: int = 0
    """stop after this many steps; 0 = num_epochs over the data"""

    # eval / checkpoint
    eval_every: int = 50
    """held-out accuracy every N steps (and before the first and after the last); 0 = only at the end"""
    save_every: int = 200
    """save a checkpoint every N steps (and at the end); 0 = only at the end"""
    keep_last: int = 2
    """keep this many newest checkpoints"""
    resume: bool = False
    """continue from the newest checkpoint in output_dir"""

    # system and logging: speed, memory and backends (batching/distributed/generation.py); none changes the algorithm
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """compute dtype: bf16 autocast (fp32 master weights) or fp32; auto = bf16 on GPU, fp32 on CPU"""
    gradient_checkpointing: bool = True
    """recompute activations in backward (saves most activation memory for ~1/3 more compute)"""
    token_budget: int = 16384
    """max padded tokens per forward micro-batch; sets gradient accumulation"""
    track: bool = False
    """mirror TensorBoard to wandb"""
    wandb_project: str = "grlo-rm"
    """wandb project (with --track; the entity comes from WANDB_ENTITY or your default)"""


LOCAL = os.path.join(HERE, "local_models")
PREFS = os.path.join(HERE, "data", "arith_prefs_{}.jsonl")  # pairs labelled by the verifier (data/README.md)
PRESETS = {
    "skywork": Args(),
    "cpu-smoke": Args(
        preset="cpu-smoke",
        model=f"{LOCAL}/tiny-qwen3",
        output_dir="runs/rm-cpu-smoke",
        dataset=PREFS.format("train"),
        eval_dataset=PREFS.format("test"),
        max_length=256,
        learning_rate=1e-3,
        pairs_per_step=16,
        max_steps=6,
        eval_every=3,
        save_every=3,
        gradient_checkpointing=False,
    ),
    "cpu-arith": Args(
        preset="cpu-arith",
        model=f"{LOCAL}/smollm2-135m",
        output_dir="runs/rm-cpu-arith",
        dataset=PREFS.format("train"),
        eval_dataset=PREFS.format("test"),
        max_length=384,
        learning_rate=1e-5,
        pairs_per_step=32,
        num_epochs=2,
        eval_every=10,
        save_every=50,
        token_budget=8192,
        gradient_checkpointing=False,  # 135M parameters: the activations fit
    ),
}


def check_args(args: Args, world: int) -> None:
    """Refuse impossible configurations in seconds, before any weights load, naming the flags to change."""
    if args.pairs_per_step % world:
        raise ValueError(f"--pairs-per-step {args.pairs_per_step} must divide by {world} processes")
    bookkeeping.check_context_length(args.model, args.max_length, f"--max-length {args.max_length}")
    if 2 * args.max_length > args.token_budget:
        raise ValueError(
            f"a pair of --max-length {args.max_length} needs {2 * args.max_length} tokens, over "
            f"--token-budget {args.token_budget}; raise the budget or lower --max-length"
        )


# ---- 1. data ----
def _text(value, where: str, field: str) -> str:
    """A response given as a string or as messages (the last assistant turn's content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        content = value[-1].get("content")
        if isinstance(content, str):
            return content
    raise ValueError(f"{where}: field '{field}' must be a string or a message list ending with an assistant turn")


def to_pair(obj, where: str) -> tuple:
    """(prompt messages, chosen text, rejected text) from a preference record; `where` ("file:line") in every error.

    Two layouts, as in TRL's preference datasets: a `prompt` (messages or a string) with `chosen` / `rejected`
    responses, or `chosen` / `rejected` full conversations whose turns before the last one are the prompt."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise ValueError(f"{where}: field '{field}' is missing")
    chosen, rejected = _text(obj["chosen"], where, "chosen"), _text(obj["rejected"], where, "rejected")
    if "prompt" in obj:
        prompt = obj["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    else:
        prompt = obj["chosen"][:-1]
        if not isinstance(obj["rejected"], list) or obj["rejected"][:-1] != prompt:
            raise ValueError(f"{where}: fields 'chosen' and 'rejected' must share every turn but the last")
    ok = (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)
    )
    if not ok:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty list of {{role, content}} messages")
    return prompt, chosen, rejected


def load_pairs(path: str, split: str, encode) -> tuple:
    """Token ids of every pair: ([(chosen ids, rejected ids)], number of conversations cut to --max-length)."""
    pairs, cut = [], 0
    for where, obj in reward.read_records(path, split):
        prompt, chosen, rejected = to_pair(obj, where)
        (c, c_cut), (r, r_cut) = encode(prompt, chosen), encode(prompt, rejected)
        pairs.append((c, r))
        cut += c_cut + r_cut
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs, cut


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


def pair_microbatches(pairs: list, indices: list, token_budget: int) -> list:
    """Split pair `indices` into micro-batches whose padded size (2 x pairs x longest) fits the token budget,
    sorted by length so that padding stays low."""
    batches, cur, longest = [], [], 0
    for i in sorted(indices, key=lambda i: max(map(len, pairs[i]))):
        n = max(longest, *map(len, pairs[i]))
        if cur and 2 * (len(cur) + 1) * n > token_budget:
            batches.append(cur)
            cur, n = [], max(map(len, pairs[i]))
        cur.append(i)
        longest = n
    return batches + [cur] if cur else batches


# ---- 2. forward and 3. loss ----
class PairwiseRM(torch.nn.Module):
    """The sequence-classification model, its forward scoring each sequence at its last real token exactly as
    `reward.RewardModel.score` does (`reward.last_token_scores`). Saves as the inner Hugging Face model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return reward.last_token_scores(self.model, input_ids, attention_mask)  # (B,)

    def save_pretrained(self, path: str, state_dict: dict):
        self.model.save_pretrained(path, state_dict={k.removeprefix("model."): v for k, v in state_dict.items()})


def pair_scores(model, pairs: list, indices: list, pad_id: int, device) -> tuple:
    """(r_chosen, r_rejected), each (b,), for the pairs in `indices`: one forward over the 2b conversations."""
    seqs = [pairs[i][0] for i in indices] + [pairs[i][1] for i in indices]
    input_ids, attention_mask = reward.pad_right(seqs, pad_id)  # (2b, T)
    scores = model(input_ids.to(device), attention_mask.to(device)).float()  # (2b,)
    return scores[: len(indices)], scores[len(indices) :]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 9: -log sigmoid(r_c - r_r - m) per pair, the negative log-likelihood that the chosen response is
    preferred under the Bradley-Terry model P(c > r) = sigmoid(r_c - r_r); m > 0 asks for a margin."""
    return -torch.nn.functional.logsigmoid(r_chosen - r_rejected - margin)


@torch.no_grad()
def evaluate_pairs(model, accelerator, pairs: list, pad_id: int, token_budget: int) -> dict:
    """Held-out pairwise accuracy (r_c > r_r) and mean margin r_c - r_r, data-parallel over ranks."""
    model.eval()
    world = accelerator.num_processes
    mine = list(range(accelerator.process_index, len(pairs), world))
    # Every rank scores the same number of pairs, so lockstep can always even out the micro-batch counts (under
    # ZeRO-3 every forward is a collective). A short rank pads with -1: scored (as pairs[-1]), never counted.
    mine += [-1] * (math.ceil(len(pairs) / world) - len(mine))
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # correct, margin sum, count
    for m in distributed.lockstep(pair_microbatches(pairs, mine, token_budget), accelerator):
        with accelerator.autocast():
            rc, rr = pair_scores(model, pairs, m, pad_id, accelerator.device)
        real = torch.tensor([i >= 0 for i in m], device=rc.device)
        margin = torch.where(real, rc - rr, 0.0)
        totals += torch.stack([((rc > rr) & real).sum(), margin.sum(), real.sum()]).double()
    totals = accelerator.reduce(totals, "sum")
    model.train()
    return {"eval/accuracy": float(totals[0] / totals[2]), "eval/margin": float(totals[1] / totals[2])}


def main(args: Args):
    accelerator, log, writer = bookkeeping.start_run(args, check_args)  # the launched backend; only rank 0 logs
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    # ---- setup: the model (a new score head on the backbone), its encoder, AdamW, the schedule; resume ----
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    with distributed.replicated_loading():  # prepare() shards it below; load it whole first
        rm = reward.RewardModel(args.model, device="cpu", dtype=torch.float32, max_length=args.max_length)
    rm.model.config.pad_token_id = rm.pad_id  # for anyone using the model's own pooling
    if args.gradient_checkpointing:
        rm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PairwiseRM(rm.model)

    # ---- 1. data: pairs encoded exactly as reward.RewardModel encodes at scoring time ----
    pairs, cut = load_pairs(args.dataset, args.dataset_split, rm.encode)
    if args.eval_dataset:
        eval_pairs, eval_cut = load_pairs(args.eval_dataset, "test", rm.encode)
    else:  # a seeded split of the training pairs
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, int(args.eval_fraction * len(pairs)))
        eval_pairs, pairs, eval_cut = [pairs[i] for i in order[:n_eval]], [pairs[i] for i in order[n_eval:]], 0
    max_steps = args.max_steps or args.num_epochs * math.ceil(len(pairs) / args.pairs_per_step)
    log(
        f"data: {len(pairs)} pairs, {len(eval_pairs)} held out, {cut + eval_cut} conversations cut to "
        f"--max-length {args.max_length}, {max_steps} steps"
    )
    if writer is not None:  # --max-length silently shortens conversations otherwise
        writer.add_scalar("charts/conversations_cut", cut + eval_cut, 0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    schedule = "constant_with_warmup" if args.lr_scheduler == "constant" else args.lr_scheduler
    scheduler = get_scheduler(schedule, optimizer, args.warmup_steps, max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run = f"{distributed.backend(accelerator)}, {world} process(es), {'bf16' if dtype == torch.bfloat16 else 'fp32'}"
    log(f"backend: {run}, grad clip {distributed.clip_norm(model, accelerator, args.max_grad_norm)}")
    start_step = bookkeeping.resume(accelerator, args.output_dir, log)["step"] if args.resume else 0
    if start_step == 0:
        metrics = evaluate_pairs(model, accelerator, eval_pairs, rm.pad_id, args.token_budget)
        log(f"eval before training | accuracy {metrics['eval/accuracy']:.4f} margin {metrics['eval/margin']:+.3f}")
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, 0)

    model.train()
    per_rank = args.pairs_per_step // world
    for step in range(start_step, max_steps):
        t_step = time.time()
        # ---- 1. data: this step's pairs, sliced per rank from the global order ----
        indices = step_prompt_indices(step, len(pairs), args.pairs_per_step, args.seed)
        indices = indices[rank * per_rank : (rank + 1) * per_rank]

        # ---- 2-4. forward, loss (eq. 9), update: micro-batches by token budget, one optimizer step ----
        micro = distributed.lockstep(pair_microbatches(pairs, indices, args.token_budget), accelerator)
        sums = torch.zeros(3, device=device)  # loss, correct, margin, summed over this rank's pairs
        for k, m in enumerate(tqdm(micro, desc="update", leave=False, disable=not accelerator.is_main_process)):
            last = k == len(micro) - 1
            accelerator.sync_gradients = last  # DDP all-reduce, DeepSpeed step: last only (public setter)
            with distributed.no_sync(model, accelerator, last):
                with accelerator.autocast():
                    r_chosen, r_rejected = pair_scores(model, pairs, m, rm.pad_id, device)  # (b,) each
                losses = bradley_terry_loss(r_chosen, r_rejected, args.margin)
                # the mean over the step's GLOBAL pairs; DDP averages gradients over ranks, so undo that
                accelerator.backward(losses.sum() / args.pairs_per_step * world)
            with torch.no_grad():
                sums += torch.stack([losses.sum(), (r_chosen > r_rejected).sum(), (r_chosen - r_rejected).sum()])
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        if not torch.isfinite(grad_norm):
            last_ckpt = (bookkeeping.list_checkpoints(args.output_dir) or ["(none)"])[-1]
            raise FloatingPointError(
                f"step {step + 1}: non-finite gradient norm ({grad_norm}); the last good "
                f"checkpoint is {last_ckpt}. Lower --learning-rate or use fp32."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

        # ---- 5. log ----
        sums = accelerator.reduce(sums, "sum") / args.pairs_per_step
        metrics = {
            "charts/learning_rate": scheduler.get_last_lr()[0],
            "charts/pairs": (step + 1) * args.pairs_per_step,
            "losses/loss": float(sums[0]),
            "losses/grad_norm": float(grad_norm),
            "rewards/accuracy": float(sums[1]),
            "rewards/margin": float(sums[2]),
            "time/step": time.time() - t_step,
        }
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == max_steps:
            metrics |= evaluate_pairs(model, accelerator, eval_pairs, rm.pad_id, args.token_budget)
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, step + 1)
        m = metrics
        log(
            f"step {step + 1:>5}/{max_steps} | loss {m['losses/loss']:.4f} acc {m['rewards/accuracy']:.3f} "
            f"margin {m['rewards/margin']:+.3f} | gnorm {m['losses/grad_norm']:.3f} lr {m['charts/learning_rate']:.2e} "
            + (f"| eval acc {m['eval/accuracy']:.4f} margin {m['eval/margin']:+.3f} " if "eval/accuracy" in m else "")
            + f"| {m['time/step']:.1f}s"
        )

        # ---- 6. checkpoint ----
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == max_steps:
            bookkeeping.save_checkpoint(accelerator, model, rm.tokenizer, args.output_dir, step + 1, args.keep_last)

    if accelerator.is_main_process:  # a stable name for the last checkpoint: --reward-model <output_dir>/final
        final = os.path.join(args.output_dir, "final")
        if os.path.islink(final):
            os.remove(final)
        os.symlink(f"checkpoint-{max_steps}", final)
        writer.close()
    accelerator.end_training()


if __name__ == "__main__":
    main(bookkeeping.cli(Args, PRESETS, __doc__))
