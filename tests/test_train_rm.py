"""train_rm.py: the Bradley-Terry loss, learning on a separable toy set, scoring agreement with reward.RewardModel,
exact resume after SIGKILL, bad rows named by file, line and field."""

import json
import math
import os
import random
import sys

import pytest
import torch
from conftest import ROOT, kill_when_exists, launch, run_script

import reward
import train_rm

PY = sys.executable


def toy_pairs(path, n: int, seed: int, preferred: str = "good", other: str = "bad") -> str:
    """n pairs whose chosen answer ends in `preferred` and whose rejected answer ends in `other`, after the same
    random filler words: separable by one token, so a tiny random model can learn it in a few steps."""
    rng = random.Random(seed)
    words = ["river", "stone", "cloud", "paper", "green", "seven", "light", "table", "music", "north"]
    with open(path, "w") as f:
        for _ in range(n):
            prompt = [{"role": "user", "content": " ".join(rng.choices(words, k=4)) + "?"}]
            filler = " ".join(rng.choices(words, k=3))
            f.write(json.dumps({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"{filler} {preferred}"}],
                "rejected": [{"role": "assistant", "content": f"{filler} {other}"}],
            }) + "\n")  # fmt: skip
    return str(path)


def rm_cmd(tiny_models, train, test, out, *extra) -> list:
    return [PY, "train_rm.py", "--preset", "cpu-smoke", "--model", tiny_models["policy"], "--dataset", train,
            "--eval-dataset", test, "--output-dir", str(out), *extra]  # fmt: skip


def test_bradley_terry_loss_and_accuracy_by_hand():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    want = [math.log(1 + math.exp(-d)) for d in (2.0, 0.0, -2.0)]  # -log sigmoid(d) = log(1 + e^-d)
    torch.testing.assert_close(train_rm.bradley_terry_loss(rc, rr, 0.0), torch.tensor(want))
    with_margin = [math.log(1 + math.exp(-(d - 0.5))) for d in (2.0, 0.0, -2.0)]
    torch.testing.assert_close(train_rm.bradley_terry_loss(rc, rr, 0.5), torch.tensor(with_margin))
    assert (rc > rr).float().mean().item() == pytest.approx(1 / 3)


def test_pair_layouts_and_bad_rows_name_file_line_and_field(tmp_path):
    ok = {"prompt": "Hi?", "chosen": "Hello.", "rejected": [{"role": "assistant", "content": "Go away."}]}
    assert train_rm.to_pair(ok, "f:1") == ([{"role": "user", "content": "Hi?"}], "Hello.", "Go away.")
    convo = {
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}],
    }
    assert train_rm.to_pair(convo, "f:1") == ([{"role": "user", "content": "Hi?"}], "Hello.", "No.")
    bad = [
        ({"prompt": "Hi?", "chosen": "A"}, "field 'rejected' is missing"),
        ({"prompt": "Hi?", "chosen": 3, "rejected": "B"}, "field 'chosen' must be a string or a message list"),
        ({**convo, "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B"}]},
         "fields 'chosen' and 'rejected' must share every turn but the last"),
        ({"prompt": [], "chosen": "A", "rejected": "B"}, "field 'prompt' must be a non-empty list"),
    ]  # fmt: skip
    for k, (obj, message) in enumerate(bad):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_text(json.dumps(ok) + "\n" + json.dumps(obj) + "\n")
        with pytest.raises(ValueError, match=f"{path}:2: {message}"):
            train_rm.load_pairs(str(path), "train", lambda m, r: ([1, 2], False))


def test_learns_a_separable_toy_set_and_scores_as_reward_model_does(tmp_path, tiny_models):
    """A few steps on a one-token-separable set reach >= 0.9 held-out accuracy whichever answer is preferred: the
    new head's random sign makes one of the two directions start near 0 (a head that only kept its initial sign
    would fail one of them). The saved folder then loads in reward.RewardModel (as train_grlo.py --reward-model
    does) and scores like the training forward."""
    for preferred, other in (("bad", "good"), ("good", "bad")):
        train = toy_pairs(tmp_path / f"train-{preferred}.jsonl", 96, 1, preferred, other)
        test = toy_pairs(tmp_path / f"test-{preferred}.jsonl", 32, 2, preferred, other)
        out = tmp_path / f"rm-{preferred}"
        proc = run_script(rm_cmd(tiny_models, train, test, out, "--max-steps", "12", "--eval-every", "12"))
        before = proc.stdout.split("eval before training | accuracy ", 1)[1].split()
        after = proc.stdout.rsplit("eval acc ", 1)[1].split()
        acc0, acc1, margin1 = float(before[0]), float(after[0]), float(after[2])
        assert acc1 >= 0.9 and margin1 > 1.0, (preferred, acc0, acc1, margin1)
    # the saved checkpoint through reward.RewardModel equals PairwiseRM's scores inside train_rm.py
    rm = reward.RewardModel(str(out / "checkpoint-12"), max_length=256)
    pairs, _ = train_rm.load_pairs(test, "test", rm.encode)
    model = train_rm.PairwiseRM(rm.model).eval()
    with torch.no_grad():
        rc, rr = train_rm.pair_scores(model, pairs, list(range(8)), rm.pad_id, "cpu")
    rows = [json.loads(line) for line in open(test)][:8]
    prompts = [r["prompt"] for r in rows]
    got_c = rm.score(prompts, [r["chosen"][-1]["content"] for r in rows])
    got_r = rm.score(prompts, [r["rejected"][-1]["content"] for r in rows])
    torch.testing.assert_close(torch.tensor(got_c), rc, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(got_r), rr, atol=1e-5, rtol=0)
    assert (rc > rr).float().mean() >= 0.875


