// CUDA twin of decode_step.h: the ABM decode step as seven launches on one stream, no host sync.
//
//   linear (U_h h) -> gru1 -> linear (W_a h^) -> coverage_energy -> softmax_context
//   -> linear x2 (W_c c, U_h2 h^) -> gru2 -> linear x2 (W_oc c, W_oh h) -> maxout -> linear (W_o)
//   -> log_softmax
//
// The attention part is two kernels: coverage_energy fuses the folded 11x11 coverage convolution
// with U_a F + W_a h^, tanh and the dot with v (one block per row and tile of positions; the row's
// coverage map, zero-padded by the kernel halo, and a chunk of the folded kernel sit in shared
// memory); softmax_context fuses the masked max-subtracted softmax, the context sum and the
// coverage update (one block per row). All accumulation is FP32.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "../common/check.h"
#include "decode_step.h"

namespace abm {
namespace {

constexpr int kChunk = 32;        // channels per shared-memory chunk of the coverage kernel (one per lane)
constexpr int kPosPerWarp = 4;    // positions each warp scores in coverage_energy
constexpr int kWarps = 8;
constexpr int kPosTile = kPosPerWarp * kWarps;

__device__ __forceinline__ float load_as_float(const float* p, int i) { return p[i]; }
__device__ __forceinline__ float load_as_float(const __half* p, int i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_as_float(const int8_t* p, int i) { return static_cast<float>(p[i]); }

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- linear: y[N, out] (+)= x[N, in] W^T * scale + bias -------------------------------------------
// 64 x 64 output tile per block, 16 x 16 threads, 4 x 4 outputs per thread, K in chunks of 16.
template <typename WT>
__global__ void linear_kernel(const float* __restrict__ x, const WT* __restrict__ w,
                              const float* __restrict__ scale, const float* __restrict__ bias,
                              float* __restrict__ y, int N, int out, int in, bool accumulate) {
  constexpr int T = 64, KC = 16;
  __shared__ float xs[KC][T + 1];
  __shared__ float ws[KC][T + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;       // tx: outputs, ty: rows
  const int row0 = blockIdx.y * T, col0 = blockIdx.x * T;
  const int tid = ty * 16 + tx;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < in; k0 += KC) {
    for (int e = tid; e < T * KC; e += 256) {
      const int rr = e / KC, kk = e % KC;             // consecutive threads walk k: coalesced rows
      const int gr = row0 + rr, gk = k0 + kk, gc = col0 + rr;
      xs[kk][rr] = (gr < N && gk < in) ? x[(size_t)gr * in + gk] : 0.f;
      ws[kk][rr] = (gc < out && gk < in) ? load_as_float(w, (int)((size_t)gc * in + gk)) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < KC; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + ty + 16 * i;
    if (r >= N) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + tx + 16 * j;
      if (c >= out) continue;
      float v = acc[i][j];
      if (scale) v *= scale[c];
      if (bias) v += bias[c];
      float* dst = y + (size_t)r * out + c;
      *dst = accumulate ? *dst + v : v;
    }
  }
}

// ---- GRU-1: h^ = z h + (1 - z) tanh(r (U_hh h) + yh), gates from U_h h and the token table -----------
__global__ void gru1_kernel(const float* __restrict__ gates, const float* __restrict__ gy_table,
                            const int32_t* __restrict__ tok, const float* __restrict__ h,
                            float* __restrict__ h_hat, int N, int n) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= N * n) return;
  const int r = idx / n, j = idx % n;
  const float* g = gates + (size_t)r * 3 * n;
  const float* gy = gy_table + (size_t)tok[r] * 3 * n;
  const float z = sigmoidf_(g[j] + gy[j]);
  const float rr = sigmoidf_(g[n + j] + gy[n + j]);
  const float c = tanhf(rr * g[2 * n + j] + gy[2 * n + j]);
  const float hv = h[idx];
  h_hat[idx] = z * hv + (1.f - z) * c;
}

// ---- GRU-2: h = z h^ + (1 - z) tanh(ch + r uh), gc = W_c c, gu = U_h2 h^ + b ---------------------------
__global__ void gru2_kernel(const float* __restrict__ gc, const float* __restrict__ gu,
                            const float* __restrict__ h_hat, float* __restrict__ h_out, int N, int n) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= N * n) return;
  const int r = idx / n, j = idx % n;
  const float* c = gc + (size_t)r * 3 * n;
  const float* u = gu + (size_t)r * 3 * n;
  const float z = sigmoidf_(c[j] + u[j]);
  const float rr = sigmoidf_(c[n + j] + u[n + j]);
  const float cand = tanhf(c[2 * n + j] + rr * u[2 * n + j]);
  h_out[idx] = z * h_hat[idx] + (1.f - z) * cand;
}

