"""Deliberate copies between stage scripts stay identical to their source (Transformers' "Copied from").

A function preceded by `# Copied from train_grlo.<name>` must be byte-identical to train_grlo's `<name>`.
A copy that has to diverge drops the marker and takes a new name. `python tests/test_copies.py --fix`
rewrites every marked copy from its source (Transformers' `make fix-copies`)."""

import ast
import os
import re

import pytest
from conftest import ROOT

MARKER = re.compile(r"^# Copied from train_grlo\.(\w+)$")


def functions(path):
    """{name: source} of the top-level functions, and [(marked name, def name, line)] of the markers."""
    src = open(path).read()
    lines = src.splitlines()
    funcs, marks = {}, []
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])  # the marker sits above decorators
            funcs[node.name] = "\n".join(lines[first - 1 : node.end_lineno])
            above = lines[first - 2].strip() if first >= 2 else ""
            m = MARKER.match(above)
            if m:
                marks.append((m.group(1), node.name, node.lineno))
    return funcs, marks


@pytest.mark.parametrize("script", ["train_rlvr.py", "train_ppo.py", "train_rm.py", "evaluate.py"])
def test_marked_copies_are_identical(script):
    path = os.path.join(ROOT, script)
    if not os.path.exists(path):
        pytest.skip(f"{script} not present")
    source, _ = functions(os.path.join(ROOT, "train_grlo.py"))
    copies, marks = functions(path)
    if script == "train_rlvr.py":  # the lesson is copied, not imported: the rollout, advantages, the loss, the update
        lesson = {"rollout", "shape_rewards", "compute_advantages", "policy_loss", "token_weights", "train_on_batch"}
        assert lesson <= {name for _, name, _ in marks}, lesson - {name for _, name, _ in marks}
    for marked, name, line in marks:
        assert marked == name, f"{script}:{line}: marker names {marked} but the function is {name}"
        assert name in source, f"{script}:{line}: train_grlo has no {name}"
        assert copies[name] == source[name], f"{script}:{line}: {name} drifted from train_grlo.{name}"


def fix_copies(script: str) -> list:
    """Rewrite every marked copy in `script` from its source in train_grlo.py; returns the names rewritten."""
    path = os.path.join(ROOT, script)
    source, _ = functions(os.path.join(ROOT, "train_grlo.py"))
    copies, marks = functions(path)
    text, fixed = open(path).read(), []
    for marked, name, _ in marks:
        if marked == name and name in source and copies[name] != source[name]:
            text = text.replace(copies[name], source[name], 1)
            fixed.append(name)
    open(path, "w").write(text)
    return fixed


if __name__ == "__main__":  # `python tests/test_copies.py --fix`: rewrite marked copies from train_grlo.py
    import sys

    if "--fix" not in sys.argv:
        raise SystemExit("usage: python tests/test_copies.py --fix")
    for script in ("train_rlvr.py", "train_ppo.py", "train_rm.py", "evaluate.py"):
        print(script, "rewrote:", ", ".join(fix_copies(script)) or "nothing")
