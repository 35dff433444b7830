#!/bin/bash
# compute-sanitizer racecheck of the native CUDA search on real CROHME 2014 batches, several jobs at once
# (one process each, on one GPU), for issue 6. Needs abm_rt._C built with CUDA and ".carry" from
# ../shared/tools/stage-for-device in the call's carry.
#
# Why in parallel: racecheck runs the tiled tensor-core energy so slowly that a real 16-image batch did not
# finish in 320 s (tests/logs/2026-12-02_real_racecheck_h200/). Several small jobs side by side make it
# likelier that each one finishes inside a call.
# Each job is PRECISION:IMAGES:BATCH:MAXLEN:KERNELS. MAXLEN 0 decodes to the end; a positive MAXLEN caps
# the decode steps (the same kernels on the same real batch, fewer launches). KERNELS is "default" (small-batch
# kernels where N <= 32, tiled above) or "tiled" (small-batch kernels off).
# Features are made first without a sanitizer (tools/sanitize_native_search.py explains why), then only our
# kernels (namespace abm) run under racecheck, which also checks that the tokens are the same.
# RACE_BRANCH=r2l checks the R2L branch's search (eos to sos; the default decoding's second search) instead of the L2R's.
# Logs: $OUT/racecheck_<job>.log, and $OUT/racecheck_summary.txt (one line per job: rc, hazards line).
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T=${RACE_TIMEOUT:-420}
BRANCH=${RACE_BRANCH:-l2r}
JOBS=${RACE_JOBS:-"fp16:4:4:0:default fp16:4:4:0:tiled fp32:4:4:0:default int8:4:4:0:default \
fp16:16:16:12:tiled fp32:16:16:12:default"}
mkdir -p /tmp/data && { [ -d /tmp/data/crohme ] || tar -xzf .carry/crohme.tar.gz -C /tmp/data; }
only_ours=(); help=$(compute-sanitizer --help 2>&1); [[ $help == *--kernel-name* ]] && only_ours=(--kernel-name kns=abm)
run_job() {   # $1: the job spec
  local prec n b ml kern name tiled=()
  IFS=: read -r prec n b ml kern <<< "$1"
  name="real${n}_b${b}_${prec}_${kern}"; [ "$ml" != 0 ] && name+="_len$ml"; [ "$BRANCH" != l2r ] && name+="_$BRANCH"
  [ "$kern" = tiled ] && tiled=(--tiled-kernels)
  local cap=(); [ "$ml" != 0 ] && cap=(--max-len "$ml")
  python3 tools/sanitize_native_search.py features /tmp/data/crohme/2014 --limit "$n" --batch-size "$b" \
    --precision "$prec" --branch "$BRANCH" "${cap[@]}" --out "/tmp/$name.pt" > "$OUT/features_$name.log" 2>&1 \
    || { echo "$name: features failed" >> "$OUT/racecheck_summary.txt"; return; }
  local t0=$SECONDS
  timeout "$T" compute-sanitizer --tool racecheck "${only_ours[@]}" --print-limit 20 \
    python3 tools/sanitize_native_search.py search "/tmp/$name.pt" "${tiled[@]}" > "$OUT/racecheck_$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc after $((SECONDS - t0)) s; $(grep -E 'RACECHECK SUMMARY|same tokens' "$OUT/racecheck_$name.log" \
    | tr '\n' ' ')" >> "$OUT/racecheck_summary.txt"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/racecheck_device.txt"
for job in $JOBS; do run_job "$job" & done
wait
cat "$OUT/racecheck_summary.txt"
