#!/usr/bin/env bash
# The one command to run on a GPU machine (benchmarks/gpu/README.md): every GPU figure of
# jdcl-ray in one run, under a hard time limit. Installs nothing; needs torch + torchvision with
# CUDA, numpy, scipy, scikit-learn, pyyaml, pyarrow, pillow (no Ray, no MLflow).
#   OUT      where the results go (default benchmarks/results/gpu)
#   FASHION  Fashion-MNIST's four .gz files (default data/fashion-mnist, carried with the tree)
#   LIMIT_S  the hard limit in seconds (default 540; the suite plans for 480)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results/gpu}"
FASHION="${FASHION:-data/fashion-mnist}"
LIMIT_S="${LIMIT_S:-540}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

if ! nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; then
    echo "run.sh: nvidia-smi failed: this is not a GPU machine (or its driver is missing)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run.sh: $PYTHON's torch sees no CUDA device" >&2
    exit 2
fi
for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ ! -f "$FASHION/$name.gz" ]; then
        echo "run.sh: $FASHION/$name.gz is missing: copy Fashion-MNIST's four .gz files there" \
            "(benchmarks/gpu/README.md)" >&2
        exit 2
    fi
done

export PYTHONUNBUFFERED=1
timeout --signal=TERM --kill-after=15 "$LIMIT_S" \
    "$PYTHON" -m jdcl_ray.bench gpu --output "$OUT" --fashion-root "$FASHION" \
    --budget-s "$((LIMIT_S - 60))" 2>&1 | tee "$OUT/stdout.txt"
code=${PIPESTATUS[0]}
nvidia-smi --query-gpu=name,temperature.gpu,power.draw,clocks.sm --format=csv >> "$OUT/stdout.txt" 2>&1
[ "$code" -eq 124 ] && echo "run.sh: stopped at the ${LIMIT_S} s limit; what was measured is in $OUT" >&2
exit "$code"
