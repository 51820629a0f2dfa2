"""--dummy-weights (fit_check.py): the shipped configs at tiny widths run every phase with random weights and no hub,
under one process and two gloo ranks (DDP, ZeRO-3); and the memory plan's formulas against a measured CPU run."""

import json
import os
import sys

import pytest
from conftest import launch, run_script

import fit_check

PY = sys.executable
# the shipped Qwen3 configs kept as they are (head_dim 128, GQA, tied embeddings) but a few layers and narrow
TINY = "num_hidden_layers=2,hidden_size=256,intermediate_size=512,num_attention_heads=4,num_key_value_heads=2,vocab_size=4096"
ABLATION = ["--model", "Qwen/Qwen3-1.7B-Base", "--reward-model", "Skywork/Skywork-Reward-V2-Qwen3-0.6B"]
PHASES = ["setup", "rollout", "reward", "train", "weight_sync", "checkpoint"]
PPO_PHASES = ["setup", "rollout", "reward", "values", "train", "weight_sync", "checkpoint"]  # + the value pass


def offline(tmp_path) -> dict:
    """No hub: offline mode (any hub call raises) and an empty HF_HOME that must stay empty."""
    home = tmp_path / "hf_home"
    home.mkdir()
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1"}


def check_run(
    out, stdout: str, env: dict, processes: int, backend: str, phases=PHASES, unplanned=("setup", "checkpoint")
):
    report = json.loads((out / "fit_check.json").read_text())
    assert [row["phase"] for row in report["phases"]] == phases
    assert report["backend"] == backend and report["processes"] == processes and report["sampler"] == "vLLM"
    for row in report["phases"]:  # printed, measured, and planned where the plan has a row
        assert f"\n{row['phase']:<12}" in stdout and row["peak_gib"] > 0.3 and row["seconds"] > 0
        assert row["fits_by_measurement"] and (row["plan_gib"] is None) == (row["phase"] in unplanned)
    assert stdout.count("fit check |") == 1 and "completion tokens/s" in stdout and "TFLOP/s a device" in stdout
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts and all(r["finish_reason"] == "length" for r in rollouts)  # no stop id: the worst case
    assert not os.listdir(env["HF_HOME"])  # nothing downloaded, nothing cached


def test_dummy_weights_one_process_every_phase_no_hub(tmp_path):
    env, out = offline(tmp_path), tmp_path / "run"
    proc = run_script([PY, "train_grlo.py", "--preset", "cpu-smoke", *ABLATION, "--dummy-weights", "--dummy-overrides",
                       TINY, "--max-new-tokens", "24", "--output-dir", str(out)], env=env, timeout=300)  # fmt: skip
    assert "dummy weights: --model Qwen/Qwen3-1.7B-Base: 0.00" in proc.stdout  # the shipped config, narrowed
    assert proc.stdout.count("step ") == 2
    check_run(out, proc.stdout, env, 1, "single")
    report = json.loads((out / "fit_check.json").read_text())
    assert report["policy"]["q_dim"] == 4 * 128 and report["policy"]["tied"]  # shipped head_dim, tied embedding
    assert report["reward_model"]["kv_dim"] == 2 * 128


def test_dummy_weights_rlvr_with_the_shipped_8b_reward_config(tmp_path):
    """train_rlvr.py: rule rows need no reward model; the shipped 8B config only sets the folder it would use."""
    env, out = offline(tmp_path), tmp_path / "run"
    proc = run_script([PY, "train_rlvr.py", "--preset", "cpu-smoke", "--dummy-weights", "--output-dir", str(out)],
                      env=env, timeout=300)  # fmt: skip
    assert "--reward-model Skywork/Skywork-Reward-V2-Llama-3.1-8B: 7.505 B random parameters" in proc.stdout
    assert "rounds 1" in proc.stdout  # one sampling round a step
    check_run(out, proc.stdout, env, 1, "single")


