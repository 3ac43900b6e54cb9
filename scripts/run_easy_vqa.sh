#!/usr/bin/env bash
# The whole Meta-EasyVQA experiment, one seed after another (called by `make run`):
#   prepare -> base variants -> hnet -> adaptation dataset -> hvae -> hyperclip -> hyperldm -> report
# Each seed writes under $RUNS/seed$S/<stage>/ (checkpoints and results.json); TensorBoard: lightning_logs/.
# A stage whose results.json (or adaptation dataset) exists is skipped, so a re-run continues where a
# killed one stopped. Usage: scripts/run_easy_vqa.sh [SEEDS] (env: DATA, RUNS, MV, STAGES).
set -euo pipefail
SEEDS=${1:-1}
DATA=${DATA:-data/easy_vqa}
RUNS=${RUNS:-runs/easy_vqa}
MV=${MV:-meta-vqa}
STAGES=${STAGES:-"base hnet adapt hvae hyperclip hyperldm"}
CLASSIFIER_SCALES=${CLASSIFIER_SCALES:-"[1.0, 10.0]"}
COMMON=(--data.root "$DATA" --trainer.enable_progress_bar false)

timed() {  # timed NAME CMD...: run CMD, print its wall time
  local name=$1 t0=$SECONDS
  shift
  echo "== $name"
  "$@"
  echo "[time] $name: $((SECONDS - t0)) s" | tee -a "$RUNS/times.txt"
}
want() { [[ " $STAGES " == *" $1 "* ]]; }

mkdir -p "$RUNS"
timed prepare "$MV" prepare easy-vqa --out "$DATA"
for ((S = 0; S < SEEDS; S++)); do
  R=$RUNS/seed$S
  seed=(--seed_everything "$S")
  if want base; then
    [[ -f $R/base/clip_zero_shot/results.json ]] || timed "seed$S clip_zero_shot" \
      "$MV" test -c conf/easy_vqa/base.yaml "${COMMON[@]}" "${seed[@]}" \
      --model.init_args.variant clip_zero_shot --model.init_args.results_dir "$R/base/clip_zero_shot"
    for v in uncond_multitask cond_multitask cond_multitask_film mnet_maml; do
      [[ -f $R/base/$v/results.json ]] || timed "seed$S $v" \
        "$MV" fit -c conf/easy_vqa/base.yaml "${COMMON[@]}" "${seed[@]}" --test_after_fit true \
        --model.init_args.variant "$v" --model.init_args.results_dir "$R/base/$v" \
        --trainer.logger.init_args.name "base_$v"
    done
  fi
  if want hnet && [[ ! -f $R/hnet/results.json ]]; then
    timed "seed$S hnet" "$MV" fit -c conf/easy_vqa/hnet.yaml "${COMMON[@]}" "${seed[@]}" --test_after_fit true \
      --model.init_args.results_dir "$R/hnet" --trainer.callbacks.init_args.dirpath "$R/hnet"
  fi
  if want adapt; then  # finished datasets are left alone, interrupted ones resume
    timed "seed$S adaptation" "$MV" predict -c conf/easy_vqa/adapt.yaml --data.root "$DATA" \
      --ckpt_path "$R/hnet/best.ckpt" --trainer.default_root_dir "$R/adaptation" \
      --trainer.callbacks.init_args.out "$R/adaptation"
  fi
  up=(--data.adaptation "$R/adaptation")
  if want hvae && [[ ! -f $R/hvae/results.json ]]; then
    timed "seed$S hvae" "$MV" fit -c conf/easy_vqa/hvae.yaml "${COMMON[@]}" "${seed[@]}" "${up[@]}" \
      --test_after_fit true --model.init_args.upstream_ckpt "$R/hnet/best.ckpt" \
      --model.init_args.results_dir "$R/hvae" --trainer.callbacks.init_args.dirpath "$R/hvae"
  fi
  for gen in hnet hvae; do
    if want hyperclip && [[ ! -f $R/${gen}_hyperclip/results.json ]]; then
      timed "seed$S ${gen}_hyperclip" "$MV" fit -c conf/easy_vqa/hyperclip.yaml "${COMMON[@]}" "${seed[@]}" \
        "${up[@]}" --test_after_fit true --model.init_args.upstream_ckpt "$R/$gen/best.ckpt" \
        --trainer.logger.init_args.name "${gen}_hyperclip" \
        --model.init_args.results_dir "$R/${gen}_hyperclip" --trainer.callbacks.init_args.dirpath "$R/${gen}_hyperclip"
    fi
    if want hyperldm && [[ ! -f $R/${gen}_hyperldm/results.json ]]; then
      timed "seed$S ${gen}_hyperldm" "$MV" fit -c conf/easy_vqa/hyperldm.yaml "${COMMON[@]}" "${seed[@]}" \
        "${up[@]}" --test_after_fit true --model.init_args.upstream_ckpt "$R/$gen/best.ckpt" \
        --model.init_args.hyperclip_ckpt "$R/${gen}_hyperclip/best.ckpt" \
        --model.init_args.classifier_scales "$CLASSIFIER_SCALES" --trainer.logger.init_args.name "${gen}_hyperldm" \
        --model.init_args.results_dir "$R/${gen}_hyperldm" --trainer.callbacks.init_args.dirpath "$R/${gen}_hyperldm"
    fi
  done
done
"$MV" report "$RUNS" --out "$RUNS/report"
