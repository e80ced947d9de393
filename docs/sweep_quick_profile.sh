#!/usr/bin/env bash
# The quality-per-CPU-minute sweep behind the CPU quick profile (docs/quality.md).
# Each argument is one run: the quick profile (configs/cpu_quick.args) with those flags changed, trained for the same budget with the
# same seed on the demo set, then measured by predict.py on 128 samples. Results: one line each in $OUT/sweep.tsv.
# Usage: bash docs/sweep_quick_profile.sh OUT 'name|--flag value ...' ...   (run it on an otherwise idle machine)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
mkdir -p "$out"
base=(@configs/cpu_quick.args --sample-every 1000 --checkpoint-every 100000 --seed 0)  # the quick profile, no grids
for config in "$@"; do
  name=${config%%|*}; flags=${config#*|}
  run="$out/$name"
  # shellcheck disable=SC2086
  python train.py "${base[@]}" $flags --output-dir "$run" --fresh > "$run.train.log" 2>&1
  # shellcheck disable=SC2086
  python predict.py --output-dir "$run" --num-samples 128 --sample-batch 64 $(echo "$flags" | grep -o -- '--sample-steps [0-9]*' || true) \
      > "$run.predict.log" 2>&1
  python - "$name" "$run" "$out/sweep.tsv" <<'PY'
import json, sys
name, run, tsv = sys.argv[1:]
m = json.load(open(f"{run}/predict/metrics.json"))
steps = m["step"]
keys = ["ssim_to_nearest_heldout", "psnr_to_nearest_heldout", "frechet_distance", "ms_ssim_between_samples",
        "ms_ssim_between_real", "rmse_sample_to_nearest_train", "possible_copies"]
with open(tsv, "a") as f:
    f.write("\t".join([name, str(steps)] + [f"{m[k]:.4f}" if isinstance(m[k], float) else str(m[k]) for k in keys]) + "\n")
print(name, steps, {k: m[k] for k in keys})
PY
done
