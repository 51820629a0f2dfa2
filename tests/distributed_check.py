"""Run under `accelerate launch --num_processes 2 [--config_file configs/X.yaml] tests/distributed_check.py POLICY RM`,
or under `torchrun --nproc_per_node 2 tests/distributed_check.py --fsdp-loading RM` (see fsdp_loading).

Drives the stage scripts' own functions through one update on each backend and prints, per rank, one line
`CHECK {json}` that tests/test_systems.py asserts on:
- the frozen models (reward and reference model) are whole and score alike on every rank;
- an update whose micro-batch counts differ by rank makes as many policy forwards on every rank (lockstep),
  and so does the HF-generate fallback when one rank's completions all stop at once (synced decoding);
- the LR after the update equals the plain, one-process schedule's; the clip norm in force is the flag's;
- after `generation.sync_weights`, this rank's vLLM engine gives the trainer's log-probs on the same tokens.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import batching  # noqa: E402
import distributed  # noqa: E402
import generation  # noqa: E402
import reward  # noqa: E402
import train_grlo as tg  # noqa: E402


def report(out: dict) -> None:
    """One `CHECK {json}` line in a single write: the ranks share stdout, and a pipe keeps a write of up to
    4096 bytes whole (print() writes the text and the newline separately, and two ranks' lines interleaved)."""
    line = ("CHECK " + json.dumps(out) + "\n").encode()
    assert len(line) <= 4096, len(line)
    os.write(1, line)


def vllm_error(llm, model, accelerator, prompts, args):
    """Largest |vLLM log-prob - trainer log-prob| over the tokens vLLM samples for `prompts`."""
    ids, lps, _ = generation.generate_vllm(
        llm,
        prompts,
        list(range(len(prompts))),
        [],
        temperature=args.temperature,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
    )
    b = batching.collate(list(range(len(prompts))), prompts, ids, 0, accelerator.device)
    with torch.no_grad():
        hf, _ = batching.completion_logprobs(model, b, args.temperature)
    return max((hf[i, : len(ids[i])] - torch.tensor(lps[i])).abs().max().item() for i in range(len(prompts)))


def main(policy: str, rm_path: str):
    from transformers import AutoModelForCausalLM, get_scheduler

    args = tg.Args(model=policy, reward_model=rm_path, max_prompt_length=32, max_new_tokens=12, num_generations=2,
                   prompts_per_step=4, num_minibatches=2, token_budget=16, learning_rate=1e-2, lr_scheduler="linear",
                   warmup_steps=1, max_grad_norm=0.5, kl_coef=0.05, gradient_checkpointing=False, dtype="float32")  # fmt: skip
    acc = distributed.make_accelerator(use_bf16=False, max_grad_norm=args.max_grad_norm)
    rank = acc.process_index
    out = {"rank": rank, "backend": distributed.backend(acc)}

    # frozen models, loaded as main() loads them
    with distributed.replicated_loading():
        rm = reward.RewardModel(rm_path, device=str(acc.device), dtype=torch.float32, batch_size=4, max_length=64)
        ref = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    rows = [{"prompt": [{"role": "user", "content": "Say something."}], "reward_model": {"style": "model"}}] * 3
    out["rm_scores"] = reward.compute_rewards(rows, ["Something.", "No.", "A longer answer, with more words."], rm)[0]
    out["ref_abs_sum"] = sum(float(p.abs().sum()) for p in ref.parameters())
    out["ref_numel"] = sum(p.numel() for p in ref.parameters())

    # the policy, then one rollout batch whose lengths differ by rank: rank 0 fits 2 samples per 16-token
    # micro-batch, rank 1 only 1, so each pass makes 2 vs 4 micro-batches unless lockstep evens them
    model, optimizer, scheduler = tg.build_policy(args, acc, max_steps=3)
    # Policy forwards per phase. They must be equal across ranks: each is a collective under ZeRO-3/FSDP.
    # (gloo on CPU can pair an extra all-gather with the other rank's next one and carry on, so a missing
    # lockstep does not always hang here; on NCCL it does. The count is the invariant that cannot drift.)
    forwards = [0]
    acc.unwrap_model(model).register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    prompt_ids = [[5, 6, 7, 8]] * 4
    completion_ids = [[9 + k] * (3 if rank == 0 else 12) for k in range(4)]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], device=acc.device)
    samples = (prompt_ids, completion_ids, None, advantages, torch.ones(4, device=acc.device))
    sums, grad_norms = tg.train_on_batch(model, ref, optimizer, scheduler, acc, args, samples, pad_id=0, step=0)
    plain_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    plain = get_scheduler("linear", plain_opt, args.warmup_steps * 2, 3 * 2)  # what one process steps
    for _ in range(len(grad_norms)):
        plain_opt.step()
        plain.step()
    out["update_forwards"], forwards[0] = forwards[0], 0
    out["lr"], out["plain_lr"] = scheduler.get_last_lr()[0], plain.get_last_lr()[0]
    out["grad_norms"] = grad_norms
    out["clip_norm"] = distributed.clip_norm(model, acc, args.max_grad_norm)
    out["kl"] = float(sums["kl"])

    # HF fallback: rank 0's completions all stop after one token, rank 1's run to max_new_tokens
    model.eval()
    eos = list(range(1000)) if rank == 0 else []
    _, hf_ids, _, _ = tg.rollout(None, model, acc, args, prompt_ids, [0, 1], 0, eos, 0)
    out["hf_lengths"] = [len(c) for c in hf_ids]
    out["rollout_forwards"] = forwards[0]

    # weight sync: the engine starts from the checkpoint on disk; the trainer has moved since
    llm = generation.build_vllm(policy, torch.float32, args.seed + rank, 44, acc, 0.3, False)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    out["vllm_error_before_sync"] = vllm_error(llm, model, acc, prompts, args)
    generation.sync_weights(llm, model, acc)
    out["vllm_error_after_sync"] = vllm_error(llm, model, acc, prompts, args)
    llm.llm_engine.engine_core.shutdown()
    report(out)
    acc.end_training()