@pytest.mark.parametrize("config", ["ddp", "deepspeed_zero3"])
def test_dummy_weights_on_two_ranks(config, tmp_path):
    env, out = offline(tmp_path), tmp_path / "run"
    proc = run_script([*launch(config), "train_grlo.py", "--preset", "cpu-smoke", *ABLATION, "--dummy-weights",
                       "--dummy-overrides", TINY, "--max-new-tokens", "16", "--output-dir", str(out)], env=env,
                      timeout=400)  # fmt: skip
    check_run(out, proc.stdout, env, 2, {"ddp": "ddp", "deepspeed_zero3": "deepspeed-zero3"}[config])


def test_unknown_model_without_a_config_fails_in_seconds(tmp_path):
    proc = run_script([PY, "train_grlo.py", "--preset", "cpu-smoke", "--model", "org/not-shipped", "--dummy-weights",
                       "--output-dir", str(tmp_path / "x")], env=offline(tmp_path), check=False, timeout=60)  # fmt: skip
    assert (
        proc.returncode != 0
        and "--model org/not-shipped: --dummy-weights needs a folder with a config.json" in proc.stderr
    )


def test_plan_formulas_by_hand():
    """The plan's arithmetic on round numbers: 1,000 parameters, 4 ranks."""
    policy = dict(
        params=1000, largest=100, hidden=10, layers=2, intermediate=40, q_dim=20, kv_dim=10, vocab=50, tied=True
    )
    rm = dict(params=3000)
    common = dict(world=4, bf16=True, tokens=8, gradient_checkpointing=True, ref=False, vllm_gib=0.0, sleep=True,
                  overhead_gib=0.0)  # fmt: skip
    z3 = fit_check.plan(policy, rm, backend="deepspeed-zero3", **common)["resident"]
    G = 2**30
    assert z3["weights"] * G == 2 * 1000 / 4 and z3["master"] * G == 4 * 1000 / 4 and z3["adam"] * G == 8 * 1000 / 4
    assert z3["grads"] * G == 4 * 1000 / 4 and z3["reward_model"] * G == 2 * 3000
    assert z3["gathered"] * G == (2 * (1000 - 50 * 10) / 2 + 100) * 2  # two layers and the embedding, bf16
    single = fit_check.plan(policy, rm, backend="single", **common)
    assert single["resident"]["weights"] * G == 4000 and "grads" not in single["resident"]  # freed between steps
    update = single["update"]
    assert update["grads"] * G == 4000 and update["logits_and_grad"] * G == 2 * 8 * 50 * 2
    assert update["layer_inputs"] * G == 8 * 10 * 2 * 4  # fp32 residual under single-process autocast
    assert update["one_layer_recomputed"] * G == 8 * (5 * 10 + 4 * 20 + 5 * 10 + 4 * 40) * 2
    assert update["lm_head_grad"] * G == 50 * 10 * 2
    ddp = fit_check.plan(policy, rm, backend="ddp", **{**common, "sleep": False, "vllm_gib": 1.0})
    assert ddp["resident"]["ddp_buckets"] * G == 4000
    u = dict(ddp["update"])
    mid = sum(u.values()) - u["tied_embedding_grad"]  # at the LM head: activations, logits, one V x h gradient
    end = u["grads"] + u["lm_head_grad"] + u["tied_embedding_grad"]  # end of backward: two V x h gradients
    assert u["tied_embedding_grad"] * G == 50 * 10 * 2 and mid > end
    assert ddp["phases"]["train"] == pytest.approx(1.0 + sum(ddp["resident"].values()) + max(mid, end))
    wide = dict(policy, hidden=1000, params=100_000)  # a wide embedding, a short micro-batch: the end is the peak
    w = fit_check.plan(wide, rm, backend="single", **{**common, "tokens": 1})
    end = w["update"]["grads"] + w["update"]["lm_head_grad"] + w["update"]["tied_embedding_grad"]
    assert w["phases"]["train"] == pytest.approx(sum(w["resident"].values()) + end)


