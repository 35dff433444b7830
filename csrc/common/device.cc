// cuda_available(): the one function that asks the CUDA runtime whether a device is present. It
// lives apart from the CPU twin so that only this file (and the CUDA sources) need the runtime.
#include "ops/decode_step.h"

namespace abm {

bool cuda_available() {
#ifdef ABM_WITH_CUDA
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error for later callers
    return false;
  }
  return count > 0;
#else
  return false;
#endif
}

}  // namespace abm