def fsdp_loading(rm_path: str):
    """Under torchrun with the variables `accelerate launch` exports for an FSDP config (accelerate cannot run
    FSDP on CPU, so this is the part that can be reproduced): reward-model scores loaded plainly and through
    `distributed.replicated_loading`. transformers zero-fills the plain load on local ranks other than 0."""
    import contextlib

    torch.distributed.init_process_group("gloo")
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    rows = [{"prompt": [{"role": "user", "content": "Say something."}], "reward_model": {"style": "model"}}] * 2
    out = {"rank": torch.distributed.get_rank()}
    for name, ctx in (("plain", contextlib.nullcontext), ("replicated", distributed.replicated_loading)):
        with ctx():
            rm = reward.RewardModel(rm_path, device="cpu", dtype=torch.float32, batch_size=2, max_length=64)
        out[name] = reward.compute_rewards(rows, ["Something.", "A longer answer, with more words."], rm)[0]
    out["env_restored"] = os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"]
    report(out)
    torch.distributed.destroy_process_group()


def every_rank():
    """distributed.every_rank with the flag true on rank 0 only, and true on both: must be False, then True."""
    acc = distributed.make_accelerator(False, 1.0)
    rank = acc.process_index
    report(
        {"rank": rank, "rank0_only": distributed.every_rank(rank == 0, acc), "both": distributed.every_rank(True, acc)}
    )
    acc.end_training()


def deepspeed_config():
    """The DeepSpeed config make_accelerator leaves for a bf16 run (the precision flag comes from the launch)."""
    acc = distributed.make_accelerator(True, 0.5)
    config = acc.state.deepspeed_plugin.deepspeed_config
    keys = ("data_types", "communication_data_type", "gradient_clipping", "train_micro_batch_size_per_gpu")
    out = {
        "rank": acc.process_index,
        "stage": acc.state.deepspeed_plugin.zero_stage,
        **{k: config.get(k) for k in keys},
    }
    layer = torch.nn.Linear(64, 64)
    model, _ = acc.prepare(layer, torch.optim.AdamW(layer.parameters()))
    out["engine_grad_accum_dtype"] = str(model.optimizer.gradient_accumulation_dtype)  # what the engine really uses
    report(out)


if __name__ == "__main__":
    if sys.argv[1] == "--deepspeed-config":
        deepspeed_config()
    elif sys.argv[1] == "--every-rank":
        every_rank()
    elif sys.argv[1] == "--fsdp-loading":
        fsdp_loading(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2])
