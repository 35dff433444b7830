#!/bin/bash
# Device check of the native decode step (issue 6): build abm_rt._C with CUDA, run the op tests on the
# GPU against the PyTorch reference, and compute-sanitizer memcheck + racecheck on a subset.
# Logs go to $OUT (commit them under tests/logs/).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -m pytest -q -rs tests/test_native_ops.py -k "not validate_names" 2>&1 | tee "$OUT/native_ops.log" | tail -6
python3 -X faulthandler -c "
import abm_rt._C as C
try:
    C.decode_step(C.DecoderWeights(), C.StepTensors(), 'cpu')
except ValueError as e:
    print('validate raised ValueError:', e)" > "$OUT/validate_alone.log" 2>&1; echo "validate alone rc=$?"; tail -3 "$OUT/validate_alone.log"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --print-limit 20 python3 -m pytest -q tests/test_native_ops.py \
    -k "cuda and (step_fp32 and full-grid1-3 or coverage_attention and full-grid1-fp16 or linear and 113x128x5-int8)" \
    > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool rc=$?"; tail -3 "$OUT/sanitizer_$tool.log"
done
