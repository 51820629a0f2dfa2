"""Preference pairs for train_rm.py's CPU experiment, labelled by the verifier, not by people.

SmolLM2-135M-Instruct answers each prompt of `arith_rm.jsonl` (a split that shares no prompt with
`arith_train.jsonl`, the RL prompts, or `arith_test.jsonl`, the held-out set) G times with vLLM, rendered
with its chat template exactly as the RL stages render prompts. `reward.math_reward` labels each answer
correct (1) or not (0). A prompt with both kinds gives up to `--pairs-per-prompt` (correct, incorrect) pairs.
Every tenth prompt's pairs go to the test file, the rest to the train file, in train_rm.py's layout:

    {"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...], "extra_info": {...}}

Deterministic for a given machine and vLLM build (seeded requests); the counts it prints go in data/README.md.

    python local_models.py && python data/make_preferences.py
"""

import json
import os
import random
import sys
import types
from dataclasses import dataclass

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import torch
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import generation  # noqa: E402

import local_models  # noqa: E402
import reward  # noqa: E402
import train_grlo  # noqa: E402


@dataclass
class Args:
    prompts: str = os.path.join(HERE, "arith_rm.jsonl")
    """prompts with ground truth (official format), disjoint from the RL and held-out splits"""
    num_generations: int = 4
    """answers sampled per prompt"""
    temperature: float = 0.7
    """sampling temperature (the cpu-arith RL preset's)"""
    max_new_tokens: int = 128
    """max tokens per answer (the cpu-arith RL preset's)"""
    pairs_per_prompt: int = 2
    """at most this many (correct, incorrect) pairs per prompt, each answer used once"""
    seed: int = 1
    """seed of the sampling requests and of the pairing"""
    out_prefix: str = os.path.join(HERE, "arith_prefs")
    """writes <prefix>_train.jsonl and <prefix>_test.jsonl"""


def main(args: Args):
    from transformers import AutoTokenizer

    policy = local_models.build_smollm2(local_models.DEFAULT_DIR)["policy"]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    rows, prompt_ids, dropped = train_grlo.tokenize_prompts(reward.load_rows(args.prompts), tokenizer, 10**6)
    G = args.num_generations
    cpu = types.SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)  # one CPU process
    llm = generation.build_vllm(policy, torch.float32, args.seed, 1024, cpu, 0.3, False)
    seeds = [train_grlo.request_seed(args.seed, 0, i, j) for i in range(len(rows)) for j in range(G)]
    requests = [p for p in prompt_ids for _ in range(G)]
    eos = generation.eos_token_ids(tokenizer, policy)
    ids, _, _ = generation.generate_vllm(
        llm,
        requests,
        seeds,
        eos,
        temperature=args.temperature,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        show_progress=True,
    )
    llm.llm_engine.engine_core.shutdown()
    answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rng = random.Random(args.seed)
    out = {"train": [], "test": []}
    n_correct, n_mixed = 0, 0
    for i, row in enumerate(rows):
        group = answers[i * G : (i + 1) * G]
        truth = row["reward_model"]["ground_truth"]
        scores = [reward.math_reward(a, truth) for a in group]
        n_correct += sum(scores)
        good = [a for a, s in zip(group, scores) if s == 1.0]
        bad = [a for a, s in zip(group, scores) if s != 1.0]
        if not good or not bad:
            continue
        n_mixed += 1
        rng.shuffle(good), rng.shuffle(bad)
        for k, (chosen, rejected) in enumerate(list(zip(good, bad))[: args.pairs_per_prompt]):
            out["test" if i % 10 == 0 else "train"].append(
                {
                    "prompt": row["prompt"],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "extra_info": {"source": "grlo/arith_rm", "index": i, "pair": k, "ground_truth": truth},
                }
            )
    for split, pairs in out.items():
        path = f"{args.out_prefix}_{split}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for p in pairs:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        print(f"wrote {len(pairs):5d} pairs to {path}")
    print(
        f"{len(rows)} prompts x {G} answers: {n_correct:.0f} correct ({n_correct / (len(rows) * G):.1%}), "
        f"{n_mixed} prompts with both kinds"
    )


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
