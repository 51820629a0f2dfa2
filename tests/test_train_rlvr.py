"""train_rlvr.py: data mapping, dynamic sampling, reward routing, a 2-process launch, and exact resume."""

import json
import os
import sys

import pytest
import torch
from conftest import LAUNCH_2, ROOT, kill_when_exists, launch, run_script

import reward
import train_rlvr as tr

PY = sys.executable
SMOKE = ["--preset", "cpu-smoke"]


def test_hub_columns_map_to_verifiable_rows():
    math500 = reward.to_rlvr_row({"problem": "What is $1+1$?", "answer": "2", "subject": "x"}, "hub:row 0")
    assert math500["reward_model"] == {"style": "rule", "ground_truth": "2"} and math500["ability"] == "math"
    assert math500["prompt"][0]["content"].endswith(reward.MATH_INSTRUCTION)
    gsm8k = reward.to_rlvr_row({"question": "Tom has 3 apples...", "answer": "3 + 4 = 7\n#### 7"}, "hub:row 1")
    assert gsm8k["reward_model"]["ground_truth"] == "7"
    dapo = {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Solve x"}], "ability": "MATH",
            "reward_model": {"style": "rule", "ground_truth": "34"}, "extra_info": {"index": "a"}}  # fmt: skip
    assert reward.to_rlvr_row(dict(dapo), "hub:row 2") == dapo  # official format passes through unchanged
    with pytest.raises(ValueError, match=r"hub:row 3: need official fields"):
        reward.to_rlvr_row({"text": "no question here"}, "hub:row 3")
    with pytest.raises(ValueError, match=r"f.jsonl:4: field 'reward_model.ground_truth' is empty"):
        reward.to_rlvr_row({**dapo, "reward_model": {"style": "rule", "ground_truth": ""}}, "f.jsonl:4")


def test_bundled_sets_load_with_ground_truth():
    for name in ("arith_train", "arith_test", "code_tasks"):
        rows = [reward.to_rlvr_row(o, w) for w, o in reward.read_records(os.path.join(ROOT, "data", f"{name}.jsonl"))]
        assert rows and all(r["reward_model"]["style"] == "rule" and r["reward_model"]["ground_truth"] for r in rows)


def test_has_signal_marks_groups_with_unequal_rewards():
    scores = torch.tensor([0.0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0.5])
    assert tr.has_signal(scores, 3).tolist() == [False, True, False, True]


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {k: [e.value for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}


def _groups_by_step(run_dir, G):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "rollouts.jsonl"))]
    out = {}
    for k in range(0, len(rows), G):
        group = rows[k : k + G]
        assert len({json.dumps(r["prompt"]) for r in group}) == 1  # G contiguous samples of one prompt
        out.setdefault(group[0]["step"], []).append([r["score"] for r in group])
    return out


def test_dynamic_sampling_refills_then_tops_up(tmp_path, tiny_models):
    # verifiable arithmetic on a random model: almost every group is all-zero, so rounds hit the cap and the
    # batch is topped up with dropped groups, signal groups first
    out = tmp_path / "arith"
    run_script([PY, "train_rlvr.py", *SMOKE, "--max-steps", "2", "--eval-every", "0", "--output-dir", str(out)])
    ev = _events(out)
    assert ev["charts/sampling_rounds"] == [3.0, 3.0]
    for step, groups in _groups_by_step(out, 4).items():
        assert len(groups) == 8
        signal = [max(g) > min(g) for g in groups]
        assert signal == sorted(signal, reverse=True)  # groups with signal come first
        assert ev["rewards/batch_signal_frac"][step] == sum(signal) / 8
    rows = [json.loads(line) for line in open(out / "rollouts.jsonl")]  # each verified sample says why (#22)
    assert all(r["outcome"] in ("ok", "no_answer") for r in rows) and {"ok", "no_answer"} & {r["outcome"] for r in rows}
    # open-ended prompts scored by the reward model: every group has signal, one round suffices, and the
    # reward model is loaded because rows ask for it
    out = tmp_path / "rm"
    run_script([PY, "train_rlvr.py", *SMOKE, "--max-steps", "2", "--eval-every", "0", "--dataset",
                os.path.join(ROOT, "data", "open_prompts.jsonl"), "--reward-model", tiny_models["reward"],
                "--output-dir", str(out)])  # fmt: skip
    ev = _events(out)
    assert ev["charts/sampling_rounds"] == [1.0, 1.0] and ev["rewards/batch_signal_frac"] == [1.0, 1.0]


