#!/bin/bash
# One device call of a long training run (device calls last at most 10 minutes and the machine keeps
# nothing once given back): resume the state left in runs/ by the last call on this warm machine, or
# restore the carried one; train until the call's time is nearly spent; hand back the log and the
# exported state (EXPORT, below) through $OUT.
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
# EXPORT=compact: the state to carry to a fresh machine (fp32 weights, bf16 second moments: ~51 MB with
# AdamW); EXPORT=weights: the weights alone (~34 MB, enough to bundle an engine). A warm machine keeps
# runs/ between calls (it is ignored), so consecutive calls on it resume without carrying anything.
case "${EXPORT:-weights}" in
  compact) export_opt=(--export-compact "$OUT/state") ;;
  weights) export_opt=(--export-weights "$OUT/state") ;;
  *) export_opt=() ;;
esac
PYTHONUNBUFFERED=1 python3 -m training --data /tmp/data/crohme --out "runs/$RUN" \
  --stop-after "${STOP_AFTER:-520}" "${export_opt[@]}" "$@"
cp "runs/$RUN/log.jsonl" "$OUT/"
