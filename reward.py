"""How GRLO judges a response: a reward model, math verification, or running the code.

Training and evaluation both import this module, so they score a response the same way.

1. Reward model (`RewardModel`): the Skywork-Reward-V2 convention. Render the conversation with the RM
   tokenizer's own chat template, take the logit at the last real token (an unbounded Bradley-Terry logit).
2. Math (`math_reward`): HuggingFace `math-verify`, `verify(parse(gold), parse(pred))`, gold first. Runs in
   killable worker processes, because some inputs hang sympy in C code that no signal can interrupt.
3. Code (`code_reward`): extract the last ```python block; `code_plan` maps the row's tests to a plan, and
   code_judge.py judges it: function-call tests in a judge process the program cannot reach, the program in
   another sandbox (sandbox.py: its own read-only filesystem, no network, no privileges, rlimits, a cgroup,
   a hard deadline), plain data between them; stdin/stdout tests compared here. `check_sandbox` stops a run at
   start-up when the sandbox cannot run its programs.
4. Routing (`compute_rewards`): per row by `reward_model.style` ("model" or "rule"), then by `ability`.
   This is our reading of the official release's "style_mix" reward manager, whose code is not public.

Known limits of the sandbox: see sandbox.py; of the judge: code_judge.py.

    .venv/bin/pytest tests/test_reward.py tests/test_judge.py -q    # unit, sandbox-attack and reward-hack tests
    .venv/bin/python bench/bench_reward.py      # samples/s, serial vs parallel
"""

import base64
import inspect
import io
import json
import logging
import os
import pickle
import re
import select
import subprocess
import sys
import textwrap
import threading
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import batching
import code_judge
import sandbox

logger = logging.getLogger(__name__)

MATH_TIMEOUT_S = 5.0  # hard wall-clock bound per math_reward call (parse + verify), enforced by SIGKILL
CODE_TIMEOUT_S = 10.0  # wall-clock bound per sandboxed process in compute_rewards
EOS_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


