#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, from the repository root, in one device call (< 10 min):
#
#   device tool: run(command="bash benchmarks/gpu_session.sh", carry=["data", ".whl"], timeout_s=600)
#
# data/fashion-mnist/ must hold Fashion-MNIST's four .gz files (cp /usr/share/datasets/fashion-mnist/*.gz
# data/fashion-mnist/; data/ is git-ignored).  Uses the machine's own torch, triton and pytest: nothing is
# downloaded.  Runs benchmarks/gpu_acceptance.py, which writes report.md (every GPU target of issue 17 with
# pass/fail) and results.json under $OUT (default runs/gpu), then, if time is left, the benchmark suite into
# bench.json.  BUDGET (seconds, default 480) bounds the acceptance run.
# The DP benchmarks and tests need opacus, which the GPU image lacks: carry its wheel in .whl/ (git-ignored),
#   pip download --no-deps -d .whl opacus==1.6.0      (here; then carry=["data", ".whl"])
# and it is installed below; without it those cases are skipped.
set -uo pipefail
OUT=${OUT:-runs/gpu}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
  | tee "$OUT/versions.txt"
python3 benchmarks/gpu_acceptance.py --out "$OUT" --budget "${BUDGET:-480}"
if [ $(( $(date +%s) - start )) -lt 500 ]; then
  timeout $(( 570 - ($(date +%s) - start) )) python3 -m pytest -q benchmarks --benchmark-only \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,min,max,rounds -k "not reference" \
    2>&1 | tail -n 60 > "$OUT/bench.log"
fi
