#!/bin/bash
# Device check of the native decoder (issue 6), in one device call: build abm_rt._C with CUDA, run the op
# and search tests on the GPU against the PyTorch reference (CUDA-graph replay and compaction included),
# compute-sanitizer memcheck + racecheck on a subset, then, with PROFILE=1, the per-kernel time of one
# search step (also with the tiled kernels only, the small-batch ones off, at batch 1 and 3), and with BENCH=1 the decoders benchmark on CROHME 2014 (needs ".carry" from
# ../shared/tools/stage-for-device in the call's carry).
# TESTS=0 skips the tests and the sanitizers (a later call on the same warm machine, for timings only);
# REAL=1 adds memcheck (REAL_MEM images, 32; REAL_BATCH a batch, 16) of the recognizer and racecheck (REAL_RACE
# images, 16, in batches of REAL_RACE_BATCH, 16, for each of REAL_PRECISIONS) of the native search alone on their real encoder features, our kernels
# only (tools/sanitize_native_search.py; needs ".carry"). 0 images skips that tool.
# GDB="-k EXPR" adds a cuda-gdb host backtrace of the tests EXPR selects (how the raising-test segfault
# was found: tests/logs/2026-12-02_tc_energy_h200/).
# Logs go to $OUT (commit them under tests/logs/; the benchmark JSON under benchmarks/results/).
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # tools/*.py import abm_rt from the tree (not pip-installed there)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
SANITIZE_K="cuda and (step_fp32 and full-grid1-3 or coverage_attention and full-grid1-fp16 or linear and 113x128x5-int8) \
  or cuda_graph_same_as_eager and 4.0-4-3-3 or compaction and 5.0-0-3-10-cuda \
  or linear and 70x300x17-int8-cuda-few-rows or coverage_attention and split-energy-full-grid1-fp16-cuda \
  or small_batch_kernels_same and 4.0-4-10"
sanitize() {   # $1: memcheck or racecheck, $2: the tests (-k)
  compute-sanitizer --tool "$1" --print-limit 20 python3 -m pytest -q tests/test_native_ops.py \
    tests/test_native_search.py -k "$2" > "$OUT/sanitizer_$1.log" 2>&1
  echo "$1 rc=$?"; tail -3 "$OUT/sanitizer_$1.log"
}
if [ "${TESTS:-1}" = 1 ]; then   # TESTS=0: only the build and what PROFILE / BENCH ask for
  python3 -X faulthandler -m pytest -q -rs tests/test_native_ops.py tests/test_native_search.py 2>&1 \
    | tee "$OUT/native_tests.log" | tail -6
  sanitize memcheck "$SANITIZE_K"
  # the trainer's CUDA-graph tests (graph step = eager step; replays draw fresh dropout and augmentation)
  python3 -m pytest -q -rs tests/test_trainer.py -k graph 2>&1 | tee "$OUT/trainer_graph_tests.log" | tail -3
fi
if [ "${PROFILE:-0}" = 1 ]; then   # per-kernel time of one search step (batch 1 and 256 x beam 10, two grids)
  python3 benchmarks/profile_native_step.py --device cuda --out "$OUT/profile_native_step.json" 2>&1 \
    | grep -v USDT | tail -12 | cut -c1-400
  python3 benchmarks/profile_native_step.py --device cuda --tiled-kernels --shapes 10x6x24,30x6x24 \
    --out "$OUT/profile_native_step_tiled.json" 2>&1 | grep -v USDT | tail -7 | cut -c1-400
fi
if [ "${BENCH:-0}" = 1 ]; then
  mkdir -p /tmp/data && tar -xzf .carry/crohme.tar.gz -C /tmp/data
  # Issue 6's figures in one run: PyTorch decoder vs native FP16 (eager with compaction, without it, and
  # from CUDA graphs), batch 1 (first 100 images) and batch 256 (all 986), beam 10. BENCH_CONFIGS narrows it.
  python3 benchmarks/bench_decoders.py --data /tmp/data/crohme/2014 --device cuda --batches 1,256 --limit-batch1 100 \
    --configs "${BENCH_CONFIGS:-pytorch:fp32,native:fp16,native:fp16:fp32:tiled,native:fp16:fp32:nocompact,native:fp16:fp32:graph,native:fp16:fp32:graph+tiled,native:int8}" \
    --out "$OUT/decoders_bench.json" 2>&1 | tee "$OUT/decoders_bench.log" | tail -12