def test_plan_with_a_critic_by_hand():
    """train_ppo.py's critic: its state follows the backend, its layer inputs join the update, no vocabulary logits,
    one recomputed layer at a time; an offloaded reward model counts only while it scores."""
    policy = dict(
        params=1000, largest=100, hidden=10, layers=2, intermediate=40, q_dim=20, kv_dim=10, vocab=50, tied=True
    )
    critic = dict(policy, params=960, tied=False)
    common = dict(world=4, bf16=True, tokens=8, gradient_checkpointing=True, ref=False, vllm_gib=1.0, sleep=True,
                  overhead_gib=0.0)  # fmt: skip
    G = 2**30
    alone = fit_check.plan(policy, dict(params=3000), backend="deepspeed-zero3", **common)
    both = fit_check.plan(policy, dict(params=3000), backend="deepspeed-zero3", critic=critic, **common)
    assert both["resident"]["critic_adam"] * G == 8 * 960 / 4 and both["resident"]["critic_weights"] * G == 2 * 960 / 4
    assert both["update"]["critic_layer_inputs"] == both["update"]["layer_inputs"]
    assert both["update"]["critic_one_layer_recomputed"] == 0  # same layer size: one recompute at a time
    assert not any(k.startswith("critic_logits") or k.startswith("critic_lm_head") for k in both["update"])
    critic_state = sum(v for k, v in both["resident"].items() if k.startswith("critic_"))
    assert both["phases"]["rollout"] == pytest.approx(alone["phases"]["rollout"] + critic_state)
    assert both["phases"]["train"] == pytest.approx(
        alone["phases"]["train"] + critic_state + both["update"]["critic_layer_inputs"]
    )
    off = fit_check.plan(policy, dict(params=3000), backend="deepspeed-zero3", rm_offloaded=True, **common)
    assert off["phases"]["rollout"] * G == pytest.approx(alone["phases"]["rollout"] * G - 2 * 3000)
    assert off["phases"]["reward"] == pytest.approx(alone["phases"]["reward"])


@pytest.mark.parametrize("script", ["train_grlo.py", "train_ppo.py"])
def test_measured_cpu_peaks_match_the_plan(script, tmp_path):
    """The plan against a measurement, at widths where the model's memory dominates: the shipped 1.7B config with
    one layer, its width and a 32K vocabulary (~0.1 B parameters: 1.8 GiB of weights, gradients and AdamW, 0.5 GiB
    of logits; train_ppo.py's critic as much again, less the logits). Each phase's peak RSS within 10% of the plan
    (on CPU the plan's fixed overhead is the RSS after set-up less the weights it holds; all that grows after it is
    the formulas'). train_ppo.py: the critic (the policy's config, a scalar head) joins the plan; the value pass is
    measured, not planned."""
    env, out = offline(tmp_path), tmp_path / "run"
    overrides = "num_hidden_layers=1,vocab_size=32768"
    proc = run_script([PY, script, "--preset", "cpu-smoke", *ABLATION, "--dummy-weights", "--dummy-overrides",
                       overrides, "--max-new-tokens", "48", "--max-prompt-length", "256", "--token-budget", "1024",
                       "--output-dir", str(out)], env=env, timeout=400)  # fmt: skip
    report = json.loads((out / "fit_check.json").read_text())
    if script == "train_ppo.py":
        check_run(out, proc.stdout, env, 1, "single", PPO_PHASES, ("setup", "values", "checkpoint"))
        policy, critic, G = report["policy"], report["critic"], 2**30
        # the policy's weights with a tied LM head, the critic's with a scalar head (hidden weights + a bias at most)
        assert 0 < critic["params"] - policy["params"] <= policy["hidden"] + 1 and not critic["tied"]
        state = report["plan"]["resident"]
        assert state["critic_weights"] * G == 4 * critic["params"] and state["critic_adam"] * G == 8 * critic["params"]
        assert report["plan"]["update"]["critic_all_layers"] > 0  # no checkpointing on CPU: every layer's
    rows = {r["phase"]: r for r in report["phases"]}
    for phase in ("rollout", "reward", "train", "weight_sync"):
        assert rows[phase]["peak_gib"] == pytest.approx(rows[phase]["plan_gib"], rel=0.10), (phase, rows[phase])
    # the update's growth over the rollout (gradients, AdamW's first step excluded, activations, logits) as planned
    grown = rows["train"]["peak_gib"] - rows["rollout"]["peak_gib"]
    planned = rows["train"]["plan_gib"] - rows["rollout"]["plan_gib"]
    assert grown == pytest.approx(planned, rel=0.15), (grown, planned)
