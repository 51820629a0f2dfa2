"""Shared fixtures: local models built once per session (cached on disk), one real vLLM engine.

No hub is reachable in tests, so every model comes from `local_models.py`. The vLLM engine is the real
CPU build, never a mock; it lives for the whole session because start-up costs ~20 s.
"""

import os
import signal
import subprocess
import sys
import time
import types

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: tests reach its runner
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import local_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models():
    """{"policy": tiny Qwen3 causal LM, "reward": tiny Qwen3 reward model}: random, head_dim 64."""
    return local_models.build_tiny(local_models.DEFAULT_DIR)


@pytest.fixture(scope="session")
def smollm2_models():
    """{"policy": SmolLM2-135M-Instruct, "reward": its stand-in reward model}, from the PyPI GGUF."""
    return local_models.build_smollm2(local_models.DEFAULT_DIR)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """(query length, key length) of every torch sdpa call while the test runs: shows which attention
    path ran (batching.shared_prefix_attention makes a P x P call, then a C x (P + C) one, per layer)."""
    import torch

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((q.shape[2], k.shape[2])) or sdpa(q, k, v, **kw))  # fmt: skip
    return calls


def ran_block_wise(calls: list) -> bool:
    """True if sdpa calls came in (prefix P x P, slots C x (P + C)) pairs, as shared_prefix_attention makes them."""
    pairs = list(zip(calls[::2], calls[1::2]))
    return bool(pairs) and len(calls) % 2 == 0 and all(qp == kp and ks == kp + qs for (qp, kp), (qs, ks) in pairs)


@pytest.fixture(scope="session")
def tiny_llm(tiny_models):
    """One in-process vLLM engine on the tiny policy, built by generation.build_vllm exactly as a
    single-process CPU run builds it (fp32 like the CPU trainer), shared by all tests."""
    import torch

    import generation

    one_cpu_process = types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    llm = generation.build_vllm(tiny_models["policy"], torch.float32, 1, 512, one_cpu_process, 0.3, False)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def run_script(args: list, timeout: int = 600, env: dict = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on failure show its output's tail, which pytest would hide."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # own process group: a timeout (a deadlocked 2-rank run) kills the launcher AND its ranks
    popen = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        stdout, stderr = popen.communicate()
        raise AssertionError(f"{' '.join(args)} still running after {timeout} s (killed)\n--- stdout\n{stdout[-4000:]}"
                             f"\n--- stderr\n{stderr[-6000:]}") from None  # fmt: skip
    proc = subprocess.CompletedProcess(args, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


# `accelerate launch` with 2 gloo ranks on CPU (`--cpu --num_processes 2` would silently start ONE process)
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def launch(config: str) -> list:
    """`accelerate launch` with a shipped config file (configs/<config>.yaml), 2 processes, fp32 (CPU); "ddp" = LAUNCH_2."""
    if config == "ddp":
        return LAUNCH_2
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "configs", f"{config}.yaml"),
            "--num_processes", "2", "--mixed_precision", "no"]  # fmt: skip


def kill_when_exists(cmd: list, path, timeout: int = 300):
    """Start `cmd`, SIGKILL its whole process group the moment `path` exists (a hard crash), wait."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
