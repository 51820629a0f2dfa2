"""The commands in README.md and docs/*.md reproduce as pasted, in order, on a fresh clone: every local path a
command reads (a model, a reward model, a checkpoint) is one an earlier command writes, and no two commands write
the same output directory (a second run there would be refused, or before #25 would have mixed with the first;
a command shown twice, as in the README's block and its results table, is one run).
Each command's arguments are resolved by the script's own CLI (presets included), not guessed."""

import fnmatch
import glob
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bookkeeping  # noqa: E402
import evaluate  # noqa: E402
import train_grlo  # noqa: E402
import train_ppo  # noqa: E402
import train_rlvr  # noqa: E402
import train_rm  # noqa: E402

STAGES = {"train_grlo.py": train_grlo, "train_rlvr.py": train_rlvr, "train_rm.py": train_rm, "evaluate.py": evaluate,
          "train_ppo.py": train_ppo}  # fmt: skip
LOCAL = ("runs/", "local_models/")  # what a command may need an earlier one to have made (hub ids and data/ are not)


def commands(path: str) -> list[str]:
    """Commands in order: lines of ```bash blocks (continuations joined, comments and prompts dropped, `&&`
    split) and `python ...` commands in backticks outside them (the README's results table)."""
    text, out = open(path).read(), []
    for part, block in zip(re.split(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S), [False, True] * 10_000):
        if block:
            for line in part.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                out += [c.strip() for c in line.split("&&") if c.strip()]
        else:
            out += re.findall(r"`((?:python|accelerate launch) [^`]+)`", part)
    expanded = []
    for c in out:  # `bash quickstart.sh` is the Python commands it runs
        if c.startswith("bash quickstart.sh"):
            lines = [x.strip() for x in open(os.path.join(ROOT, "quickstart.sh"))]
            expanded += [x.replace(".venv/bin/python ", "python ", 1) for x in lines
                         if re.match(r"\.venv/bin/python \w+\.py", x)]  # fmt: skip
        else:
            expanded.append(c)
    return [c for c in expanded if re.match(r"(python|accelerate launch) ", c)]


def script_and_argv(command: str) -> tuple[str, list]:
    words = shlex.split(command)
    i = next((k for k, w in enumerate(words) if w.endswith(".py")), None)
    return (words[i], words[i + 1 :]) if i is not None else ("", [])


def rel(path: str) -> str:
    path = os.path.normpath(path)
    return os.path.relpath(path, ROOT) if os.path.isabs(path) else path


def effects(command: str) -> tuple[set, set, str]:
    """(local paths read, local paths written, the output directory of a run) of one command."""
    script, argv = script_and_argv(command)
    if script == "local_models.py":
        which = argv[argv.index("--which") + 1] if "--which" in argv else "all"
        names = {"tiny": ["tiny-qwen3", "tiny-qwen3-rm"], "smollm2": ["smollm2-135m", "smollm2-135m-rm"]}
        made = [n for k, v in names.items() if which in ("all", k) for n in v]
        return set(), {f"local_models/{n}" for n in made}, ""
    if script not in STAGES or "--help" in argv:
        return set(), set(), ""
    module = STAGES[script]
    args = bookkeeping.cli(module.Args, module.PRESETS, "", argv)
    if script == "evaluate.py":
        reads = {*args.model, args.reward_model, args.baseline_model or ""}
        return {rel(p) for p in reads if rel(p).startswith(LOCAL)}, {rel(args.output_dir)}, rel(args.output_dir)
    reads = {args.model, getattr(args, "reward_model", ""), getattr(args, "critic_model", None) or ""}
    out = rel(args.output_dir)
    saved = sorted({s for s in range(1, args.max_steps + 1) if args.save_every and s % args.save_every == 0}
                   | {args.max_steps})  # fmt: skip
    writes = {out, *(f"{out}/checkpoint-{s}" for s in saved[-args.keep_last :])}
    if args.max_steps == 0:  # the step count follows from the data: any checkpoint number
        writes = {out, f"{out}/checkpoint-*"}
    writes |= {f"{out}/final"} if script == "train_rm.py" else set()
    return {rel(p) for p in reads if rel(p).startswith(LOCAL)}, writes, out


def check(path: str, made: set) -> list:
    """Problems of the page's commands in order, given the paths `made` before it (updated in place). evaluate.py
    may share an output folder: it is a results table each evaluation adds to, keyed by model and config."""
    problems, runs = [], {}
    for command in commands(path):
        reads, writes, out = effects(command)
        for p in sorted(reads):
            if not any(fnmatch.fnmatch(p, m) for m in made):
                problems.append(f"{os.path.basename(path)}: `{command}` reads {p}, which no earlier command writes")
        if script_and_argv(command)[0] == "evaluate.py":
            out = ""
        if out and out in runs and runs[out] != command and "--resume" not in command:  # the same text: the same run
            problems.append(f"{os.path.basename(path)}: `{command}` writes {out} again (first: `{runs[out]}`)")
        runs.setdefault(out, command)
        made |= writes
    return problems


def test_the_readme_commands_reproduce_in_order():
    assert len(commands(os.path.join(ROOT, "README.md"))) >= 10
    assert check(os.path.join(ROOT, "README.md"), set()) == []


@pytest.mark.parametrize("page", sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))), ids=os.path.basename)
def test_each_docs_page_reproduces_after_the_readme(page):
    made = set()
    check(os.path.join(ROOT, "README.md"), made)  # a page is read after the README's Quick start and results
    assert check(page, made) == []


def test_the_check_catches_the_two_seeds_in_one_folder(tmp_path):
    """The README before #25: two seeds into the preset's one folder, and an evaluation of a folder neither wrote."""
    page = tmp_path / "page.md"
    page.write_text("```bash\npython local_models.py\npython train_rlvr.py --preset cpu-arith --seed 1\n"
                    "python train_rlvr.py --preset cpu-arith --seed 2\n"
                    "python evaluate.py --preset cpu --model runs/rlvr-arith-seed1/checkpoint-20\n```\n")  # fmt: skip
    problems = check(str(page), set())
    assert len(problems) == 2 and "writes runs/rlvr-cpu-arith again" in problems[0]
    assert "reads runs/rlvr-arith-seed1/checkpoint-20" in problems[1]


def test_the_check_reads_train_ppo_commands(tmp_path):
    """train_ppo.py's commands are resolved too: its RM preset reads train_rm.py's model, and two runs of one preset
    write one folder."""
    page = tmp_path / "page.md"
    page.write_text("```bash\npython train_ppo.py --preset cpu-arith-rm\npython train_ppo.py --preset cpu-arith\n"
                    "python train_ppo.py --preset cpu-arith --seed 2\n```\n")  # fmt: skip
    problems = check(str(page), {"local_models/*"})
    assert len(problems) == 2 and "reads runs/rm-cpu-arith/final" in problems[0]
    assert "writes runs/ppo-cpu-arith again" in problems[1]
