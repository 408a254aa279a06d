#!/usr/bin/env bash
# Point adamw_steps800_lr3.16e-03 of sweep adamw_ladder (`python -m lm_opt sweep`). Run, rerun or resume it alone:
#   bash logs/sweeps/adamw_ladder/adamw_steps800_lr3.16e-03/command.sh
# A finished or diverged point is left alone; an interrupted one resumes from last.ckpt.
# Runs from any clone: it starts where the sweep ran, relative to this file, with $PYTHON or `python`.
set -e
cd "$(dirname "${BASH_SOURCE[0]}")"/../../../..
RUN=logs/sweeps/adamw_ladder/adamw_steps800_lr3.16e-03
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
  --config logs/sweeps/adamw_ladder/adamw_steps800_lr3.16e-03/optimizer.yaml \
  --model.arch '{n_embd: 128, n_head: 2}' \
  --model.compile true \
  --model.warmup 0.1 \
  --data.num_workers 1 \
  --trainer.max_steps 800 \
  --trainer.val_check_interval 200 \
  --checkpoint.every_n_train_steps 100 \
  --trainer.enable_progress_bar false \
  --trainer.precision 32-true \
  --trainer.logger.init_args.save_dir logs/sweeps/adamw_ladder \
  --trainer.logger.init_args.name adamw_steps800_lr3.16e-03 "${RESUME[@]}"
