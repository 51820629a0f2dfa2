#!/usr/bin/env bash
# The PPO-vs-GRPO ablation on CPU (docs/train_ppo.md): 2 algorithms x 2 judges x 2 seeds, 20 steps of 64 samples
# each, gold held-out accuracy every 5 steps. PPO: train_ppo.py (64 prompts x 1 sample, a critic); GRPO:
# train_grlo.py (8 prompts x 8 samples, the group mean); every other setting is the same (the cpu-arith presets).
# The judge: the verifier (--judge row) or train_rm.py's learned RM (--judge reward-model; the verifier then only
# measures). The runs go one after another: two at once on 2 cores ruin both timings. A killed queue resumes
# where it stopped (a checkpoint every 5 steps; --resume is exact), so rerunning this script finishes the table.
#
#   bash docs/ppo_vs_grpo.sh                       # everything (~3.7 h on 2 cores), then the figure
#   SEEDS=1 JUDGES=rm bash docs/ppo_vs_grpo.sh      # a part
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/ablation}
SEEDS=${SEEDS:-"1 2"}
JUDGES=${JUDGES:-"rm verifier"}
mkdir -p "$OUT"

[ -e runs/rm-cpu-arith/final/config.json ] || $PY train_rm.py --preset cpu-arith  # the learned RM (~13 min)

run() {  # run NAME SCRIPT ARGS...: one 20-step run into $OUT/NAME, resumed from its newest checkpoint if any
  local dir=$OUT/$1; shift
  if [ -e "$dir/checkpoint-20" ]; then echo "done: $dir"; return; fi
  local resume=()
  if compgen -G "$dir/checkpoint-*" >/dev/null; then resume=(--resume); else rm -rf "$dir"; fi
  echo "$(date -u +%FT%TZ) $dir ${resume[*]}" | tee -a "$OUT/queue.log"
  $PY "$@" --output-dir "$dir" --save-every 5 --keep-last 1 "${resume[@]}" >>"$dir.log" 2>&1
  rm -rf "$dir/checkpoint-20/trainer_state"  # done: keep the HF weights, drop the optimizer state (GBs)
}

for seed in $SEEDS; do  # seed 1 of every pair first: a partial queue already compares all four
  for judge in $JUDGES; do
    if [ "$judge" = rm ]; then flag=(--judge reward-model); else flag=(--judge row); fi
    run "grpo-$judge-seed$seed" train_grlo.py --preset cpu-arith-rm "${flag[@]}" --seed "$seed"
    run "ppo-$judge-seed$seed" train_ppo.py --preset cpu-arith-rm "${flag[@]}" --seed "$seed"
  done
done
$PY docs/plot_ppo_vs_grpo.py --runs "$OUT"
