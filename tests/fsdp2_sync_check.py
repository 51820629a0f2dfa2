"""Run under `torchrun --nproc_per_node 2`: FSDP2-shard the tiny policy, perturb it, push it into each
rank's own vLLM engine with generation.sync_weights, and check vLLM's log-probs match the trainer's.

Exercises the DTensor branch of `full_state_dict` (each rank all-gathers every parameter), which DDP
tests cannot reach. Exits non-zero on any mismatch."""

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


def main(policy: str):
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
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert any(hasattr(p, "full_tensor") for p in model.parameters()), "parameters are not DTensors"
    gathered = dict(generation.full_state_dict(model, _Unsharded()))
    want = reference.state_dict()
    assert gathered.keys() == want.keys(), set(gathered) ^ set(want)
    assert all(torch.equal(gathered[k], want[k]) for k in want), "gathered weights differ"
    generation.sync_weights(llm, model, _Unsharded())
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


if __name__ == "__main__":
    main(sys.argv[1])