fi
# racecheck last: the slowest part (minutes for the default subset); RACE_K narrows it
[ "${TESTS:-1}" = 1 ] && sanitize racecheck "${RACE_K:-$SANITIZE_K}"
if [ "${REAL:-0}" = 1 ]; then   # memcheck + racecheck of the native CUDA search on real CROHME images
  mkdir -p /tmp/data && [ -d /tmp/data/crohme ] || tar -xzf .carry/crohme.tar.gz -C /tmp/data
  # Only our kernels are instrumented (names in namespace abm): cuDNN's encoder kernels would take most of
  # the time and are not ours to check. Without the option (an older compute-sanitizer) everything is.
  # (the help is read whole first: "| grep -q" under pipefail fails whenever grep exits before the writer)
  only_ours=(); help=$(compute-sanitizer --help 2>&1); [[ $help == *--kernel-name* ]] && only_ours=(--kernel-name kns=abm)
  if [ "${REAL_MEM:-32}" != 0 ]; then   # memcheck: the whole recognizer (encoder + native search), REAL_MEM images
    timeout "${REAL_TIMEOUT:-240}" compute-sanitizer --tool memcheck "${only_ours[@]}" --print-limit 20 \
      python3 -m abm_rt eval /tmp/data/crohme/2014 --limit "${REAL_MEM:-32}" --device cuda \
      --batch-size "${REAL_BATCH:-16}" --decoder native --omit-references --json "$OUT/sanitizer_real_memcheck.json" \
      > "$OUT/sanitizer_real_memcheck.log" 2>&1
    echo "real images memcheck (${only_ours[*]:-all kernels}) rc=$?"; tail -2 "$OUT/sanitizer_real_memcheck.log"
  fi
  if [ "${REAL_RACE:-16}" != 0 ]; then
    # racecheck breaks inside PyTorch/cuDNN's part of a recognizer process, with the PyTorch decoder too
    # (tests/logs/2026-12-02_real_sanitizer_h200/): the features are made first, without a sanitizer, and
    # only the native search runs under racecheck, which also checks it still gives the same tokens.
    # Racecheck is slow on the tiled tensor-core energy: on the H200 a 16-image batch did not finish in 320 s, nor a
    # 2-image one in 62 s, while 4 images at batch 1 took under a minute (tests/logs/2026-12-02_real_racecheck_h200/).
    # REAL_RACE_BATCH images per batch (default 16) and REAL_TIMEOUT let a call give it the time it needs.
    for prec in ${REAL_PRECISIONS:-fp32 fp16}; do
      python3 tools/sanitize_native_search.py features /tmp/data/crohme/2014 --limit "${REAL_RACE:-16}" \
        --batch-size "${REAL_RACE_BATCH:-16}" --precision "$prec" --out "/tmp/real_feats_$prec.pt" | tail -1
      timeout "${REAL_TIMEOUT:-240}" compute-sanitizer --tool racecheck "${only_ours[@]}" --print-limit 20 \
        python3 tools/sanitize_native_search.py search "/tmp/real_feats_$prec.pt" \
        > "$OUT/sanitizer_real_racecheck_$prec.log" 2>&1
      echo "real features racecheck $prec (${only_ours[*]:-all kernels}) rc=$?"; tail -2 "$OUT/sanitizer_real_racecheck_$prec.log"
    done
    # batch 1, where the small-batch kernels (few-rows linear, split energy; the defaults) run
    python3 tools/sanitize_native_search.py features /tmp/data/crohme/2014 --limit 4 --batch-size 1 --precision fp16 \
      --out /tmp/real_feats_b1.pt | tail -1
    timeout "${REAL_TIMEOUT:-240}" compute-sanitizer --tool racecheck "${only_ours[@]}" --print-limit 20 \
      python3 tools/sanitize_native_search.py search /tmp/real_feats_b1.pt \
      > "$OUT/sanitizer_real_racecheck_b1_small.log" 2>&1
    echo "real features racecheck b1 small-batch kernels rc=$?"; tail -2 "$OUT/sanitizer_real_racecheck_b1_small.log"
  fi
fi
if [ -n "${GDB:-}" ]; then   # GDB="-k EXPR": a host backtrace of a crashing test (cuda-gdb debugs host code too)
  timeout 120 cuda-gdb -q -batch -ex run -ex bt --args python3 -m pytest -q -x tests/test_native_ops.py \
    tests/test_native_search.py $GDB > "$OUT/gdb.log" 2>&1; echo "gdb rc=$?"
  grep -E "^#[0-9]+" "$OUT/gdb.log" | head -30 | cut -c1-300
fi
