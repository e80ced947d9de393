#!/usr/bin/env bash
# Train, then generate (and, for class-conditional models, edit): ./train_predict.sh [train.py flags...]
# No GPU: the CPU quick profile (configs/cpu_quick.args). One GPU: plain python. Several: torchrun, one process per GPU.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found: install Python 3.9+ (or set PYTHON=...)" >&2; exit 1; }
"$PYTHON" -c "import torch, torchvision, numpy, PIL, matplotlib, tqdm, nilearn, torchmetrics, skimage" 2>/dev/null || {
  echo "error: the requirements are not installed: pip install -r requirements.txt" >&2; exit 1; }

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -eq 0 ]; then
  echo "no GPU found: running the CPU quick profile (64 px, small U-Net; its plan, below, says how long it takes here)"
  train=("$PYTHON" train.py @configs/cpu_quick.args)  # the preset: 64 px, small U-Net
elif [ "$gpus" -eq 1 ]; then
  train=("$PYTHON" train.py)
else
  echo "$gpus GPUs found: training with torchrun, one process per GPU (BATCH_SIZE is per GPU)"
  train=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$gpus" train.py)
fi

# flags meant for every script (where the data and outputs live, the seed) also go to predict.py and edit.py
where=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --output-dir|--data-dir|--seed) where+=("${args[i]}" "${args[i + 1]:-}") ;;
    --output-dir=*|--data-dir=*|--seed=*) where+=("${args[i]}") ;;
  esac
done

# a conditional model also gets conditions.png, a slice sweep and the train-on-synthetic test (figures in metrics.json);
# a class-conditional one also counterfactuals of held-out slices into the control class, with effect maps; one
# with an age covariate also the held-out slices 5 and 10 years on (progress.py)
read -r condition aged out < <("$PYTHON" -c "import sys, utils; a = utils.build_parser('').parse_known_args(sys.argv[1:])[0]
print(a.CONDITION, 'age' in [c.strip().lower() for c in a.COVARIATES.split(',')], a.OUTPUT_DIR)" "$@")
generate=("${where[@]}") extras="" edited="" progressed=""
case "$condition" in *slice*) generate+=(--slice-sweep 16); extras=", slice_sweep.png/.gif/.nii.gz" ;; esac
case "$condition" in *class*) generate+=(--tstr 256) ;; esac
[ "$condition" = none ] || extras=", conditions.png$extras"

"${train[@]}" "$@" || { code=$?; echo "error: training (train.py) failed with exit code $code" >&2; exit "$code"; }
"$PYTHON" predict.py "${generate[@]}" || { code=$?; echo "error: generation (predict.py) failed with exit code $code" >&2; exit "$code"; }
case "$condition" in *class*)
  "$PYTHON" edit.py "${where[@]}" --to-label healthy --anomaly || {
    code=$?; echo "error: counterfactuals (edit.py --to-label healthy) failed with exit code $code" >&2; exit "$code"; }
  edited=" counterfactuals and effect maps in $out/edit/ (counterfactual.png/.json, edits/);" ;;
esac
if [ "$aged" = True ]; then
  "$PYTHON" progress.py "${where[@]}" || {
    code=$?; echo "error: progression (progress.py) failed with exit code $code" >&2; exit "$code"; }
  progressed=" held-out slices years on in $out/progress/ (progression.png/.gif/.json);"
fi

echo "done: samples in $out/predict/ (grid.png, process.png, process.gif, denoise.png, metrics.json$extras);${edited:-}${progressed:-}"
echo "      training grids in $out/samples/, loss curve in $out/loss.png"
