#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, from the repository root:
#
#   device tool: run(command="PARTS='tests bench' bash benchmarks/gpu_session.sh", carry=["data"])
#   then:        run(command="PARTS='profile train' bash benchmarks/gpu_session.sh", carry=["data", ".gpu-tools"])
#
# (two calls keep each under the device's 10-minute limit).  data/fashion-mnist/ must hold Fashion-MNIST's four
# .gz files (cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/); data/ is git-ignored.  Uses the
# machine's own torch, triton, pytest and pytest-benchmark: nothing is downloaded.
# Writes under $OUT (default runs/gpu): versions.txt, tests.log, bench.log, bench.json, train.log,
# metrics.json, profile.log.  The profile part runs .gpu-tools/profile_round.py (copy it there from
# ../shared/tools/; .gpu-tools/ is git-ignored) for both ops paths.
# PARTS (default "tests bench train"; "graphs" trains again with --cuda-graphs into train-graphs.log),
# ROUNDS (default 200) and DEVICE (default cuda) choose the work.
set -uo pipefail
OUT=${OUT:-runs/gpu}
PARTS=" ${PARTS:-tests bench train} "
ROUNDS=${ROUNDS:-200}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the package as setup.py lays it out (kernels/ is hyperfl_fast.kernels), run from here without pip or a build backend
if [ ! -e hyperfl_fast/kernels ]; then
  ln -s ../kernels hyperfl_fast/kernels && trap 'rm -f hyperfl_fast/kernels' EXIT
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__)"
} | tee "$OUT/versions.txt"
if [[ $PARTS == *" tests "* ]]; then
  python3 -m pytest -q tests 2>&1 | tee "$OUT/tests.log" | tail -n 3
fi
if [[ $PARTS == *" bench "* ]]; then
  python3 -m pytest -q benchmarks --benchmark-only --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=median,min,max,rounds 2>&1 | tee "$OUT/bench.log" | grep -E "^(test_|[0-9]+ passed|FAILED)"
fi
if [[ $PARTS == *" profile "* ]]; then
  if [ -f .gpu-tools/profile_round.py ]; then
    python3 .gpu-tools/profile_round.py triton torch 2>&1 | tee "$OUT/profile.log" | tail -n 40
  else
    echo "profile: copy ../shared/tools/profile_round.py into .gpu-tools/ and carry that folder"
  fi
fi
if [[ $PARTS == *" train "* ]]; then
  python3 -m hyperfl_fast.train --rounds "$ROUNDS" --device "$DEVICE" --output-dir /tmp/hyperfl-gpu-run --overwrite \
    >"$OUT/train.log" 2>&1
  tail -n 4 "$OUT/train.log"
  cp /tmp/hyperfl-gpu-run/metrics.json "$OUT/"
fi
if [[ $PARTS == *" graphs "* ]]; then
  python3 -m hyperfl_fast.train --rounds "$ROUNDS" --device "$DEVICE" --cuda-graphs \
    --output-dir /tmp/hyperfl-gpu-graphs --overwrite >"$OUT/train-graphs.log" 2>&1
  tail -n 4 "$OUT/train-graphs.log"
  cp /tmp/hyperfl-gpu-graphs/metrics.json "$OUT/metrics-graphs.json"
fi
