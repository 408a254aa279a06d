#!/usr/bin/env bash
# Point sgd_w512_lr0.0562_seed1 of sweep cpu_scale (`python -m lm_opt sweep`). Run, rerun or resume it alone:
#   bash logs/sweeps/cpu_scale/sgd_w512_lr0.0562_seed1/command.sh
# A finished or diverged point is left alone; an interrupted one resumes from last.ckpt.
# Runs from any clone: it starts where the sweep ran, relative to this file, with $PYTHON or `python`.
set -e
cd "$(dirname "${BASH_SOURCE[0]}")"/../../../..
RUN=logs/sweeps/cpu_scale/sgd_w512_lr0.0562_seed1
if [ -f "$RUN/summary.json" ] && grep -Eq '"status": "(finished|diverged)"' "$RUN/summary.json"; then
  echo "$RUN is done: $(grep -Eo '"status": "[a-z]+"' "$RUN/summary.json")"
  exit 0
fi
RESUME=()
if [ -f "$RUN/checkpoints/last.ckpt" ]; then RESUME=(--ckpt_path last)
elif [ "${SLURM_PROCID:-0}" = 0 ]; then  # an attempt without a checkpoint starts over (once, under srun)
  rm -f "$RUN"/events.out.tfevents.* "$RUN/summary.json"
fi
exec "${PYTHON:-python}" -m lm_opt fit \
  --config configs/quickstart.yaml \
  --config logs/sweeps/cpu_scale/sgd_w512_lr0.0562_seed1/optimizer.yaml \
  --data.num_workers 1 \
  --trainer.max_steps 200 \
  --trainer.val_check_interval 50 \
  --trainer.enable_progress_bar false \
  --trainer.precision bf16-mixed \
  --model.arch '{n_embd: 512, n_head: 8}' \
  --seed_everything 1 \
  --trainer.logger.init_args.save_dir logs/sweeps/cpu_scale \
  --trainer.logger.init_args.name sgd_w512_lr0.0562_seed1 "${RESUME[@]}"
