"""Run under `torchrun --nproc_per_node 2`: FSDP2-shard the tiny policy, perturb it, push it into each
rank's own vLLM engine with generation.sync_weights, and check vLLM's log-probs match the trainer's.

Exercises the DTensor branch of `full_state_dict` (each rank all-gathers every parameter), which DDP
tests cannot reach. With a second argument `actor-critic`, the sharded module is train_ppo.ActorCritic (policy
and critic, every decoder layer of both sharded, as accelerate's TRANSFORMER_BASED_WRAP would): only the
policy's tensors reach vLLM (prefix "policy."), the sharded forward gives the unsharded policy's logits and
critic's values, and one backward gives both models' gradients, equal to the unsharded ones. Exits non-zero on
any mismatch."""

import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import batching  # noqa: E402
import generation  # noqa: E402


class _Unsharded:  # what full_state_dict needs from an Accelerator: no DeepSpeed, identity unwrap
    state, distributed_type, num_processes = None, "NO", 2

    @staticmethod
    def unwrap_model(m):
        return m


def main(policy: str, actor_critic: bool = False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    from vllm import LLM

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    llm = LLM(model=policy, dtype="float32", enforce_eager=True, seed=rank, max_model_len=256, tensor_parallel_size=1,
              distributed_executor_backend="external_launcher", kv_cache_memory_bytes=2**27,
              logprobs_mode="processed_logprobs")  # fmt: skip
    torch.manual_seed(0)  # same perturbation on both ranks, before sharding
    reference = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    model.load_state_dict(reference.state_dict())
    prefix, unsharded = "", None
    if actor_critic:  # the PPO module as train_ppo builds it: the critic is the base with a new scalar head
        import copy

        from transformers import AutoModelForTokenClassification

        import train_ppo

        critic = AutoModelForTokenClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
        model, prefix = train_ppo.ActorCritic(model, critic), "policy."
        unsharded = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for part in (model.policy, model.critic) if actor_critic else (model,):
        for layer in part.model.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert any(hasattr(p, "full_tensor") for p in model.parameters()), "parameters are not DTensors"
    gathered = dict(generation.full_state_dict(model, _Unsharded(), prefix))
    want = reference.state_dict()
    assert gathered.keys() == want.keys(), set(gathered) ^ set(want)
    assert all(torch.equal(gathered[k], want[k]) for k in want), "gathered weights differ"
    if actor_critic:
        check_actor_critic_forward_backward(model, unsharded, rank)
    generation.sync_weights(llm, model, _Unsharded(), prefix)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    ids, lps, _ = generation.generate_vllm(
        llm, prompts, [rank, rank + 7], [], temperature=1.0, top_p=1.0, max_new_tokens=12
    )
    batch = batching.collate([0, 1], prompts, ids, pad_id=0, device="cpu")
    with torch.no_grad():
        hf, _ = batching.completion_logprobs(reference, batch, temperature=1.0)
    err = max((hf[i, : len(ids[i])] - torch.tensor(lps[i])).abs().max().item() for i in range(2))
    assert err < 1e-4, f"rank {rank}: vLLM vs trainer log-prob error {err} after the FSDP2 sync"
    print(f"rank {rank}: FSDP2 sync OK, max log-prob error {err:.2e}", flush=True)
    llm.llm_engine.engine_core.shutdown()  # also tears down the process group it shares with us


def check_actor_critic_forward_backward(model, unsharded, rank: int):
    """Sharded ActorCritic vs the same module unsharded, on the same rows: logits, critic values and the
    gradients of (mean logit + mean value) in both the policy and the critic."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(6).expand(2, 6),
                  logits_to_keep=slice(2, 5))  # fmt: skip
    outs = [m(values=True, **inputs) for m in (model, unsharded)]
    for out in outs:
        (out.logits.mean() + out.critic_values.mean()).backward()
    (a, b) = outs
    assert torch.allclose(a.logits, b.logits, atol=1e-5), f"rank {rank}: sharded logits differ"
    assert torch.allclose(a.critic_values, b.critic_values, atol=1e-5), f"rank {rank}: sharded values differ"
    grads = dict(unsharded.named_parameters())
    for name, p in model.named_parameters():
        full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        assert full is not None and torch.allclose(full, grads[name].grad, atol=1e-5), f"rank {rank}: grad {name}"
    assert any(n.startswith("critic.") and p.grad is not None for n, p in model.named_parameters())
    print(f"rank {rank}: FSDP2 ActorCritic forward/backward OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], actor_critic=sys.argv[2:] == ["actor-critic"])
