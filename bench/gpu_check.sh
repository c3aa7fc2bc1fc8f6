#!/usr/bin/env bash
# The CUDA checks in one go, sized to finish within about 8 minutes on one GPU:
#   1. the test suite's CUDA tests (elsewhere they are skipped),
#   2. the ensemble benchmark on CUDA (copy-500 and psMNIST, M up to 256),
#   3. a short main.py language-model run on CUDA (a generated corpus, one small epoch),
#   4. a short ensemble sweep on CUDA with --ensemble auto.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (default: gpu-check/; every log is kept there)
set -u
out=${1:-gpu-check}
mkdir -p "$out"
python - <<'PY' | tee "$out/device.txt"
import datetime, torch
print(datetime.date.today(), torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
PY
timeout 150 python -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tail -n 20 | tee "$out/tests.txt"
timeout 200 python bench/ensemble_speed.py --device cuda --members 1,64,256 --batches 5 2>&1 \
    | tee "$out/ensemble_speed.txt"
python - "$out/corpus" <<'PY'
import random, sys
from pathlib import Path
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
words = [f"w{i}" for i in range(500)]
for name, lines in (("train.txt", 4000), ("valid.txt", 400), ("test.txt", 400)):
    text = "\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(lines))
    (folder / name).write_text(text + "\n")
PY
timeout 90 python main.py --data "$out/corpus" --device cuda --epochs 1 --emsize 64 --nhid 128 \
    --nlayers 2 --batch_size 20 --bptt 35 --save "$out/lm/model.pt" --overwrite --no-progress 2>&1 \
    | tail -n 15 | tee "$out/main.txt"
timeout 90 python -m awd_nonnormal.tasks sweep --task copy --T 100 --n-train 512 --n-val 64 \
    --epochs 1 --models chain --lr 1e-4,5e-5 --seeds 1:4 --ensemble auto --device cuda \
    --out "$out/sweep" --no-progress 2>&1 | tail -n 8 | tee "$out/sweep.txt"