def test_no_reward_model_is_loaded_for_rule_rows(tmp_path, tiny_models):
    # a reward-model path that does not exist: the run must not touch it, since every row is style "rule"
    out = tmp_path / "run"
    proc = run_script([PY, "train_rlvr.py", *SMOKE, "--max-steps", "1", "--reward-model", "/nonexistent/rm",
                       "--output-dir", str(out)])  # fmt: skip
    ev = _events(out)
    assert "eval/accuracy" in ev and "eval before training" in proc.stdout
    assert (out / "checkpoint-1" / "model.safetensors").exists()


def test_dynamic_sampling_stops_only_when_every_rank_has_enough():
    """accelerate's reduce knows mean/sum/max only and maps "min" to a sum: sampling stopped as soon as ANY rank
    had enough groups, and the others trained on zero-advantage padding (issue #25; seen failing)."""
    proc = run_script([*LAUNCH_2, "tests/distributed_check.py", "--every-rank"], timeout=300)
    reports = {r["rank"]: r for r in (json.loads(x[6:]) for x in proc.stdout.splitlines() if x.startswith("CHECK "))}
    assert set(reports) == {0, 1}
    assert [reports[r]["rank0_only"] for r in (0, 1)] == [False, False], reports
    assert [reports[r]["both"] for r in (0, 1)] == [True, True], reports


def test_two_process_launch(tmp_path, tiny_models):
    out = tmp_path / "run"
    proc = run_script([*LAUNCH_2, "train_rlvr.py", *SMOKE, "--max-steps", "2",
                       "--output-dir", str(out)])  # fmt: skip
    assert proc.stdout.count("step ") == 2
    ev = _events(out)
    assert len(ev["eval/accuracy"]) == 2  # before training and at the end, data-parallel over 2 ranks
    assert (out / "checkpoint-2" / "model.safetensors").exists()


def test_two_process_launch_under_deepspeed_zero3(tmp_path, tiny_models):
    """The stage's own main() (rewards by rule, dynamic sampling, held-out eval) on sharded weights."""
    out = tmp_path / "run"
    proc = run_script(
        [*launch("deepspeed_zero3"), "train_rlvr.py", *SMOKE, "--max-steps", "2", "--output-dir", str(out)], timeout=400
    )
    assert "backend: deepspeed-zero3, 2 process(es)" in proc.stdout and proc.stdout.count("step ") == 2
    assert len(_events(out)["eval/accuracy"]) == 2
    assert (out / "checkpoint-2" / "model.safetensors").exists()


def test_resume_after_hard_kill_reproduces_the_run(tmp_path, tiny_models):
    from safetensors.torch import load_file

    common = [
        PY,
        "train_rlvr.py",
        *SMOKE,
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--keep-last",
        "5",
        "--eval-every",
        "0",
    ]
    full = tmp_path / "full"
    run_script(common + ["--output-dir", str(full)])
    part = tmp_path / "part"
    kill_when_exists(common + ["--output-dir", str(part)], part / "checkpoint-2")
    assert (part / "checkpoint-2").exists() and not (part / "checkpoint-4").exists()
    saved = json.load(open(part / "checkpoint-2" / "trainer_state" / "step.json"))
    assert saved == {"step": 2, "data_round": 6}  # 3 rollout rounds per step: the cursor is not the step
    run_script(common + ["--output-dir", str(part), "--resume"])
    a = [json.loads(line) for line in open(full / "rollouts.jsonl")]
    b = [json.loads(line) for line in open(part / "rollouts.jsonl")]
    assert [(r["step"], r["completion"]) for r in a] == [(r["step"], r["completion"]) for r in b]
    wa, wb = (
        load_file(str(full / "checkpoint-4" / "model.safetensors")),
        load_file(str(part / "checkpoint-4" / "model.safetensors")),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_help_documents_every_flag():
    import dataclasses

    out = run_script([PY, "train_rlvr.py", "--help"]).stdout
    for f in dataclasses.fields(tr.Args):
        assert "--" + f.name.replace("_", "-") in out, f.name
