#!/usr/bin/env bash
# The GPU check of meta_vqa, for a machine with CUDA GPUs (about 10 minutes on one modern GPU; never run by
# the tests). One JSON line per figure on stdout, progress on stderr:
#
#   scripts/gpu_check.sh [OUT] > gpu_check.jsonl        (OUT: runs/gpu_check; PYTHON=... picks the python)
#
# 1. The benches on CUDA at paper scale: batched vs per-task MAML and HNet-MAML meta-steps and support
#    adaptation, in fp32 and bf16 (bf16 vs fp32 speed: the ratio of the two runs' tasks/s, printed as its own
#    line), and CLIP image encoding (fp32, bf16, fp16).
# 2. The smoke pipeline on one GPU in fp32 (the reference), then with DDP on every visible GPU in
#    bf16-mixed (launcher=process, --trainer.strategy ddp --trainer.devices -1 on every stage): its wall
#    time, each method's zero-shot accuracy against the reference and the largest difference.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
    echo "gpu_check.sh: needs a CUDA GPU, and torch.cuda.is_available() is False here" >&2
    exit 2
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
echo "gpu_check.sh: $GPUS GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')" >&2
mkdir -p "$OUT"

bench() { "$PY" -m meta_vqa bench "$@" --device cuda --json; }
for name in maml hnet; do
    bench "$name" --precision fp32 | tee "$OUT/bench_${name}_fp32.jsonl"
    bench "$name" --precision bf16 | tee "$OUT/bench_${name}_bf16.jsonl"
    "$PY" - "$OUT/bench_${name}_fp32.jsonl" "$OUT/bench_${name}_bf16.jsonl" <<'EOF'
import json, sys
fp32, bf16 = ([json.loads(line) for line in open(p)] for p in sys.argv[1:])
for a, b in zip(fp32, bf16):
    if a["unit"].endswith("/s"):
        print(json.dumps({"bench": a["bench"], "figure": f"{a['figure']}_bf16_vs_fp32", "value": b["value"] / a["value"],
                          "unit": "x", "fp32": a["value"], "bf16": b["value"], "device": a["device"]}))
EOF
done
bench clip --precisions fp32,bf16,fp16

# the smoke pipeline: one GPU fp32, then DDP on all GPUs in bf16-mixed (the same synthetic data)
"$PY" scripts/smoke_variant.py --out "$OUT/smoke_ddp_bf16" --data "$OUT/data" --reference "$OUT/smoke_fp32" \
    --run-reference --args "--trainer.accelerator gpu --trainer.strategy ddp --trainer.devices -1 \
    --trainer.precision bf16-mixed" 2> "$OUT/smoke.log" || {
    echo "gpu_check.sh: the DDP bf16 smoke pipeline failed or differs by more than 2 points ($OUT/smoke.log)" >&2
    exit 1
}
echo "gpu_check.sh: done; logs and runs in $OUT" >&2