// ---- coverage energy -----------------------------------------------------------------------------------
// energy[r, l] = sum_c v_c tanh(uaf[img, l, c] + wa[r, c] + cov_b[c] + (cov_w[c] * beta_r)(l)) on valid l,
// -inf elsewhere. Block: one row, kPosTile consecutive positions; warp: kPosPerWarp positions; lane:
// one channel of the current chunk. Shared memory: the row's coverage with a zero halo of k/2 (cells
// outside the image's valid extent are zero too) and the chunk's kernel taps.
template <typename FT>
__global__ void coverage_energy_kernel(const FT* __restrict__ uaf, const float* __restrict__ wa,
                                       const FT* __restrict__ cov_w, const float* __restrict__ cov_b,
                                       const float* __restrict__ v, const float* __restrict__ coverage,
                                       const int32_t* __restrict__ row_image, const int32_t* __restrict__ hv,
                                       const int32_t* __restrict__ wv, float* __restrict__ energy,
                                       int H, int W, int d, int ks) {
  extern __shared__ float smem[];
  const int r = blockIdx.y;
  const int img = row_image[r];
  const int vh = hv[img], vw = wv[img];
  const int half = ks / 2, PW = W + 2 * half, PH = H + 2 * half, taps = ks * ks;
  float* beta = smem;                                  // [PH, PW]
  float* wchunk = smem + PH * PW;                      // [kChunk, taps]
  const int L = H * W;
  const float* cov_r = coverage + (size_t)r * L;
  for (int e = threadIdx.x; e < PH * PW; e += blockDim.x) {
    const int i = e / PW - half, j = e % PW - half;
    beta[e] = (i >= 0 && j >= 0 && i < vh && j < vw) ? cov_r[i * W + j] : 0.f;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int pos[kPosPerWarp];
  bool valid[kPosPerWarp];
  float e_acc[kPosPerWarp];
#pragma unroll
  for (int p = 0; p < kPosPerWarp; ++p) {
    pos[p] = blockIdx.x * kPosTile + warp * kPosPerWarp + p;
    const int i = pos[p] / W, j = pos[p] % W;
    valid[p] = pos[p] < L && i < vh && j < vw;
    e_acc[p] = 0.f;
  }
  const FT* uaf_img = uaf + (size_t)img * L * d;
  const float* wa_r = wa + (size_t)r * d;
  for (int c0 = 0; c0 < d; c0 += kChunk) {
    __syncthreads();                                   // the previous chunk is no longer read
    for (int e = threadIdx.x; e < kChunk * taps; e += blockDim.x) {
      const int cc = c0 + e / taps;
      wchunk[e] = cc < d ? load_as_float(cov_w, cc * taps + e % taps) : 0.f;
    }
    __syncthreads();
    const int c = c0 + lane;
    const bool cvalid = c < d;
    const float base = cvalid ? wa_r[c] + cov_b[c] : 0.f;
    const float vc = cvalid ? v[c] : 0.f;
    const float* wk = wchunk + lane * taps;            // stride taps (odd): no bank conflicts
#pragma unroll
    for (int p = 0; p < kPosPerWarp; ++p) {
      if (!valid[p]) continue;                         // warp-uniform
      const int i = pos[p] / W, j = pos[p] % W;
      float acc = base + load_as_float(uaf_img, (int)((size_t)pos[p] * d + (cvalid ? c : 0)));
      for (int dy = 0; dy < ks; ++dy) {
        const float* brow = beta + (i + dy) * PW + j;  // halo offsets cancel the -k/2 shift
        const float* krow = wk + dy * ks;
        for (int dx = 0; dx < ks; ++dx) acc = fmaf(krow[dx], brow[dx], acc);
      }
      e_acc[p] += warp_sum(vc * tanhf(acc));
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int p = 0; p < kPosPerWarp; ++p)
      if (pos[p] < L) energy[(size_t)r * L + pos[p]] = valid[p] ? e_acc[p] : -INFINITY;
  }
}

// ---- masked softmax, context and coverage update: one block per row ------------------------------------
template <typename FT>
__global__ void softmax_context_kernel(const float* __restrict__ energy, const FT* __restrict__ feats,
                                       const float* __restrict__ coverage, const int32_t* __restrict__ row_image,
                                       float* __restrict__ alpha, float* __restrict__ context,
                                       float* __restrict__ coverage_out, int L, int D) {
  // [L4] attention, L rounded up to a multiple of 4 and the tail zeroed: the compiler may read the
  // context loop's a_s[l] four at a time (seen under compute-sanitizer: a 16-byte read at a_s[64] for L = 65).
  extern __shared__ float a_s[];
  __shared__ float red[32];
  const int L4 = (L + 3) & ~3;
  const int r = blockIdx.x, img = row_image[r];
  const float* e = energy + (size_t)r * L;
  float mx = -INFINITY;
  for (int l = threadIdx.x; l < L; l += blockDim.x) mx = fmaxf(mx, e[l]);
  mx = warp_max(mx);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : -INFINITY;
    v = warp_max(v);
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  mx = red[0];
  __syncthreads();
  float sum = 0.f;
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const float p = e[l] == -INFINITY ? 0.f : expf(e[l] - mx);
    a_s[l] = p;
    sum += p;
  }
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f;
    v = warp_sum(v);
    if (threadIdx.x == 0) red[0] = v;
  }
  __syncthreads();
  const float inv = 1.f / red[0];
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const float a = a_s[l] * inv;
    a_s[l] = a;
    alpha[(size_t)r * L + l] = a;
    coverage_out[(size_t)r * L + l] = coverage[(size_t)r * L + l] + a;
  }
  for (int l = L + threadIdx.x; l < L4; l += blockDim.x) a_s[l] = 0.f;
  __syncthreads();
  const FT* f = feats + (size_t)img * L * D;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {   // consecutive threads: consecutive channels
    float acc = 0.f;
    for (int l = 0; l < L; ++l) {
      const float a = a_s[l];
      if (a != 0.f) acc = fmaf(a, load_as_float(f, (int)((size_t)l * D + c)), acc);
    }
    context[(size_t)r * D + c] = acc;
  }
}

