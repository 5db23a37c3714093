#!/usr/bin/env bash
# The default experiment at larger scale on one GPU: device throughput, then time to beat tuned
# Adam for self-training and the Adam control (population 16, 8 ES pairs, 10 outer steps per compiled call). Writes JSON and the
# run directories under OUT (default runs/gpu). Usage: OUT=DIR MINUTES=3 bash scripts/gpu_ttb.sh
set -euo pipefail
OUT=${OUT:-runs/gpu}
MINUTES=${MINUTES:-3}
mkdir -p "$OUT"
export SELFOPT_CACHE="$OUT/cache"
python -c "import jax; print('devices:', jax.devices())"
python benchmarks/throughput.py --quick > "$OUT/throughput.json"
cat "$OUT/throughput.json"
python benchmarks/ttb.py --minutes "$MINUTES" --eval-minutes 0.5 --control \
  --set population=16 --set estimator.num_pairs=8 --set steps_per_call=10 --out "$OUT/ttb" > "$OUT/ttb.json"
python - "$OUT/ttb.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for arm in ("self", "control"):
    a = r[arm]
    print(arm, {k: a[k] for k in ("steps", "training_s", "time_to_beat_adam_s", "best_margin",
                                  "best_wins", "tasks")})
PY
