#!/usr/bin/env bash
# The GPU check: what the project has not yet run on a GPU, in one run of at most 9 minutes on one GPU.
# Usage: bash docs/gpu_check.sh OUT        (docs/performance.md: how to run it on a GPU box, what it writes)
# Each part runs in its own folder under OUT, stopped at its own time limit and at the run's (TOTAL); a failure is
# recorded and the next part runs (exit code 1 if any part was not ok). Each part that ends adds its line to
# OUT/summary.txt (.tsv, .json), and OUT/gpu_check.tgz is made anew with every small file so far (no checkpoints).
# The environment may set:
#   PYTHON       the interpreter (python3)
#   PROFILE      flags for every part's model and sampler (none: the default 128 px profile)
#   TRAIN_FLAGS  the training run's length (--train-minutes 4)
#   BENCH_FLAGS  bench.py's rounds and extras (below)
#   TESTS        the test files run (the CUDA-only ones)
#   DATA_DIR     the data (data: the checkout's folder, where the demos are built)
#   WHEELS       a folder of wheels installed first, where the machine reaches no package index (.whl)
#   INSTALL      1: pip-install what is missing (requirements.txt, diffusers), tolerating failure; 0: install nothing
#   PARTS        the parts run, in their order (setup tests bench train_predict inpaint counterfactual)
#   TOTAL, LIMIT_SETUP, LIMIT_TESTS, LIMIT_BENCH, LIMIT_TRAIN, LIMIT_INPAINT, LIMIT_COUNTERFACTUAL: seconds
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: bash docs/gpu_check.sh OUT" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
export out PYTHON=${PYTHON:-python3} PROFILE=${PROFILE:-} DATA_DIR=${DATA_DIR:-data} WHEELS=${WHEELS:-.whl}
export INSTALL=${INSTALL:-1} BENCH_FLAGS=${BENCH_FLAGS:---vs-diffusers --cuda-graphs --profile --steps 10 --rounds 3 \
--warmup 5 --ddpm-batch 16}
TRAIN_FLAGS=${TRAIN_FLAGS:---train-minutes 4}
TESTS=${TESTS:-tests/test_cuda.py}
PARTS=${PARTS:-setup tests bench train_predict inpaint counterfactual}
TOTAL=${TOTAL:-540}  # the whole run's seconds: a part gets its own limit or what is left, whichever is less
START=$(date +%s) FAILED=0
: > "$out/summary.txt"
: > "$out/summary.tsv"