// ---- output layer pieces ---------------------------------------------------------------------------
__global__ void add_token_rows_kernel(float* __restrict__ y, const float* __restrict__ table,
                                      const int32_t* __restrict__ tok, int N, int m) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= N * m) return;
  const int r = idx / m, j = idx % m;
  y[idx] += table[(size_t)tok[r] * m + j];
}

__global__ void maxout_kernel(const float* __restrict__ x, float* __restrict__ y, int N, int m) {
  const int half = m / 2;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= N * half) return;
  const int r = idx / half, k = idx % half;
  y[idx] = fmaxf(x[(size_t)r * m + 2 * k], x[(size_t)r * m + 2 * k + 1]);
}

// One warp per row: log_softmax in place.
__global__ void log_softmax_kernel(float* __restrict__ x, int N, int K) {
  const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= N) return;
  float* row = x + (size_t)r * K;
  float mx = -INFINITY;
  for (int k = lane; k < K; k += 32) mx = fmaxf(mx, row[k]);
  mx = warp_max(mx);
  float s = 0.f;
  for (int k = lane; k < K; k += 32) s += expf(row[k] - mx);
  s = warp_sum(s);
  const float lse = mx + logf(s);
  for (int k = lane; k < K; k += 32) row[k] -= lse;
}

inline int blocks_for(long long n, int threads) { return (int)((n + threads - 1) / threads); }

size_t energy_smem_bytes(int H, int W, int ks) {
  const int half = ks / 2;
  return sizeof(float) * ((size_t)(H + 2 * half) * (W + 2 * half) + (size_t)kChunk * ks * ks);
}

// The dynamic shared memory one kernel has been allowed so far, per device (the attribute belongs to
// the kernel's module in each device's context).
struct SmemLimit {
  static constexpr int kDevices = 64;
  std::mutex mu;
  std::atomic<int> bytes[kDevices]{};
};

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device. Above the 48 KiB
// default this needs cudaFuncSetAttribute, a host call that is issued only when the request exceeds
// what was set before: not once per step, and not while a CUDA graph is captured after a warm-up
// step. The mutex keeps concurrent callers from lowering a limit another thread has just raised.
void allow_dynamic_smem(const void* kernel, size_t bytes, SmemLimit& limit) {
  if (bytes <= 48 * 1024) return;
  int dev = 0;
  ABM_CUDA_CHECK(cudaGetDevice(&dev));
  auto set = [&] {
    ABM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  };
  if (dev < 0 || dev >= SmemLimit::kDevices) {   // not tracked: set every time, as before
    set();
    return;
  }
  std::atomic<int>& allowed = limit.bytes[dev];
  if (allowed.load(std::memory_order_acquire) >= (int)bytes) return;
  std::lock_guard<std::mutex> lock(limit.mu);
  if (allowed.load(std::memory_order_relaxed) >= (int)bytes) return;
  set();
  allowed.store((int)bytes, std::memory_order_release);
}

