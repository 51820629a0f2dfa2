"""train_ppo.py: GAE, whitening and the value-loss clip against hand computations; the critic learns a fixed
reward; PPO's policy loss is GRPO's with a constant baseline; end to end, resume after SIGKILL (critic included),
and 2 processes (DDP, DeepSpeed ZeRO-2 and ZeRO-3) equal to one."""

import dataclasses
import json
import os
import sys

import pytest
import torch
from conftest import ROOT, kill_when_exists, launch, run_script

import batching
import train_grlo as tg
import train_ppo as tp

PY = sys.executable
SMOKE = ["--preset", "cpu-smoke"]


class OneProcess:
    """What the PPO functions use of an Accelerator, for one process (reduce is the identity)."""

    num_processes, process_index, is_main_process, device = 1, 0, True, torch.device("cpu")

    @staticmethod
    def reduce(x, op):
        return x


def hand_gae(rewards: list, values: list, gamma: float, lam: float):
    """A_t = sum_k (gamma lam)^k delta_t+k over one completion, delta_t = r_t + gamma V_t+1 - V_t, V after the end 0."""
    T = len(rewards)
    v = values + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(T)]
    adv = [sum((gamma * lam) ** k * deltas[t + k] for k in range(T - t)) for t in range(T)]
    return adv, [a + values[t] for t, a in enumerate(adv)]


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.9, 0.9), (1.0, 0.9), (0.9, 1.0)])
def test_gae_and_returns_by_hand(gamma, lam):
    lengths = [4, 2, 3]
    rewards = [[0.0, 0.0, 0.0, 1.5], [0.0, -2.0], [0.3, 0.0, 0.7]]
    values = [[0.5, -0.2, 0.1, 0.9], [1.0, 0.4], [0.2, 0.25, -0.6]]
    pad = lambda rows: batching.pad_values(rows, range(3), 4, "cpu")  # noqa: E731  zero after each completion
    adv, ret = tp.compute_gae(pad(rewards), pad(values), gamma, lam)
    for i, n in enumerate(lengths):
        want_adv, want_ret = hand_gae(rewards[i], values[i], gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(want_adv, abs=1e-6)
        assert ret[i, :n].tolist() == pytest.approx(want_ret, abs=1e-6)
        assert adv[i, n:].abs().sum() == 0  # nothing leaks past a completion's end


def test_reward_sits_on_the_last_token_and_gamma_lam_one_gives_r_minus_v():
    completion_ids = [[5, 6, 7], [8], [9, 10]]
    r = tp.token_rewards(torch.tensor([2.0, -1.0, 0.5]), completion_ids, 3)
    assert r.tolist() == [[0, 0, 2.0], [-1.0, 0, 0], [0, 0.5, 0]]
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0, 0], [0.5, 0.6, 0]])
    adv, ret = tp.compute_gae(r, values, 1.0, 1.0)
    mask = (values != 0).float()
    assert torch.allclose(adv * mask, (torch.tensor([2.0, -1.0, 0.5])[:, None] - values) * mask)
    assert torch.allclose(ret * mask, torch.tensor([2.0, -1.0, 0.5])[:, None] * mask)  # the return is the reward


def test_whitening_by_hand():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kept = torch.tensor([1.0, 2.0, 3.0])  # the masked entries
    mean, var = kept.mean(), kept.var(unbiased=True)  # verl's masked_whiten: unbiased
    want = ((x - mean) / torch.sqrt(var + 1e-8)) * mask
    assert torch.allclose(tp.whiten(x, mask, OneProcess()), want)
    m, v = tp.masked_moments(x, mask, OneProcess())
    assert float(m) == pytest.approx(2.0) and float(v) == pytest.approx(1.0)


