#!/usr/bin/env bash
# The prepared one-GPU check (docs/gpu.md, "Will it fit: --dummy-weights"): two --dummy-weights runs on ONE
# 80-141 GB GPU, offline, in about 6-8 minutes, each phase measured beside the memory plan:
#   1. the one-GPU ablation: Qwen3-1.7B-Base policy + Skywork-Reward-V2-Qwen3-0.6B reward model;
#   2. the paper preset's per-GPU shapes: Qwen3-4B-Base + Skywork-Reward-V2-Llama-3.1-8B, --token-budget 16384,
#      gradient checkpointing, bf16, one process (what one GPU can hold: no ZeRO sharding, so the resident state
#      is the single-process row of the plan, 77 GiB; it fits a 141 GB H200 and not an 80 GB card).
# Fewer samples and shorter completions than the real steps keep it inside 8 minutes; the update's micro-batch
# (--token-budget tokens) and every model shape are the real ones, so the update's peak memory is the real one.
# Writes $OUT/gpu_check.json (both reports) and $OUT/gpu_check.md (the table for docs/gpu.md), logs beside them.
#
# Needs torch with CUDA, transformers, accelerate, tensorboard. vLLM is used if installed, else HF generate (the
# report says which). Missing small packages travel as wheels in .whl/ (this script installs them):
#   bash bench/gpu_check.sh --fetch-wheels     # here, with pip: tyro and its two dependencies, transformers 5.19
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    grep -qs '^/.whl/$' .git/info/exclude || echo /.whl/ >>.git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
        tyro==1.0.17 docstring-parser==0.17.0 typeguard==4.4.4 transformers==5.19.0
    du -ch .whl/*.whl
    exit 0
fi

OUT=${OUT:-bench/gpu_check_out}
# flags appended to both runs; the CPU dry run of this script narrows the models with them:
#   GRLO_GPU_CHECK_EXTRA="--dummy-overrides num_hidden_layers=1,hidden_size=256,intermediate_size=512,vocab_size=4096 --max-new-tokens 16" bash bench/gpu_check.sh
GRLO_GPU_CHECK_EXTRA=${GRLO_GPU_CHECK_EXTRA:-}
PYTHON=${PYTHON:-python3}  # the interpreter with torch (the device machine's python3; here .venv/bin/python)
FAILED=0
RUNS=${GRLO_GPU_CHECK_RUNS:-/tmp/grlo-gpu-check}  # checkpoints of a 4B run take ~50 GB: deleted after each run
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/grlo-site .whl/*.whl
    export PYTHONPATH=/tmp/grlo-site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
SAMPLER=()
"$PYTHON" -c "import vllm" 2>/dev/null || SAMPLER=(--no-use-vllm)  # HF generate; the report names the sampler
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

run() {  # name, time limit, flags
    local name=$1 limit=$2
    shift 2
    rm -rf "$RUNS/$name"
    echo "== $name (limit ${limit}s): $*"
    local rc=0
    timeout "$limit" "$PYTHON" train_grlo.py --dummy-weights --dataset data/open_prompts.jsonl \
        --output-dir "$RUNS/$name" "${SAMPLER[@]}" "$@" $GRLO_GPU_CHECK_EXTRA >"$OUT/$name.log" 2>&1 || rc=$?
    if [[ $rc == 0 ]]; then
        cp "$RUNS/$name/fit_check.json" "$OUT/$name.json"
        sed -n '/^fit check |/,/TFLOP\/s/p' "$OUT/$name.log"
    else  # 124: over its time limit; an OOM shows in the log's tail
        echo "$name FAILED (exit $rc): the end of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log"
        FAILED=1
    fi
    rm -rf "$RUNS/$name"
}

run ablation-1.7b 200 --model Qwen/Qwen3-1.7B-Base --reward-model Skywork/Skywork-Reward-V2-Qwen3-0.6B \
    --prompts-per-step 2 --num-generations 8 --max-new-tokens 2048 --num-minibatches 2
run paper-4b-per-gpu 280 --model Qwen/Qwen3-4B-Base --reward-model Skywork/Skywork-Reward-V2-Llama-3.1-8B \
    --prompts-per-step 2 --num-generations 8 --max-new-tokens 1536 --num-minibatches 1

"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
reports = {n: json.load(open(os.path.join(out, f"{n}.json"))) for n in ("ablation-1.7b", "paper-4b-per-gpu")
           if os.path.exists(os.path.join(out, f"{n}.json"))}
json.dump(reports, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
lines = ["| run | phase | time s | peak GiB (measured) | plan GiB | fits |", "|---|---|---:|---:|---:|---|"]
for name, r in reports.items():
    for row in r["phases"]:
        plan = "-" if row["plan_gib"] is None else f"{row['plan_gib']:.1f}"
        lines.append(f"| {name} | {row['phase']} | {row['seconds']:.1f} | {row['peak_gib']:.1f} | {plan} | "
                     f"{'yes' if row['fits_by_measurement'] else 'no'} |")
    mfu = f"{100 * r['update_mfu']:.1f}%" if r["update_mfu"] else "n/a"
    lines.append(f"| {name} | {r['device']}, {r['sampler']} | rollout {r['rollout_tokens_per_s']:.0f} tok/s | update "
                 f"{r['update_tokens_per_s']:.0f} tok/s | MFU {mfu} | |")
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
exit $FAILED