template <typename FT>
void launch_attention(const DecoderWeights& w, const StepTensors& t, cudaStream_t s) {
  static SmemLimit energy_limit, context_limit;   // one pair per instantiation (per kernel)
  const int L = t.H * t.W;
  const size_t smem = energy_smem_bytes(t.H, t.W, w.ksize);
  allow_dynamic_smem(reinterpret_cast<const void*>(coverage_energy_kernel<FT>), smem, energy_limit);
  dim3 grid(blocks_for(L, kPosTile), t.N);
  coverage_energy_kernel<FT><<<grid, kWarps * 32, smem, s>>>(
      static_cast<const FT*>(t.uaf), t.wa, static_cast<const FT*>(w.cov_w), w.cov_b, w.v, t.coverage,
      t.row_image, t.hv, t.wv, t.energy, t.H, t.W, w.d, w.ksize);
  ABM_CUDA_CHECK(cudaGetLastError());
  const size_t smem2 = sizeof(float) * (size_t)((L + 3) & ~3);
  allow_dynamic_smem(reinterpret_cast<const void*>(softmax_context_kernel<FT>), smem2, context_limit);
  softmax_context_kernel<FT><<<t.N, 256, smem2, s>>>(t.energy, static_cast<const FT*>(t.feats), t.coverage,
                                                     t.row_image, t.alpha, t.context, t.coverage_out, L, w.D);
  ABM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void linear_cuda(const LinearWeights& lin, const float* x, float* y, int N, bool accumulate, cudaStream_t s) {
  if (N == 0) return;
  dim3 grid(blocks_for(lin.out, 64), blocks_for(N, 64)), block(16, 16);
  switch (lin.type) {
    case DType::F32:
      linear_kernel<float><<<grid, block, 0, s>>>(x, static_cast<const float*>(lin.w), nullptr, lin.bias, y, N,
                                                   lin.out, lin.in, accumulate);
      break;
    case DType::F16:
      linear_kernel<__half><<<grid, block, 0, s>>>(x, static_cast<const __half*>(lin.w), nullptr, lin.bias, y, N,
                                                   lin.out, lin.in, accumulate);
      break;
    case DType::I8:
      linear_kernel<int8_t><<<grid, block, 0, s>>>(x, static_cast<const int8_t*>(lin.w), lin.scale, lin.bias, y,
                                                   N, lin.out, lin.in, accumulate);
      break;
  }
  ABM_CUDA_CHECK(cudaGetLastError());
}

void coverage_attention_cuda(const DecoderWeights& w, const StepTensors& t, cudaStream_t s) {
  if (t.N == 0) return;
  if (w.feat_type == DType::F16) {
    launch_attention<__half>(w, t, s);
  } else {
    ABM_CHECK(w.feat_type == DType::F32, "feat_type must be F32 or F16");
    launch_attention<float>(w, t, s);
  }
}

void decode_step_cuda(const DecoderWeights& w, const StepTensors& t, cudaStream_t s) {
  validate(w, t);
  if (t.N == 0) return;
  const int N = t.N, n = w.n, m = w.m;
  const int th = 256;
  linear_cuda(w.U_h, t.hidden, t.gates, N, false, s);
  gru1_kernel<<<blocks_for((long long)N * n, th), th, 0, s>>>(t.gates, w.gy_table, t.prev_token, t.hidden,
                                                              t.h_hat, N, n);
  ABM_CUDA_CHECK(cudaGetLastError());
  linear_cuda(w.W_a, t.h_hat, t.wa, N, false, s);
  coverage_attention_cuda(w, t, s);
  linear_cuda(w.W_c, t.context, t.gates2, N, false, s);
  linear_cuda(w.U_h2, t.h_hat, t.gates2u, N, false, s);
  gru2_kernel<<<blocks_for((long long)N * n, th), th, 0, s>>>(t.gates2, t.gates2u, t.h_hat, t.hidden_out, N, n);
  ABM_CUDA_CHECK(cudaGetLastError());
  linear_cuda(w.W_oc, t.context, t.out_pre, N, false, s);
  linear_cuda(w.W_oh, t.hidden_out, t.out_pre, N, true, s);
  add_token_rows_kernel<<<blocks_for((long long)N * m, th), th, 0, s>>>(t.out_pre, w.oy_table, t.prev_token, N, m);
  ABM_CUDA_CHECK(cudaGetLastError());
  float* maxed = t.gates;                      // [N, m / 2] fits in the [N, 3n] scratch, free by now
  maxout_kernel<<<blocks_for((long long)N * (m / 2), th), th, 0, s>>>(t.out_pre, maxed, N, m);
  ABM_CUDA_CHECK(cudaGetLastError());
  linear_cuda(w.W_o, maxed, t.log_probs, N, false, s);
  log_softmax_kernel<<<blocks_for((long long)N * 32, th), th, 0, s>>>(t.log_probs, N, w.K);
  ABM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace abm