def test_value_loss_clip_by_hand():
    old = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    new = torch.tensor([[0.3, 1.0, 0.0, 1.2]])  # moves 0.3, 1.0 (over the 0.5 clip), -1.0 (over), 0.2
    ret = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    loss, clipfrac = tp.value_loss(new, old, ret, clip=0.5)
    # token 0: within the clip: 1/2 (0.3 - 1)^2; token 1: clipped V = 0.5, max((1-1)^2, (0.5-1)^2) = 0.25;
    # token 2: clipped V = 0.5, max(0, 0.25); token 3: within: 1/2 1.2^2
    assert loss[0].tolist() == pytest.approx([0.5 * 0.49, 0.5 * 0.25, 0.5 * 0.25, 0.5 * 1.44])
    assert clipfrac.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_ppo_policy_loss_with_a_constant_critic_is_grpos_with_baseline_b():
    """gamma = lam = 1, no whitening, a critic that says b at every token: GAE's advantage is r - b at every
    completion token, so PPO's per-token policy loss equals GRPO's with the sample advantages r - b."""
    torch.manual_seed(0)
    completion_ids = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    r, b = torch.tensor([1.0, -0.5, 0.25]), 0.3
    mask = batching.pad_values([[1.0] * len(c) for c in completion_ids], range(3), 4, "cpu")
    values = b * mask
    adv, _ = tp.compute_gae(tp.token_rewards(r, completion_ids, 4), values, 1.0, 1.0)
    logprobs, old = torch.randn(3, 4) * 0.1 - 1, torch.randn(3, 4) * 0.1 - 1  # a ratio away from 1: the clip acts
    args = dataclasses.replace(tp.Args(), clip_eps_low=0.05, clip_eps_high=0.05)
    ppo, _ = tp.policy_loss(logprobs, old, adv * mask, args)
    grpo, _ = tg.policy_loss(logprobs, old, r - b, tg.Args(clip_eps_low=0.05, clip_eps_high=0.05))
    assert torch.allclose(ppo * mask, grpo * mask)


def test_the_critic_learns_a_fixed_per_prompt_reward(tiny_models):
    """Two prompts with fixed completions and fixed rewards (+1, -1), the actor frozen (lr 0): after 25 updates the
    critic's value at the first completion token is within 0.25 of each prompt's reward (it starts near 0, off by 1)."""
    from accelerate import Accelerator

    args = tp.Args(model=tiny_models["policy"], num_minibatches=1, gradient_checkpointing=False, learning_rate=0.0,
                   critic_learning_rate=3e-3, token_budget=4096, max_grad_norm=1e9, whiten_advantages=False)  # fmt: skip
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, optimizer, scheduler = tp.build_actor_critic(args, acc, max_steps=100)
    prompt_ids, completion_ids = [[1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11], [12, 13]]
    rewards = torch.tensor([1.0, -1.0])
    C = 4
    mask = batching.pad_values([[1.0] * len(c) for c in completion_ids], range(2), C, "cpu")
    first = []
    for step in range(25):
        old_lp, ref_lp, old_v = tp.rollout_values(model, None, acc, args, prompt_ids, completion_ids, pad_id=0)
        first.append(old_v[:, 0].tolist())
        adv, ret = tp.compute_gae(tp.token_rewards(rewards, completion_ids, C), old_v, 1.0, 1.0)
        samples = (prompt_ids, completion_ids, None, torch.ones(2), adv * mask, ret, old_lp, ref_lp, old_v)
        tp.train_on_batch(model, None, optimizer, scheduler, acc, args, samples, 0, step)
    start, end = first[0], tp.rollout_values(model, None, acc, args, prompt_ids, completion_ids, 0)[2][:, 0].tolist()
    assert abs(start[0] - 1) > 0.5 and abs(start[1] + 1) > 0.5, start
    assert end == pytest.approx([1.0, -1.0], abs=0.25), (start, end)


