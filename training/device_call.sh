#!/bin/bash
# One device call of a long training run (device calls last at most 10 minutes and the machine keeps
# nothing): restore the carried state, train until the call's time is nearly spent, and hand back the
# compact state (fp32 weights, bf16 second moments) and the log through $OUT.
#   carry: [".carry", ".train_carry"]   (.carry from ../shared/tools/stage-for-device)
#   command: RUN=name bash training/device_call.sh [trainer options]
set -euo pipefail
RUN=${RUN:-abm}
mkdir -p /tmp/data && tar -xzf .carry/crohme.tar.gz -C /tmp/data
mkdir -p "runs/$RUN"
if [ -f ".train_carry/$RUN/state/state.json" ] && [ ! -f "runs/$RUN/state/state.json" ]; then
  cp -r ".train_carry/$RUN/state" "runs/$RUN/"
  [ -f ".train_carry/$RUN/log.jsonl" ] && cp ".train_carry/$RUN/log.jsonl" "runs/$RUN/"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONUNBUFFERED=1 python3 -m training --data /tmp/data/crohme --out "runs/$RUN" \
  --stop-after "${STOP_AFTER:-520}" --export-compact "$OUT/state" "$@"
cp "runs/$RUN/log.jsonl" "$OUT/"