setup() {  # what the machine has; the wheels, then what is still missing, installed
  nvidia-smi || true
  if [ "$INSTALL" = 1 ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "warning: the wheels in $WHEELS failed"
  fi
  missing=$("$PYTHON" -c "import importlib.util as u
print(' '.join(p for p, m in [('torchvision', 'torchvision'), ('pillow', 'PIL'), ('matplotlib', 'matplotlib'),
    ('tqdm', 'tqdm'), ('nilearn', 'nilearn'), ('nibabel', 'nibabel'), ('scipy', 'scipy'), ('scikit-image', 'skimage'),
    ('torchmetrics', 'torchmetrics'), ('pytest', 'pytest'), ('diffusers', 'diffusers')] if not u.find_spec(m)))")
  if [ -n "$missing" ] && [ "$INSTALL" = 1 ]; then
    "$PYTHON" -m pip install -q --retries 0 --timeout 10 $missing || echo "warning: could not install: $missing"
  fi
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  "$PYTHON" -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers missing"
}

bench() {  # bench.py at the profile; without diffusers, without --vs-diffusers
  flags=$BENCH_FLAGS
  "$PYTHON" -c "import diffusers" 2>/dev/null || { flags=${flags//--vs-diffusers/}; echo "diffusers missing: $flags"; }
  # shellcheck disable=SC2086
  "$PYTHON" bench.py --data-dir "$DATA_DIR" --output-dir "$out/bench" $PROFILE $flags
}

headline() {  # headline PART STATUS: the part's figures, or the last line of its log where it failed
  "$PYTHON" - "$out/$1" "$2" <<'PY' 2>/dev/null || tail -n 1 "$out/$1/log.txt"
import csv, glob, json, os, sys
folder, status = sys.argv[1:]
log = [l for l in open(os.path.join(folder, "log.txt"), errors="replace").read().splitlines() if l.strip()]
found = lambda name: sorted(glob.glob(os.path.join(folder, "**", name), recursive=True))  # noqa: E731
def numbers(d, at=""):
    """The figures of a JSON object, nested ones named by their path."""
    return [f for k, v in d.items() for f in ([f"{at}{k} {v:.4g}"] if isinstance(v, float) else
                                              numbers(v, f"{at}{k}.") if isinstance(v, dict) else [])]
figures = lambda path: ", ".join(numbers(json.load(open(path))))[:240]  # noqa: E731
part = os.path.basename(folder)
if status != "ok":
    line = log[-1] if log else "(no output)"
elif part == "setup":
    line = "; ".join(l for l in log if l.startswith(("torch ", "diffusers")))
elif part == "tests":
    line = log[-1].strip("= ")
elif part == "bench":
    b = json.load(open(found("bench.json")[0]))
    ours, versus = b["ours"], b.get("train_speedup_vs_diffusers")
    line = (f"{b['device']}: train {ours['train_img_per_s']:.0f} img/s" + (f", MFU {100 * ours['mfu']:.1f}%" if
            ours["mfu"] else "") + (f", {versus:.2f}x diffusers" if versus else "") + "; sampling " +
            ", ".join(f"{k[7:-10]} {v:.1f}" for k, v in ours.items() if k.startswith("sample_")) + " img/s")
elif part == "train_predict":
    rows = list(csv.DictReader(open(found("log.csv")[0])))
    line = (f"{rows[-1]['step']} steps, val loss {next(r['val_loss'] for r in reversed(rows) if r['val_loss'])}; "
            f"grid {os.path.relpath(found('grid.png')[0], folder)}; " + figures(found("metrics.json")[0]))
else:
    line = figures(found(f"{part}.json")[0])
print(line)
PY
}

record() {  # record PART STATUS CODE SECONDS LIMIT: its line in summary.txt, .tsv and .json; the bundle anew
  line=$(headline "$1" "$2" | tr '\t\n' '  ')
  printf '%-15s %-13s %6s s  %s/  %s\n' "$1" "$2" "$4" "$1" "$line" | tee -a "$out/summary.txt"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$line" >> "$out/summary.tsv"
  "$PYTHON" -c "import json, sys
parts = [dict(zip(('part', 'status', 'exit_code', 'seconds', 'limit_s', 'line'), l.rstrip('\n').split('\t')))
         for l in open(sys.argv[1])]
json.dump({'parts': [dict(p, exit_code=int(p['exit_code']), seconds=float(p['seconds']), limit_s=int(p['limit_s']),
                          folder=p['part'] + '/') for p in parts]}, open(sys.argv[2], 'w'), indent=1)" \
    "$out/summary.tsv" "$out/summary.json" || echo "warning: summary.json not written" >&2
  (cd "$out" && find . -type f -size -8M ! -name '*.pt' ! -name gpu_check.tgz ! -name 'sample_*.png' \
    ! -name 'denoised_*.png' ! -path '*/tstr/*' -printf '%P\n' \
    | tar -czf gpu_check.tgz -T -) || echo "warning: gpu_check.tgz not written" >&2
}

part() {  # part NAME LIMIT COMMAND...: COMMAND in OUT/NAME (output in log.txt), at most LIMIT seconds and what is left
  local name=$1 limit=$2 left=$((TOTAL - $(date +%s) + START)); shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  mkdir -p "$out/$name"
  if [ "$left" -lt 5 ]; then
    echo "the run's $TOTAL s are spent" > "$out/$name/log.txt"; record "$name" skipped 0 0 0; FAILED=1; return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name: at most $limit s, output in $out/$name/"
  local start code status tenths
  start=$(date +%s%N)
  timeout --kill-after=15 "$limit" "$@" > "$out/$name/log.txt" 2>&1
  code=$?
  tenths=$((($(date +%s%N) - start) / 100000000))
  case $code in 0) status=ok ;; 124|137) status="timed out" ;; *) status="failed ($code)" ;; esac
  record "$name" "$status" "$code" "$((tenths / 10)).$((tenths % 10))" "$limit"
  [ "$code" -eq 0 ] || FAILED=1
}

export -f setup bench
checkpoint="$out/train_predict/checkpoint.pt"
# shellcheck disable=SC2086
{
  part setup "${LIMIT_SETUP:-20}" bash -c setup
  part tests "${LIMIT_TESTS:-60}" "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$out/tests/junit.xml" $TESTS
  part bench "${LIMIT_BENCH:-150}" bash -c bench
  # a class-conditional model: one run's checkpoint serves the grid and metrics, the counterfactuals and the fills
  part train_predict "${LIMIT_TRAIN:-330}" bash ./train_predict.sh --condition class+slice --data-dir "$DATA_DIR" \
    --output-dir "$out/train_predict" $PROFILE $TRAIN_FLAGS
  part inpaint "${LIMIT_INPAINT:-60}" "$PYTHON" edit.py --inpaint-eval --checkpoint "$checkpoint" \
    --data-dir "$DATA_DIR" --output-dir "$out/inpaint" $PROFILE
  part counterfactual "${LIMIT_COUNTERFACTUAL:-60}" "$PYTHON" edit.py --to-label healthy --anomaly \
    --checkpoint "$checkpoint" --data-dir "$DATA_DIR" --output-dir "$out/counterfactual" $PROFILE
}
echo "summary: $out/summary.txt, $out/summary.json; the small files of every part: $out/gpu_check.tgz"
exit "$FAILED"