# ---- 0. rows: the official GRLO format that compute_rewards routes on ----
# The common Qwen evaluation phrasing for math; train_rlvr.py appends it to problems mapped from hub columns and
# evaluate.py to its math benchmarks.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def to_row(obj, where: str) -> dict:
    """Validate one record into the official format; `where` ("file:line") goes into every error."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj and isinstance(obj["prompt"], str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    elif "prompt" in obj:
        messages = obj["prompt"]
    elif "messages" in obj:  # chat datasets: keep the conversation up to the last user turn
        messages = list(obj["messages"])
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()
    else:
        raise ValueError(f"{where}: field 'prompt' is missing (expected a list of chat messages, or 'messages')")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty list of {{role, content}} messages")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: field 'prompt[{k}]' must be {{'role': str, 'content': str}}, got {m!r:.80}")
    rm = obj.get("reward_model") or {"style": "model", "ground_truth": ""}
    if not isinstance(rm, dict) or rm.get("style") not in ("model", "rule"):
        raise ValueError(f"{where}: field 'reward_model.style' must be 'model' or 'rule', got {rm!r:.80}")
    if rm["style"] == "rule" and rm.get("ground_truth") in (None, ""):
        raise ValueError(
            f"{where}: field 'reward_model.ground_truth' is empty, but style 'rule' is verified against it"
        )
    return {**obj, "prompt": messages, "reward_model": rm, "ability": obj.get("ability", "general")}


def to_rlvr_row(obj, where: str) -> dict:
    """train_rlvr.py's rows: official rows pass through `to_row`; hub rows with problem/question + answer/solution
    columns are mapped first (ability math, style rule, the boxed-answer instruction appended). GSM8K's "#### N" is
    cut."""
    if isinstance(obj, dict) and "prompt" not in obj and "messages" not in obj:
        question = next((obj[k] for k in ("problem", "question", "query") if isinstance(obj.get(k), str)), None)
        keys = ("answer", "final_answer", "ground_truth", "solution")
        answer = next((obj[k] for k in keys if obj.get(k) is not None), None)
        if question is None or answer is None:
            raise ValueError(
                f"{where}: need official fields, or a problem/question column and an answer/solution column; "
                f"got {sorted(obj)}"
            )
        obj = {
            "prompt": [{"role": "user", "content": f"{question}\n\n{MATH_INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(answer).split("####")[-1].strip()},
            "extra_info": {"source": where},
        }
    return to_row(obj, where)


def read_records(dataset: str, split: str = "train"):
    """Yield ("file:line", record) from a local .jsonl/.json/.parquet or a hub dataset, naming bad lines."""
    if os.path.exists(dataset) and dataset.endswith(".jsonl"):
        with open(dataset) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{dataset}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield f"{dataset}:{n}", obj
        return
    import datasets  # only needed for hub ids, .json and .parquet

    if os.path.exists(dataset):
        kind = "parquet" if dataset.endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=dataset, split="train")
    else:
        ds = datasets.load_dataset(dataset, split=split)
    for n, obj in enumerate(ds):
        yield f"{dataset}:row {n}", obj


def load_rows(dataset: str, split: str = "train", to_row=to_row) -> list:
    """Validated rows in the official GRLO format; `to_row(record, "file:line")` maps and checks each record."""
    return [to_row(obj, where) for where, obj in read_records(dataset, split)]


# ---- 1. reward model (the Skywork-Reward-V2 convention, as TRL and verl score it) ----
def pad_right(seqs: list, pad_id: int) -> tuple:
    """(input_ids, attention_mask), both (B, T) for B token-id lists: right padding, mask 1 on real tokens."""
    input_ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) scores of a sequence-classification model (num_labels=1), read at each row's last real token of a
    right-padded batch. We pool ourselves: pad_token_id may be missing or equal EOS, which would fool the model's
    own pooling. The head is linear, so pool-then-score equals the model's score at that position."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    last = attention_mask.sum(-1) - 1  # (B,)
    pooled = hidden[torch.arange(len(input_ids), device=hidden.device), last.to(hidden.device)]  # (B, H)
    return model.score(pooled)[:, 0]


class RewardModel:
    """A sequence-classification RM with num_labels=1. Each Accelerate rank scores its own samples."""

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        max_length: int = 4096,
        share_prefix: bool = False,
        dummy_weights: bool = False,
    ):
        import fit_check  # --dummy-weights: random weights from the folder's config.json

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{name_or_path}: the RM tokenizer has no chat template to render conversations")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = fit_check.from_pretrained(
            AutoModelForSequenceClassification, name_or_path, dummy_weights, num_labels=1, dtype=dtype
        )
        self.model.to(device).eval()
        if not hasattr(self.model, "score"):
            raise ValueError(f"{type(self.model).__name__}: expected a `score` head (Llama/Qwen/Mistral/Gemma RMs)")
        if share_prefix:
            batching.use_shared_prefix_attention(self.model, name_or_path)
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.share_prefix = share_prefix
        # Pads sit after the last real token (right padding) and are masked, so their id never matters.
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.eos_texts = tuple({t for t in (self.tokenizer.eos_token, *EOS_TEXTS) if t})
        self.last_num_truncated = 0  # conversations longer than max_length in the last score() call
        self.num_truncated = 0  # ... since construction

    def to(self, device: str) -> "RewardModel":
        """Move the RM (evaluate.py parks it in CPU memory between scorings on GPU)."""
        self.model.to(device)
        self.device = str(device)
        return self

    def _render(self, messages: list[dict], response: str) -> str:
        conversation = list(messages) + [{"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)

    def _ids(self, text: str) -> list[int]:
        # The rendered template already holds BOS if the RM wants one; a second BOS breaks Skywork scores.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, messages: list[dict], response: str) -> tuple[list[int], bool]:
        """Token ids of the conversation `messages` + `response` exactly as score() feeds them to the model, and
        whether --max-length cut it: EOS text at the response's end stripped (responses are decoded with special
        tokens), the RM tokenizer's chat template applied, a long response cut from the left. train_rm.py
        trains on these ids, so training and scoring see the same tokens."""
        while response.endswith(self.eos_texts):
            response = response[: -len(next(e for e in self.eos_texts if response.endswith(e)))]
        return self._encode(messages, response)

    def _encode(self, messages: list[dict], response: str) -> tuple[list[int], bool]:
        """Token ids of the conversation, and whether it had to be truncated to max_length."""
        ids = self._ids(self._render(messages, response))
        if len(ids) <= self.max_length:
            return ids, False
        # Too long: cut the response from the LEFT at the token level, so the prompt's start, the end of
        # the response and the closing template tokens (the pooled position) all survive.
        marker = "\u2063GRLO_RESPONSE\u2063"
        rendered = self._render(messages, marker)
        if rendered.count(marker) != 1:  # an exotic template that rewrites content: keep the end
            logger.warning("RM template hides the response; keeping the last %d tokens", self.max_length)
            return ids[-self.max_length :], True
        head, tail = (self._ids(part) for part in rendered.split(marker))
        body = self._ids(response)
        keep = min(len(body), max(self.max_length - len(head) - len(tail), self.max_length // 2))
        head = head[: max(self.max_length - len(tail) - keep, 0)]  # only if the prompt alone is huge
        return head + body[len(body) - keep :] + tail, True

    @torch.inference_mode()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """One scalar per (prompt messages, response text); unbounded logits, higher is better."""
        encoded = [self.encode(messages, response) for messages, response in zip(prompts, responses, strict=True)]
        self.last_num_truncated = sum(cut for _, cut in encoded)
        self.num_truncated += self.last_num_truncated
        if self.last_num_truncated:
            logger.warning(
                "RM: %d/%d conversations exceed max_length=%d; scored with the response's end",
                self.last_num_truncated,
                len(encoded),
                self.max_length,
            )
        backbone = getattr(self.model, self.model.base_model_prefix)
        if self.share_prefix:
            return self._score_shared(backbone, prompts, [ids for ids, _ in encoded])
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths, less padding
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            input_ids, attention_mask = pad_right([encoded[i][0] for i in batch], self.pad_id)  # (B, T) each
            values = last_token_scores(self.model, input_ids.to(self.device), attention_mask.to(self.device))
            for i, value in zip(batch, values.float().tolist()):
                scores[i] = value
        return scores

    def _score_shared(self, backbone, prompts: list, encoded: list) -> list[float]:
        """score() with share_prefix: consecutive samples with the same prompt (a GRPO group) go in one row,
        their common token prefix once, then each sample's remaining tokens in a slot of its own (the layout
        of batching.collate). As there, the positions of every suffix continue from the prefix's end and the
        mask lets a token see the prefix and the earlier tokens of its own suffix only, so each sample is pooled
        (at its last token) from exactly the hidden state its own row would give, for one forward of the shared
        prompt per group; batching.shared_prefix_attention skips the masked blocks."""
        groups = []  # lists of sample indices sharing a prompt
        for i in range(len(encoded)):
            if groups and prompts[i] == prompts[groups[-1][0]]:
                groups[-1].append(i)
            else:
                groups.append([i])
        rows = []  # (the group's common prefix, [(sample, its tokens after the prefix)])
        for g in groups:
            seqs = [encoded[i] for i in g]
            p = 0  # common prefix, leaving every suffix at least its last token
            while p < min(map(len, seqs)) - 1 and all(s[p] == seqs[0][p] for s in seqs):
                p += 1
            rows.append((seqs[0][:p], [(i, s[p:]) for i, s in zip(g, seqs)]))
        rows.sort(key=lambda r: (len(r[0]), max(len(s) for _, s in r[1])))  # similar shapes, less padding
        scores = [0.0] * len(encoded)
        start = 0
        while start < len(rows):  # at most batch_size samples per forward (one row may hold more)
            end, n = start + 1, len(rows[start][1])
            while end < len(rows) and n + len(rows[end][1]) <= self.batch_size:
                n, end = n + len(rows[end][1]), end + 1
            batch, start = rows[start:end], end
            # the layout of batching.collate: prefix left-padded to P columns, then S slots of C columns
            P, S = max(len(r[0]) for r in batch), max(len(r[1]) for r in batch)
            C = max(len(s) for r in batch for _, s in r[1])
            input_ids = torch.full((len(batch), P + S * C), self.pad_id, dtype=torch.long)
            seg = torch.full(input_ids.shape, -1)  # -1 padding, 0 prefix, k + 1 slot k
            pos = torch.zeros(input_ids.shape, dtype=torch.long)
            where = []  # (row, column of the sample's last token, sample)
            for b, (prefix, suffixes) in enumerate(batch):
                n = len(prefix)
                input_ids[b, P - n : P], seg[b, P - n : P], pos[b, P - n : P] = (
                    torch.tensor(prefix, dtype=torch.long),
                    0,
                    torch.arange(n),
                )
                for k, (i, suffix) in enumerate(suffixes):
                    c = P + k * C
                    input_ids[b, c : c + len(suffix)], seg[b, c : c + len(suffix)] = torch.tensor(suffix), k + 1
                    pos[b, c : c + len(suffix)] = torch.arange(n, n + len(suffix))
                    where.append((b, c + len(suffix) - 1, i))
            mask, pos = batching.shared_prefix_mask(seg).to(self.device), pos.to(self.device)
            out = backbone(
                input_ids=input_ids.to(self.device), attention_mask=mask, position_ids=pos, shared_prefix_slots=(S, C)
            )
            hidden = out.last_hidden_state
            pooled = hidden[[b for b, _, _ in where], [col for _, col, _ in where]]  # (n, H)
            for (_, _, i), value in zip(where, self.model.score(pooled)[:, 0].float().tolist()):
                scores[i] = value
        return scores


# ---- 2. math: math-verify in killable worker processes ----
def _math_worker_main() -> None:
    """Child loop: read `[gold, pred]` JSON lines, answer `[correct, status]` lines.

    Runs as `python -c <this function's source>`, so it must stay self-contained and import nothing
    heavy (no torch). math-verify's own timeouts use signal.alarm (main thread only, and useless inside
    C code), so they are off (None) here; the parent enforces the deadline by killing this process.
    Not sandboxed: math-verify evaluates model text only through ANTLR (LaTeX) or sympy's parse_expr on
    strings its regex limits to digits, operators and brackets.
    """
    import json, logging, os, resource, sys  # noqa: E401

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a sympy blow-up: MemoryError, not host OOM
    logging.disable(logging.WARNING)  # "timeout is disabled" warnings: we bound calls ourselves
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_config = [LatexExtractionConfig(), ExprExtractionConfig()]
    pred_config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    replies = os.fdopen(os.dup(1), "w")  # private reply channel; stray prints in libraries go to stderr
    os.dup2(2, 1)

    def check(gold_text, pred_text):
        gold = parse(gold_text, gold_config, parsing_timeout=None)
        if not gold:
            return False, "no_gold"
        pred = parse(pred_text, pred_config, parsing_timeout=None)
        if not pred:
            return False, "no_answer"
        return bool(verify(gold, pred, timeout_seconds=None)), "ok"

    check("\\boxed{1}", "\\boxed{1}")  # warm up lazy regexes and the ANTLR parser before saying ready
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        try:
            reply = check(*json.loads(line))
        except BaseException as e:  # math-verify's TimeoutException, RecursionError, MemoryError ...
            reply = (False, "error:" + type(e).__name__)
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


_math_idle: list[subprocess.Popen] = []  # idle workers; each busy one is owned by exactly one thread
_math_lock = threading.Lock()
_math_owner_pid = os.getpid()  # a forked child must not share its parent's worker pipes
MATH_FAILURES: Counter = Counter()  # cumulative: "timeout", "crash", "no_gold", "error:<exception>"


def _readable(pipe, timeout_s: float) -> bool:
    # poll, not select: select() fails on fds >= 1024, common in a trainer with vLLM and datasets open.
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _spawn_math_worker() -> subprocess.Popen:
    source = textwrap.dedent(inspect.getsource(_math_worker_main)) + "\n_math_worker_main()\n"
    worker = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if not _readable(worker.stdout, 120) or worker.stdout.readline() != "ready\n":
        _kill_worker(worker)
        raise RuntimeError("math-verify worker did not start (is math-verify[antlr4_13_2] installed?)")
    return worker


def _kill_worker(worker: subprocess.Popen) -> None:
    worker.kill()
    worker.communicate()  # reaps it and closes both pipes


def _math_check(gold_text: str, pred_text: str, timeout_s: float) -> tuple[bool, str]:
    """(correct, status) from a worker process, killed and replaced if it misses the deadline."""
    global _math_owner_pid
    with _math_lock:
        if _math_owner_pid != os.getpid():
            _math_idle.clear()
            _math_owner_pid = os.getpid()
        worker = _math_idle.pop() if _math_idle else None
    try:
        worker = worker or _spawn_math_worker()  # start-up time does not count against the deadline
        worker.stdin.write(json.dumps([gold_text, pred_text]) + "\n")
        worker.stdin.flush()
        if not _readable(worker.stdout, timeout_s):
            _kill_worker(worker)
            return False, "timeout"
        correct, status = json.loads(worker.stdout.readline())  # "" (worker died) raises ValueError
    except (OSError, ValueError, RuntimeError) as e:
        logger.warning("math-verify worker failed (%s: %s); scoring 0", type(e).__name__, e)
        if worker is not None:
            _kill_worker(worker)
        return False, "crash"
    with _math_lock:
        _math_idle.append(worker)
    return bool(correct), status


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces; None if absent or unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    depth, begin = 0, text.index("{", start)
    for j in range(begin, len(text)):
        depth += (text[j] == "{") - (text[j] == "}")
        if depth == 0:
            return text[begin + 1 : j]
    return None


# E-notation (3e8, 1.5E-3): math-verify reads a lowercase e as Euler's number (3e8 = 3*e*8), and an uppercase
# E as a float, which verify() compares to 6 decimals only (4E-8 "equals" 3\times10^{-8}). So both become LaTeX,
# {3 \times 10^{8}}, in gold and prediction alike; the braces keep 1/3e8 = 1/(3e8). Only a number glued to e/E
# and an integer changes: 2e, e^{x}, x2e3, 3e8x and 2e^{2} stay as they are. "2e-1" becomes 0.2, not 2e - 1.
_E_NOTATION = re.compile(r"(?<![\w.^])(\d+(?:\.\d+)?|\.\d+)[eE]\+?(-?\d+)(?![\w^]|\.\d)")


def _e_notation_to_latex(match: re.Match) -> str:
    # verify() takes numbers closer than ~1e-16 as equal (evalf's chop): in LaTeX, 1.6e-19 "equals" 3.2e-19 and
    # 6.6e-34. Below 1e-12 we leave the text to math-verify's own reading, so as not to widen that hole.
    if abs(float(match[0])) < 1e-12:
        return match[0]
    return "{" + match[1] + " \\times 10^{" + match[2] + "}}"


def _answer_text(text: str, *, gold: bool) -> str:
    """What math-verify should parse: the last \\boxed{}, else GSM8K's '#### N', else the raw text."""
    text = _E_NOTATION.sub(_e_notation_to_latex, text)
    # math-verify would merge ALL boxed answers into a set; the last one is the model's final answer.
    boxed = _last_boxed(text)
    if boxed is not None:
        return "\\boxed{" + boxed + "}"
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return "\\boxed{" + hashes[-1].strip() + "}"
    # A bare gold ("42", "[1,2)", "\{1,2\}", "1,000") parses reliably as LaTeX once boxed; a prediction
    # without a box falls back to math-verify's own final-answer extraction (LaTeX, then plain numbers).
    return "\\boxed{" + text.strip() + "}" if gold else text


