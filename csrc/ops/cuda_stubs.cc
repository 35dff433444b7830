// The CUDA entry points of decode_step.h in a CPU-only build (compiled only when ABM_WITH_CUDA is
// not defined): the module still links and exposes them, and a call says why it cannot run.
#ifndef ABM_WITH_CUDA
#include <stdexcept>
#include <string>

#include "decode/beam_select.h"
#include "ops/decode_step.h"

namespace abm {
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string("abm_rt._C was built without CUDA: ") + what +
                           " needs a build with nvcc (reinstall with nvcc on PATH or CUDA_HOME set, "
                           "and ABM_RT_SKIP_CUDA_BUILD unset)");
}
}  // namespace

void decode_step_cuda(const DecoderWeights&, const StepTensors&, cudaStream_t) { no_cuda("decode_step_cuda"); }
void linear_cuda(const LinearWeights&, const float*, float*, int, bool, cudaStream_t) { no_cuda("linear_cuda"); }
void set_linear_rows_max_n(int) { no_cuda("set_linear_rows_max_n"); }
int linear_rows_max_n() { return 0; }
void set_energy_max_splits(int) { no_cuda("set_energy_max_splits"); }
int energy_max_splits() { return 1; }
int energy_splits(int, int, int) { return 1; }
void coverage_attention_cuda(const DecoderWeights&, const StepTensors&, cudaStream_t) {
  no_cuda("coverage_attention_cuda");
}

void beam_select_cuda(const BeamState&, cudaStream_t) { no_cuda("beam_select_cuda"); }
void gather_rows_cuda(const float*, const int32_t*, float*, int, int, cudaStream_t) { no_cuda("gather_rows_cuda"); }

}  // namespace abm
#endif  // ABM_WITH_CUDA
