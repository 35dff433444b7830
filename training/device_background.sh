#!/bin/bash
# A training run that outlives one device call: the trainer runs detached (setsid) on the warm machine,
# and consecutive calls, each at most 10 minutes, watch it. One process for the whole run, so CUDA
# graphs are captured once and the data is packed once. The machine is given back 30 s after a call
# ends (or after 30 minutes held): chain the calls, and give the trainer a --stop-after that ends it
# before the last call does. A call that comes late finds a fresh machine, without the trainer and its
# unreturned state (abm-s3): where a run cannot afford that, make every call RETURN=weights.
#   first call:  RUN=name bash training/device_background.sh start [trainer options]
#                (carry [".carry"], plus ".train_carry" holding train_carry/RUN/state to resume)
#   later calls: RUN=name bash training/device_background.sh wait
# Several runs at once on a machine of several GPUs: GPU=k pins a run to GPU k; start them one after the
# other in one call and wait for them in parallel (RUN=a bash ... wait & RUN=b bash ... wait; wait).
# Every call waits up to WAIT seconds (default 560) for the trainer to finish, then hands back, per run:
# $OUT/RUN.log.jsonl and $OUT/RUN.tar.part-* (split at 15 MiB: the trainer's output; with RETURN=weights the
# latest weights in fp16, to resume elsewhere; its tail_engine once there is one; its best engine so far). A call
# returns at most 64 MiB in all, and the three together are about 83 MB: they go in that order while they fit,
# and what does not fit stays on the machine, named in the call's output. Fetch it from the warm machine with
# ONLY="best_engine" WAIT=0 RUN=name bash training/device_background.sh wait (ONLY: the parts to return).
# A device call copies the tracked tree plus the carry, 64 MiB in all. The tree holds the bundled engine (32 MiB),
# abm-paper's state_e100_fp16 (16 MiB) and the rest (11 MiB, on 2026-12-06); training needs only the data, so
# carry [".carry/crohme.tar.gz"] (8 MiB), and a resumed or warm-started state in .train_carry adds 17 MiB. That
# is over 64 MiB with the bundled engine in the tree: move it out for the call and put it back afterwards.
set -uo pipefail
RUN=${RUN:-abm}
WAIT=${WAIT:-560}
dir="runs/$RUN"
case "${1:-}" in
  start)
    shift
    mkdir -p /tmp/data "$dir"
    # once per machine: a second run started beside a first must not rewrite files the first is reading
    [ -d /tmp/data/crohme ] || tar -xzf .carry/crohme.tar.gz -C /tmp/data
    if [ -f ".train_carry/$RUN/state/state.json" ] && [ ! -f "$dir/state/state.json" ]; then
      cp -r ".train_carry/$RUN/state" "$dir/"          # resume a carried run (e.g. fp16 weights-only)
      [ -f ".train_carry/$RUN/log.jsonl" ] && cp ".train_carry/$RUN/log.jsonl" "$dir/"
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    # bash writes its own pid and execs the trainer, so the pid file names the trainer itself; the
    # options pass through as arguments ("$@"), never re-parsed by a shell.
    [ -n "${GPU:-}" ] && export CUDA_VISIBLE_DEVICES=$GPU
    setsid nohup bash -c 'echo $$ > "$0/pid"; exec env PYTHONUNBUFFERED=1 python3 -m training \
      --data /tmp/data/crohme --out "$0" --export-weights "$0/weights" "$@"' "$dir" "$@" \
      > "$dir/train.out" 2>&1 < /dev/null &
    sleep 5
    ;;
  wait) ;;
  *) echo "usage: RUN=name bash $0 start [trainer options] | wait" >&2; exit 2 ;;
esac
[ -f "$dir/pid" ] || { echo "no trainer was started in $dir on this machine (was it given back?)" >&2; exit 1; }
pid=$(cat "$dir/pid")
end=$((SECONDS + WAIT))
while [ $SECONDS -lt $end ] && kill -0 "$pid" 2>/dev/null; do sleep 5; done
if kill -0 "$pid" 2>/dev/null; then echo "trainer $pid still running"; else echo "trainer $pid has finished"; fi
tail -n "${TAIL:-40}" "$dir/train.out"
cp "$dir/log.jsonl" "$OUT/$RUN.log.jsonl" 2>/dev/null
# Most needed first: the weights to resume from, then the tail mean (lost with the machine), then the best
# engine (also returned by any earlier call in which it changed). 63 MiB leaves room for the log and tar headers.
room=$((63 * 1024 * 1024))
parts=()
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
add_part() {
  [ -e "$dir/$1" ] && wanted "$1" || return 0
  local size; size=$(du -sb "$dir/$1" | cut -f1)
  if [ "$size" -le "$room" ]; then parts+=("$1"); room=$((room - size))
  else echo "not returned (over the 64 MiB a call returns): $1; fetch it with ONLY=\"$1\" WAIT=0 RUN=$RUN bash $0 wait"; fi
}
add_part train.out
if [ "${RETURN:-engine}" = weights ] && wanted weights_fp16; then   # fp16 (17 MB): fits the next call's carry
  src="$dir/weights"; [ -d "$src" ] || src="$dir/state"    # finished, or the last saved epoch
  rm -rf "$dir/weights_fp16"
  [ -f "$src/state.json" ] && python3 -m training.checkpoint "$src" "$dir/weights_fp16" --fp16 > /dev/null \
    && add_part weights_fp16
fi
add_part tail_engine      # --average-from's mean, written when the trainer pauses or ends
add_part best_engine
[ ${#parts[@]} -gt 0 ] && tar -C "$dir" -cf - "${parts[@]}" | split -b 15M - "$OUT/$RUN.tar.part-"
exit 0
