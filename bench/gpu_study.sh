#!/usr/bin/env bash
# `loradrift study` on a lent GPU machine within one run's time limit, and its bundle brought back.
# With no --preset the study picks smollm2-gpu on CUDA (its first line says so). The study folder
# stays on the machine (under WORK) while it is warm, so a run that hits the limit is resumed by
# the same command in the next run: finished runs and phases are kept (docs/study.md).
#   bash bench/gpu_study.sh OUT_DIR [SECONDS] [study options ...]
# Here, once: the workplace's GPU staging script (docs/study.md, "Which preset, and the study on a lent GPU"), then the one wheel it does not bring:
#   pip download -q --no-deps --only-binary=:all: -d .gpu/2/wheels threadpoolctl==3.8.0
# On a lent machine: first run `bash .gpu/1/stash.sh` carrying .gpu/1,
# then at once, carrying .gpu/2:
#   source .gpu/2/setup.sh && LORADRIFT_COMMIT=<the commit, typed in> bash bench/gpu_study.sh "$OUT" 480
# (the machine gets the working tree without .git: the manifest takes the commit from LORADRIFT_COMMIT)
# and, if it stopped at the limit, again while warm: source /root/gpu-stash/env.sh && bash bench/gpu_study.sh "$OUT" 480
# Tried here first on the tiny preset (SECONDS is needed before study options):
#   PYTHON=.venv/bin/python LORADRIFT_GPU_WORK=/tmp/gpu-work bash bench/gpu_study.sh /tmp/gpu-out 900 --preset tiny
set -u
OUT=${1:?usage: bash bench/gpu_study.sh OUT_DIR [SECONDS] [study options ...]}; LIMIT=${2:-480}
shift; [ $# -gt 0 ] && shift
WORK=${LORADRIFT_GPU_WORK:-/root/gpu-stash/study}; [ -w /root ] || WORK=${LORADRIFT_GPU_WORK:-$HOME/.loradrift-gpu-study}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}  # the interpreter that has loradrift (setup.sh installs it, or puts src/ on PYTHONPATH)
{
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo "${LORADRIFT_COMMIT:-unknown}")"; date -u +"start %FT%TZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: $(uname -m) CPU"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/device.txt" 2>&1
# Every module the study imports, before minutes are spent: the GPU image lacks some (stage.sh
# brings optuna, pydantic and gguf; threadpoolctl needs the extra wheel of docs/study.md).
if ! "$PY" -c "import loradrift.cli, loradrift.study, loradrift.weights, loradrift.report, optuna, pydantic, gguf, statsmodels, jinja2" >> "$OUT/device.txt" 2>&1; then
  echo "missing a module: $(tail -1 "$OUT/device.txt")"; exit 3
fi
t0=$(date +%s)
# The study's own log (progress bars, phase times) comes back whole; the terminal gets its tail.
timeout --signal=INT --kill-after=20 "$LIMIT" "$PY" -m loradrift study --out "$WORK/out" "$@" > "$OUT/study.log" 2>&1
rc=$?
echo "study exit $rc after $(( $(date +%s) - t0 )) s (124: stopped at the ${LIMIT} s limit; run the same command again to resume)" | tee -a "$OUT/device.txt"
tail -n 25 "$OUT/study.log"
# The bundle: records, tables, figures, verdicts and report, no weights (loradrift bundle).
rm -rf "$WORK/bundle"
if "$PY" -m loradrift bundle "$WORK/bundle" --out "$WORK/out" > "$OUT/bundle.txt" 2>&1; then
  tar -C "$WORK" -czf "$WORK/study-bundle.tar.gz" bundle
  # What comes back: at most 8 files of 16 MiB each.
  split -b 15M -d "$WORK/study-bundle.tar.gz" "$OUT/study-bundle.tar.gz.part"
  ls -l "$OUT"/study-bundle.tar.gz.part* | tee -a "$OUT/bundle.txt"
else
  cat "$OUT/bundle.txt"
fi
exit $rc