def _math_score(response: str, ground_truth: str, timeout_s: float = MATH_TIMEOUT_S) -> tuple[float, str]:
    correct, status = _math_check(
        _answer_text(str(ground_truth), gold=True), _answer_text(response, gold=False), timeout_s
    )
    if status not in ("ok", "no_answer"):
        with _math_lock:
            MATH_FAILURES[status] += 1
    return float(correct), status


def math_reward(response: str, ground_truth: str, *, timeout_s: float = MATH_TIMEOUT_S) -> float:
    """1.0 if the response's final answer equals ground_truth (math-verify), else 0.0. Never raises or hangs;
    thread-safe. Timeouts and worker crashes are counted in MATH_FAILURES."""
    return _math_score(response, ground_truth, timeout_s)[0]


# ---- 3. the code sandbox: sandbox.py (standard library only, so it can be audited alone) ----
def check_sandbox(rows: list[dict]) -> None:
    """Start-up check for a run whose rows include code: the sandbox must run a program and import numpy (the
    MBPP+ harness does), else stop now with the reason, instead of scoring every program 0."""
    if any(_rule_kind(r) == "code" for r in rows if (r.get("reward_model") or {}).get("style") == "rule"):
        sandbox.self_check()


# ---- 4. code reward: extract the program, run the tests where it cannot reach them ----
# Function-call tests (HumanEval, MBPP, LiveCodeBench functional) run in code_judge's judge process, the program
# in another sandbox; stdin/stdout tests compare the program's output here. Every run ends in one of OUTCOMES
# (code_judge.outcome decides which; docs/reward.md "Outcomes").
OUTCOMES = code_judge.OUTCOMES
_STDIO_KEYS = ("inputs", "input_output", "public_test_cases", "private_test_cases")
# LiveCodeBench prepends imports to LeetCode-style ("functional") solutions, whose starter code uses List.
_FUNCTIONAL_PRELUDE = "from typing import *\nimport bisect, collections, functools, heapq, itertools, math, re\n"


