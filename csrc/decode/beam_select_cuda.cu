// CUDA twin of beam_select.h: one block per image finds the k best candidates by k rounds of a
// block-wide arg-min (ties to the lower index, as the CPU twin), then one thread does the
// bookkeeping shared with the CPU (beam_select_impl.h). A second tiny kernel folds the per-image
// done flags into all_done, which the host reads every few steps (no sync per step), and advances the
// step counter when there is one (BeamState::step_ptr): it runs after every block has read t.
#include <cuda_runtime.h>

#include <cmath>

#include "../common/check.h"
#include "beam_select_impl.h"

namespace abm {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ bool better(float x, int ix, float y, int iy) {
  // Smaller cost first, ties to the lower index; NaN ranks as +inf, as in the CPU twin.
  x = isnan(x) ? INFINITY : x;
  y = isnan(y) ? INFINITY : y;
  return x < y || (x == y && ix < iy);
}

__global__ void beam_select_kernel(BeamState s) {
  __shared__ float top_cost[64];
  __shared__ int32_t top_idx[64];
  __shared__ float red_v[kThreads / 32];
  __shared__ int red_i[kThreads / 32];
  __shared__ int step_t;
  // t once per block, before any work, so that an inactive step (t >= max_steps) costs no top-k.
  if (threadIdx.x == 0) step_t = beam_step(s);
  __syncthreads();
  const int t = step_t;
  if (!beam_step_active(s, t)) return;   // block-uniform: no thread is left at a barrier
  const int b = blockIdx.x, k = s.k, V = s.V, C = k * V;
  const float* lp = s.log_probs + (size_t)b * k * V;
  const float* sc = s.score + (size_t)b * k;
  for (int rank = 0; rank < k; ++rank) {
    float best = INFINITY;
    int best_i = 0x7fffffff;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      bool taken = false;
      for (int q = 0; q < rank; ++q) taken |= (top_idx[q] == c);
      if (taken) continue;
      const float v = sc[c / V] - lp[c];
      if (better(v, c, best, best_i)) { best = v; best_i = c; }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (better(ov, oi, best, best_i)) { best = ov; best_i = oi; }
    }
    if (threadIdx.x % 32 == 0) { red_v[threadIdx.x / 32] = best; red_i[threadIdx.x / 32] = best_i; }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int wi = 1; wi < kThreads / 32; ++wi)
        if (better(red_v[wi], red_i[wi], best, best_i)) { best = red_v[wi]; best_i = red_i[wi]; }
      top_cost[rank] = best;
      top_idx[rank] = best_i;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) beam_bookkeeping(at_step(s, t), b, top_cost, top_idx);
}

__global__ void all_done_kernel(const uint8_t* done, int B, int32_t* all_done, int32_t* step_ptr) {
  __shared__ int any_open;
  if (threadIdx.x == 0) any_open = 0;
  __syncthreads();
  for (int b = threadIdx.x; b < B; b += blockDim.x)
    if (!done[b]) any_open = 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    *all_done = any_open ? 0 : 1;
    if (step_ptr) ++*step_ptr;         // stream order: every beam_select block has read t by now
  }
}

__global__ void gather_rows_kernel(const float* __restrict__ src, const int32_t* __restrict__ rows,
                                   float* __restrict__ dst, int N, int width) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long long)N * width) return;
  const int r = (int)(idx / width), c = (int)(idx % width);
  dst[idx] = src[(size_t)rows[r] * width + c];
}

}  // namespace

void beam_select_cuda(const BeamState& s, cudaStream_t stream) {
  ABM_CHECK(s.k >= 1 && s.k <= 64, "beam size must be in 1..64, got " << s.k);
  ABM_CHECK(!s.step_ptr || s.all_done, "BeamState.step_ptr needs all_done: the all_done kernel advances the step");
  if (s.B == 0 && !s.step_ptr) return;   // nothing to do (with step_ptr the step still advances)
  if (s.B > 0) {
    beam_select_kernel<<<s.B, kThreads, 0, stream>>>(s);
    ABM_CUDA_CHECK(cudaGetLastError());
  }
  if (s.all_done) {
    all_done_kernel<<<1, 256, 0, stream>>>(s.done, s.B, s.all_done, s.step_ptr);
    ABM_CUDA_CHECK(cudaGetLastError());
  }
}

void gather_rows_cuda(const float* src, const int32_t* rows, float* dst, int N, int width, cudaStream_t stream) {
  const long long total = (long long)N * width;
  if (total == 0) return;
  gather_rows_kernel<<<(int)((total + 255) / 256), 256, 0, stream>>>(src, rows, dst, N, width);
  ABM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace abm