def test_resume_after_hard_kill_gives_the_same_weights(tmp_path, tiny_models):
    from safetensors.torch import load_file

    train, test = toy_pairs(tmp_path / "train.jsonl", 64, 3), toy_pairs(tmp_path / "test.jsonl", 8, 4)
    common = ["--max-steps", "6", "--save-every", "3", "--keep-last", "5", "--eval-every", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_script(rm_cmd(tiny_models, train, test, full, *common))
    kill_when_exists(rm_cmd(tiny_models, train, test, part, *common), part / "checkpoint-3")
    assert (part / "checkpoint-3").exists() and not (part / "checkpoint-6").exists()
    run_script(rm_cmd(tiny_models, train, test, part, *common, "--resume"))
    wa = load_file(str(full / "checkpoint-6" / "model.safetensors"))
    wb = load_file(str(part / "checkpoint-6" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any("score" in k for k in wa)  # the head is saved under the names RewardModel loads


def test_two_processes_train_as_one_and_score_an_uneven_eval_set(tmp_path, tiny_models):
    """`accelerate launch` with 2 gloo ranks, under DDP and under DeepSpeed ZeRO-3 (the GPU command's config), gives
    one process's losses, held-out accuracy and saved weights. The budget holds one pair per forward, so the 3
    held-out pairs are 2 micro-batches on rank 0 and 1 on rank 1: before the fix, lockstep could not split rank 1's
    single pair and the launch died ("cannot split")."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, test = toy_pairs(tmp_path / "train.jsonl", 64, 5), toy_pairs(tmp_path / "test.jsonl", 3, 6)
    rm = reward.RewardModel(tiny_models["policy"], max_length=10**6)
    longest = max(len(seq) for f in (train, test) for pair in train_rm.load_pairs(f, "x", rm.encode)[0] for seq in pair)
    held_out = train_rm.load_pairs(test, "x", rm.encode)[0]
    assert len(train_rm.pair_microbatches(held_out, [0, 2], 2 * longest)) == 2  # rank 0's two pairs: two forwards
    common = ["--max-steps", "3", "--eval-every", "0", "--save-every", "3", "--max-length", str(longest),
              "--token-budget", str(2 * longest)]  # fmt: skip

    def events(run_dir):
        acc = EventAccumulator(str(run_dir))
        acc.Reload()
        return {k: [e.value for e in acc.Scalars(k)] for k in ("losses/loss", "eval/accuracy", "eval/margin")}

    one = tmp_path / "one"
    run_script(rm_cmd(tiny_models, train, test, one, *common))
    a, wa = events(one), load_file(str(one / "checkpoint-3" / "model.safetensors"))
    assert len(a["eval/accuracy"]) == 2  # before training and at the end
    for name, config in (("ddp", "ddp"), ("deepspeed-zero3", "deepspeed_zero3")):
        out = tmp_path / name
        proc = run_script([*launch(config), *rm_cmd(tiny_models, train, test, out, *common)[1:]], timeout=400)
        assert f"backend: {name}, 2 process(es)" in proc.stdout
        b, wb = events(out), load_file(str(out / "checkpoint-3" / "model.safetensors"))
        assert a["eval/accuracy"] == b["eval/accuracy"], name
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (name, key)
        assert wa.keys() == wb.keys(), name
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=lambda m: f"{name} {k}: {m}")


def test_help_and_docs_cover_every_flag():
    import dataclasses

    out = run_script([PY, "train_rm.py", "--help"]).stdout
    doc = open(os.path.join(ROOT, "docs", "train_rm.md")).read()
    for f in dataclasses.fields(train_rm.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out and f"`{flag}`" in doc, flag