def test_one_update_skips_the_policy_in_the_value_pass_and_trains_the_same(tiny_models):
    """With one optimizer step a batch, `rollout_values` runs the critic alone and the update takes pi_old from its
    own detached forward (as train_grlo.py does): the same values, losses and new weights as passing the
    pre-computed old log-probs (the value pass computing them, the two-mini-batch path's code)."""
    from accelerate import Accelerator

    args = tp.Args(model=tiny_models["policy"], num_minibatches=1, gradient_checkpointing=False, learning_rate=1e-3,
                   critic_learning_rate=1e-3, token_budget=4096, max_grad_norm=1e9)  # fmt: skip
    prompt_ids, completion_ids = [[1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11], [12, 13]]
    C, rewards = 4, torch.tensor([1.0, -1.0])
    runs = []
    for minibatches_in_value_pass in (1, 2):
        acc = Accelerator(cpu=True)
        torch.manual_seed(0)
        model, optimizer, scheduler = tp.build_actor_critic(args, acc, max_steps=10)
        seen = dataclasses.replace(args, num_minibatches=minibatches_in_value_pass)  # 2: the value pass runs pi_old
        old_lp, ref_lp, old_v = tp.rollout_values(model, None, acc, seen, prompt_ids, completion_ids, pad_id=0)
        assert (old_lp is None) == (minibatches_in_value_pass == 1)
        adv, ret = tp.compute_gae(tp.token_rewards(rewards, completion_ids, C), old_v, 1.0, 1.0)
        samples = (prompt_ids, completion_ids, None, torch.ones(2), adv, ret, old_lp, ref_lp, old_v)
        sums, norms = tp.train_on_batch(model, None, optimizer, scheduler, acc, args, samples, 0, 0)
        runs.append((old_v, sums["loss"], sums["value_loss"], norms, [p.detach().clone() for p in model.parameters()]))
    (v1, l1, vl1, n1, w1), (v2, l2, vl2, n2, w2) = runs
    assert torch.equal(v1, v2) and torch.allclose(l1, l2, atol=1e-6) and torch.allclose(vl1, vl2)
    assert n1[0] == pytest.approx(n2[0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(w1, w2))


def _events(run_dir, keys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {k: [e.value for e in acc.Scalars(k)] for k in keys}


def _weights(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "critic" / "model.safetensors"))


def test_resume_after_hard_kill_reproduces_the_run_critic_included(tmp_path, tiny_models):
    """SIGKILL after checkpoint-2 and --resume: the same rollouts, losses, policy and critic; the uninterrupted run
    is the end-to-end check (vLLM, every critic metric, both models loadable)."""
    common = [PY, "train_ppo.py", *SMOKE, "--max-steps", "4", "--save-every", "2", "--keep-last", "5",
              "--num-minibatches", "2"]  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    run_script(common + ["--output-dir", str(full)])
    kill_when_exists(common + ["--output-dir", str(part)], part / "checkpoint-2")
    assert (part / "checkpoint-2" / "critic").exists() and not (part / "checkpoint-4").exists()
    run_script(common + ["--output-dir", str(part), "--resume"])
    for a, b in zip(_weights(full / "checkpoint-4"), _weights(part / "checkpoint-4")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ["losses/value_loss", "critic/values_mean"]
    assert _events(full, keys) == _events(part, keys)
    rollouts = [
        [(r["step"], r["completion"]) for r in map(json.loads, open(d / "rollouts.jsonl"))] for d in (full, part)
    ]
    assert rollouts[0] == rollouts[1] and len(rollouts[0]) == 4 * 32
    # end to end with vLLM: every critic metric logged each step, the policy and the critic loadable as HF models
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    ev = _events(full, ["critic/explained_variance", "critic/vf_clipfrac", "critic/grad_norm", "policy/clipfrac",
                        "charts/critic_learning_rate", "memory/values_gib"])  # fmt: skip
    assert all(len(v) == 4 for v in ev.values()) and ev["charts/critic_learning_rate"][0] == pytest.approx(3e-3)
    AutoModelForCausalLM.from_pretrained(str(full / "checkpoint-4"))  # the policy, as vLLM and evaluate.py load it
    assert AutoModelForTokenClassification.from_pretrained(str(full / "checkpoint-4" / "critic")).config.num_labels == 1


TWO_STEPS = [*SMOKE, "--max-steps", "2", "--save-every", "2", "--max-grad-norm", "1e9"]  # DeepSpeed: one joint norm


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_models):
    """The one-process run every 2-rank backend is compared with (run once)."""
    one = tmp_path_factory.mktemp("ppo") / "one"
    run_script([PY, "train_ppo.py", *TWO_STEPS, "--output-dir", str(one)])
    return one


@pytest.mark.parametrize("config", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_two_processes_train_as_one(config, one_process_run, tmp_path):
    """2 gloo ranks give one process's losses, values and weights: the GAE whitening, the value loss and the
    eq. 6 weights run over every rank's tokens. One mini-batch a step: with more, each rank shuffles its own half
    into them, so 2 ranks form other mini-batches than one process (as in train_grlo.py)."""
    common, one = TWO_STEPS, one_process_run
    two = tmp_path / config
    proc = run_script([*launch(config), "train_ppo.py", *common, "--output-dir", str(two)], timeout=400)
    assert f"backend: {config.replace('deepspeed_', 'deepspeed-')}, 2 process(es)" in proc.stdout
    # the gradient norms too: AdamW's step hardly depends on the gradient's scale, the norms do
    keys = ["losses/policy_loss", "losses/value_loss", "critic/values_mean", "critic/returns_mean", "rewards/mean",
            "losses/grad_norm", "critic/grad_norm"]  # fmt: skip
    a, b = _events(one, keys), _events(two, keys)
    if config.startswith("deepspeed"):  # its engine reports one norm over both models, for both
        joint = [(x**2 + y**2) ** 0.5 for x, y in zip(a["losses/grad_norm"], a["critic/grad_norm"])]
        a["losses/grad_norm"] = a["critic/grad_norm"] = joint
    for k in keys:
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    for wa, wb in zip(_weights(one / "checkpoint-2"), _weights(two / "checkpoint-2")):
        assert wa.keys() == wb.keys()
        for k in wa:
            # 1e-4 is 3% of one AdamW step (lr 3e-3 an element): ranks sum in another order
            torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=0, msg=lambda m: f"{config} {k}: {m}")


def test_fsdp2_actor_critic_shards_trains_and_syncs_only_the_policy(tiny_models):
    """FSDP2 as far as CPU allows (accelerate refuses FSDP on CPU: docs/gpu.md): torch's fully_shard over both
    models' decoder layers, 2 gloo ranks under torchrun; the sharded ActorCritic's logits, values and both models'
    gradients equal the unsharded module's, and only the policy's weights reach each rank's vLLM engine."""
    proc = run_script([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/fsdp2_sync_check.py",
                       tiny_models["policy"], "actor-critic"])  # fmt: skip
    assert proc.stdout.count("FSDP2 ActorCritic forward/backward OK") == 2 and proc.stdout.count("FSDP2 sync OK") == 2


def test_refuses_bad_gae_flags_in_seconds(tmp_path, tiny_models):
    for flags, said in ((["--lam", "1.5"], "--gamma and --lam"), (["--value-clip", "0"], "--value-clip > 0")):
        proc = run_script([PY, "train_ppo.py", *SMOKE, *flags, "--output-dir", str(tmp_path / "x")], check=False,
                          timeout=60)  # fmt: skip
        assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-2000:]


def test_help_and_docs_cover_every_flag():
    out = run_script([PY, "train_ppo.py", "--help"]).stdout
    doc = open(os.path.join(ROOT, "docs", "train_ppo.md")).read()
    for f in dataclasses.fields(tp.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out and f"`{flag}`" in doc, flag