def extract_code(response: str) -> str:
    """The last fenced ```python (or bare ```) block, else the whole text."""
    blocks = re.findall(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", response, re.DOTALL)
    code = [body for lang, body in blocks if lang.lower() in ("", "python", "py", "python3")]
    return code[-1] if code else response


def _json_field(value):
    """A hub field that may be JSON text, or LiveCodeBench's base64(zlib(pickle(json text))) encoding."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        pass

    class _StrOnly(pickle.Unpickler):  # the payload is a pickled str: refuse any object construction
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"refusing {module}.{name} in test data")

    raw = zlib.decompress(base64.b64decode(value.encode()))
    return json.loads(_StrOnly(io.BytesIO(raw)).load())


def code_plan(response: str, tests) -> tuple[str, dict]:
    """How the response's program is judged against hub-format `tests`: ("functions", keyword arguments of
    code_judge.judge_functions) or ("stdio", those of code_judge.judge_stdio). Malformed tests raise ValueError."""
    t = json.loads(tests) if isinstance(tests, str) else tests
    t = {"test_list": t} if isinstance(t, list) else dict(t)
    code = extract_code(response)
    if any(k in t for k in _STDIO_KEYS):
        # LiveCodeBench: JSON lists of {"input", "output", "testtype"}; APPS/TACO: {"inputs", "outputs"}.
        cases = [c for k in ("public_test_cases", "private_test_cases") for c in _json_field(t.get(k)) or []]
        apps = _json_field(t["input_output"]) if "input_output" in t else t
        if apps.get("fn_name"):
            raise ValueError("call-based `input_output` (fn_name) is not supported; give stdin/stdout cases")
        cases += [{"input": i, "output": o} for i, o in zip(apps.get("inputs", []), apps.get("outputs", []))]
        if not cases:
            raise ValueError("code tests have stdin/stdout keys but no cases")
        if not any(c.get("testtype") == "functional" for c in cases):
            return "stdio", {"code": code, "cases": [[c["input"], c["output"]] for c in cases]}
        # LeetCode-style: each input line is one JSON argument of Solution().<func_name>(...).
        fn = _json_field(t.get("metadata") or "{}").get("func_name")
        asserts = [
            f"_r = Solution().{fn}(*{[json.loads(a) for a in c['input'].splitlines()]!r})\n"
            f"assert (list(_r) if isinstance(_r, tuple) else _r) == {json.loads(c['output'])!r}"
            for c in cases
        ]
        return "functions", {"source": _FUNCTIONAL_PRELUDE + code, "tests": asserts, "setup": _FUNCTIONAL_PRELUDE,
                             "entry_point": "Solution"}  # fmt: skip
    if "entry_point" in t and "def check(" in str(t.get("test")):
        # HumanEval(+): the prompt holds the signature and the imports (typing.List ...) that models drop
        # when they answer with the whole function; with a body-only answer, the code continues the prompt.
        # The judge runs the prompt too, so its helpers (HumanEval/32's `poly`) stay the judge's own.
        prompt, entry = t.get("prompt", ""), t["entry_point"]
        defined = re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE)
        source = prompt + ("\n\n" if defined else "") + code
        return "functions", {"source": source, "tests": [t["test"] + f"\n\ncheck({entry})\n"], "setup": prompt,
                             "entry_point": entry}  # fmt: skip
    if "test_list" in t or "test" in t:
        # MBPP: asserts in `test_list` (+ `test_setup_code`); MBPP+: `test_imports` and the `test` script;
        # our bundled rows: {"entry_point", "test_list"}. The program gets the setup too, as in-process it had.
        setup = "\n".join(list(t.get("test_imports") or []) + [t.get("test_setup_code") or ""])
        units = list(t.get("test_list") or []) + ([t["test"]] if t.get("test") else [])
        if not units:
            raise ValueError("code tests have no test_list entries and no test script")
        return "functions", {"source": setup + "\n" + code, "tests": units, "setup": setup,
                             "entry_point": t.get("entry_point", "")}  # fmt: skip
    raise ValueError(f"unrecognised code tests: keys {sorted(t)}")


def _code_score(response: str, tests, all_or_nothing: bool = True, timeout_s: float = 10.0) -> tuple[float, str]:
    """(pass fraction, outcome) of the response's program against `tests`: code_plan, then code_judge. Nothing the
    program does makes this raise: a failure of the sandbox or of its clean-up is "sandbox_failure", logged."""
    kind, plan = code_plan(response, tests)
    run = code_judge.judge_functions if kind == "functions" else code_judge.judge_stdio
    try:
        return run(**plan, all_or_nothing=all_or_nothing, timeout_s=timeout_s)
    except Exception as e:  # never stop a training run over one program
        logger.exception("code reward: the sandbox failed")
        return 0.0, f"sandbox_failure: {type(e).__name__}: {str(e)[:200]}"


def code_reward(response: str, tests, *, all_or_nothing: bool = True, timeout_s: float = 10.0) -> float:
    """Run the response's last ```python block against `tests` (a hub row's dict or its JSON string).

    Default all_or_nothing=True: 1.0 only if every test passes, the pass@k notion of a correct program.
    all_or_nothing=False: the fraction of tests passed. timeout_s bounds each sandboxed process. The outcome
    behind the number: `code_outcome`, or `compute_rewards`' third return value."""
    fraction = _code_score(response, tests, all_or_nothing, timeout_s)[0]
    return fraction if not all_or_nothing else float(fraction == 1.0)


