"""Run bookkeeping: the command line (presets), start-up checks that fail in seconds, the run's output folder
(never shared by two runs), checkpoints and exact resume, rollouts.jsonl, and the logged metrics.
Importing it has no side effects.
"""

import contextlib
import glob
import json
import math
import os
import shutil
import sys

import torch

import batching
import distributed
import fit_check


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


def rl_flag_notes(args) -> list:
    """The RL stages' loss and sampling flags: refuse what cannot work (a negative coefficient, a KL estimator
    without --kl-coef, an overlong buffer outside (0, --max-new-tokens)); return notes on what is valid but cannot
    act (the clip with one update per batch, TIS without vLLM), which rank 0 prints at start-up."""
    for flag in ("kl_coef", "entropy_coef", "tis_cap", "overlong_penalty", "clip_eps_low", "clip_eps_high"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is negative")
    if args.kl_coef == 0 and args.kl_estimator != "k3":
        raise ValueError(f"--kl-estimator {args.kl_estimator} does nothing without --kl-coef > 0 (eq. 4)")
    if args.overlong == "penalty" and not 0 < args.overlong_buffer < args.max_new_tokens:
        raise ValueError(f"--overlong-buffer {args.overlong_buffer} must lie in (0, --max-new-tokens "
                         f"{args.max_new_tokens}): the penalty ramps over the last buffer tokens (eq. 7)")  # fmt: skip
    notes = []
    if args.num_minibatches * args.ppo_epochs == 1:
        notes.append("one update per rollout batch (--num-minibatches 1, --ppo-epochs 1): the update is on-policy, "
                     "the ratio pi/pi_old is exactly 1, so the clip (eq. 2, --clip-eps-low/high) never acts and "
                     "policy/clipfrac stays 0")  # fmt: skip
    if args.tis_cap > 0 and not args.use_vllm:
        notes.append("--tis-cap acts on vLLM samples only: with --no-use-vllm the trainer samples, the TIS weight is 1")
    return notes


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


def start_run(args, check_args) -> tuple:
    """The Accelerator for the launched backend (`make_accelerator`), `check_args(args, num_processes)` before
    anything is written or loaded, seeds, and rank 0's TensorBoard writer (mirrored to wandb with --track).
    Returns (accelerator, log, writer); other ranks get a no-op log and no writer."""
    import dataclasses

    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter

    cpu = not torch.cuda.is_available()
    dummy = getattr(args, "dummy_weights", False)
    if cpu:  # before the big allocations; a fit check (--dummy-weights) measures live memory instead
        fit_check.track_live_memory() if dummy else batching.keep_freed_memory()
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and not cpu)
    accelerator = distributed.make_accelerator(use_bf16, args.max_grad_norm)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    if dummy:  # --model/--reward-model become their config.json shapes with random weights
        fit_check.dummy_models(args, log)
    notes = check_args(args, accelerator.num_processes) or []
    check_fresh_output_dir(args.output_dir, args.resume)
    accelerator.wait_for_everyone()  # every rank has looked at the folder before rank 0 writes into it
    set_seed(args.seed)
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
        unwrapped = accelerator.unwrap_model(model)
        # train_ppo.ActorCritic: the policy's HF folder on top (vLLM, evaluate.py), the critic's in critic/
        for sub, prefix in getattr(unwrapped, "hf_parts", {"": ""}).items():
            part = unwrapped.get_submodule(prefix.rstrip(".")) if prefix else unwrapped
            # a tied weight's second name (lm_head.weight): DeepSpeed ZeRO-2 hands back clones, which
            # save_pretrained cannot tell are shared, and would write it twice
            every_name = {n for n, _ in part.named_parameters(remove_duplicate=False)}
            tied = every_name - {n for n, _ in part.named_parameters()}
            own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            own = {k: v for k, v in own.items() if k not in tied}
            part.save_pretrained(os.path.join(tmp, sub), state_dict=own)
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


class Phases:
    """Wall time and peak memory of each phase of a step: `with phases("rollout"): ...`; `take()` returns the
    step's `time/<phase>` and `memory/<phase>_gib` metrics and starts the next step. A phase run several times in a
    step (dynamic sampling's rounds) adds up its time. Peak memory: on GPU torch's reserved peak and the device's
    used memory (polled every 20 ms: vLLM's pool included), on CPU the process's peak RSS, reset per phase
    through /proc/self/clear_refs (with `batching.keep_freed_memory` the heap keeps earlier phases' pages, so a
    CPU phase's peak is at least the largest before it; --dummy-weights uses `fit_check.track_live_memory`)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds, self.peak_gib, self.history, self.peaks, self.after_gib = {}, {}, [], {}, {}

    @staticmethod
    def _rss_gib(field: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20

    def _reset(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass

    def _peak(self, polled: float) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return max(torch.cuda.max_memory_reserved(self.device) / 2**30, polled)
        return self._rss_gib("VmHWM")

    @contextlib.contextmanager
    def __call__(self, name: str):
        import threading
        import time

        self._reset()
        polled, stop = [0.0], threading.Event()

        def poll():  # the device's used memory, vLLM's pool and other allocators included
            while not stop.wait(0.02):
                free, total = torch.cuda.mem_get_info(self.device)
                polled[0] = max(polled[0], (total - free) / 2**30)

        poller = threading.Thread(target=poll, daemon=True) if self.cuda else None
        if poller:
            poller.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if poller:
                stop.set()
                poller.join()
            peak = self._peak(polled[0])
            self.after_gib[name] = self._rss_gib("VmRSS") if not self.cuda else torch.cuda.memory_reserved() / 2**30
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.peak_gib[name] = max(self.peak_gib.get(name, 0.0), peak)

    def take(self) -> dict:
        """This step's metrics; the step's figures go to `history` (the fit report reads them)."""
        metrics = {f"time/{k}": v for k, v in self.seconds.items()}
        metrics |= {f"memory/{k}_gib": v for k, v in self.peak_gib.items()}
        self.history.append(dict(self.seconds))
        for k, v in self.peak_gib.items():
            self.peaks[k] = max(self.peaks.get(k, 0.0), v)
        self.seconds, self.peak_gib = {}, {}
        return metrics

    def line(self) -> str:
        """'roll 1.2 rew 0.3 train 4.5 sync 0.10' for the console, from the step not yet taken."""
        short = dict(rollout="roll", reward="rew", train="train", weight_sync="sync", checkpoint="ckpt")
        return " ".join(f"{short.get(k, k)} {v:.2f}" for k, v in self.seconds.items())

    def peaks_over_ranks(self, accelerator) -> dict:
        names = sorted(self.peaks)
        values = torch.tensor([self.peaks[k] for k in names], dtype=torch.float64, device=accelerator.device)
        return dict(zip(names, accelerator.reduce(values, "max").tolist()))