# ---- 5. routing: our reading of the official "style_mix" reward manager ----
_CODE_TEST_KEYS = ("test_list", "test", "entry_point", *_STDIO_KEYS)


def _rule_kind(row: dict) -> str:
    if row.get("ability") in ("math", "code"):
        return row["ability"]
    truth = row["reward_model"].get("ground_truth")
    if isinstance(truth, str) and truth.lstrip().startswith("{"):
        try:
            truth = json.loads(truth)
        except ValueError:
            pass
    return "code" if isinstance(truth, dict) and any(k in truth for k in _CODE_TEST_KEYS) else "math"


def _rule_reward(kind: str, response: str, truth) -> tuple[float, str]:
    if kind == "math":
        return _math_score(response, truth)
    fraction, outcome = _code_score(response, truth, timeout_s=CODE_TIMEOUT_S)
    return float(fraction == 1.0), outcome


def compute_rewards(
    rows: list[dict], responses: list[str], reward_model: "RewardModel | None" = None, *, max_workers: int | None = None
) -> tuple[list[float], dict[str, float], list[str]]:
    """Reward for each (row, response); rows[i] is the verl-format row of responses[i] (already repeated G times).

    reward_model.style "model": RewardModel.score on row["prompt"]. "rule": math or code by row["ability"],
    else by the ground truth's shape (a dict or JSON with test keys is code). Rule rewards of the whole batch
    run concurrently (threads around sandbox / math-worker subprocesses) while the RM scores.
    Returns (rewards, stats, outcomes): per-source means and failure counts for logging under rewards/, and
    each sample's outcome: "" for the reward model, math's status ("ok", "no_answer", "timeout", ...), code's
    "<outcome>: k/n passed[; first failure]" (OUTCOMES), which rollouts.jsonl and evaluate.py's samples keep."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    kinds = []
    for row in rows:  # validate everything before any work starts
        style = (row.get("reward_model") or {}).get("style")
        if style == "model":
            if reward_model is None:
                raise ValueError("a row has reward_model.style='model' but no RewardModel was given")
            kinds.append("model")
        elif style == "rule":
            kinds.append(_rule_kind(row))
        else:
            index = (row.get("extra_info") or {}).get("index")
            raise ValueError(f"unknown reward_model.style {style!r} (row extra_info.index={index})")
    rewards, statuses = [0.0] * len(rows), ["ok"] * len(rows)
    model_rows = [i for i, k in enumerate(kinds) if k == "model"]
    # Threads only wait on subprocesses; 32 caps the idle math workers that stay alive on a big node.
    with ThreadPoolExecutor(max_workers or min(32, os.cpu_count() or 1)) as pool:
        futures = {
            i: pool.submit(_rule_reward, k, responses[i], rows[i]["reward_model"].get("ground_truth"))
            for i, k in enumerate(kinds)
            if k != "model"
        }
        if model_rows:
            scores = reward_model.score([rows[i]["prompt"] for i in model_rows], [responses[i] for i in model_rows])
            for i, value in zip(model_rows, scores):
                rewards[i] = value
        for i, future in futures.items():
            rewards[i], statuses[i] = future.result()
    stats = {}
    for kind in ("model", "math", "code"):
        values = [r for r, k in zip(rewards, kinds) if k == kind]
        if values:
            stats[f"rewards/{kind}_mean"] = sum(values) / len(values)
    count = Counter(zip(kinds, statuses))
    if model_rows:
        stats["rewards/rm_truncated"] = float(reward_model.last_num_truncated)
    if "math" in kinds:  # failures: timeouts, crashed workers, unparsable gold; no_answer: nothing to parse
        stats["rewards/math_failures"] = float(
            sum(n for (k, s), n in count.items() if k == "math" and s not in ("ok", "no_answer"))
        )
        stats["rewards/math_no_answer"] = float(count["math", "no_answer"])
    if "code" in kinds:  # how the code samples ended: a policy drifting toward a failure mode shows here
        ends = Counter(s.split(":")[0] for k, s in zip(kinds, statuses) if k == "code")
        stats |= {f"rewards/code_{outcome}": float(ends[outcome]) for outcome in OUTCOMES}
    return rewards, stats, [s if k != "model" else "" for k, s in zip(kinds, statuses)]
