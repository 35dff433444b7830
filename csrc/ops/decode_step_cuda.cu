// CUDA twin of decode_step.h: the ABM decode step as seven launches on one stream, no host sync.
//
//   linear (U_h h) -> gru1 -> linear (W_a h^) -> coverage_energy -> softmax_context
//   -> linear x2 (W_c c, U_h2 h^) -> gru2 -> linear x2 (W_oc c, W_oh h) -> maxout -> linear (W_o)
//   -> log_softmax
//
// The attention part is two kernels: coverage_energy fuses the folded 11x11 coverage convolution
// (an im2col GEMM on the tensor cores, split FP16 operands, FP32 accumulation) with U_a F + W_a h^,
// tanh and the dot with v (one block per row and tile of positions; the row's coverage map,
// zero-padded by the kernel halo, its im2col tile and a chunk of the folded kernel sit in shared
// memory); softmax_context fuses the masked max-subtracted softmax, the context sum and the
// coverage update (one block per row). All accumulation is FP32.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "../common/check.h"
#include "decode_step.h"

namespace abm {
namespace {

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

inline int blocks_for(long long n, int threads) { return (int)((n + threads - 1) / threads); }

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

// ---- linear for few rows (N <= 32: batch 1-3 x beam 10): one warp per output ------------------------
// The 64 x 64 tiled kernel above leaves most of the GPU idle when N is small: at batch 1 x beam 10 the
// W_c product (768 x 684) is 12 blocks, each walking K in 43 synchronised chunks; on an H200 the FP16 step's
// seven linears took 231 us of its 449 us of kernel time (profile_native_step_H200_tc-energy_2026-12-02.json). Here each warp reads one weight row once,
// coalesced, and keeps one FP32 accumulator per input row in registers (MAXN of them); x [N, in] is
// small (<= 32 x 684 floats) and stays in L1/L2. Lane-strided partial sums, then a butterfly sum.
constexpr int kRowsWarps = 8;

template <typename WT, int MAXN>
__global__ void __launch_bounds__(kRowsWarps * 32)
linear_rows_kernel(const float* __restrict__ x, const WT* __restrict__ w, const float* __restrict__ scale,
                   const float* __restrict__ bias, float* __restrict__ y, int N, int out, int in,
                   bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * kRowsWarps + (threadIdx.x >> 5);
  if (o >= out) return;                                // whole warps leave: no shuffle is left half-empty
  const WT* wr = w + (size_t)o * in;
  float acc[MAXN];
#pragma unroll
  for (int r = 0; r < MAXN; ++r) acc[r] = 0.f;
  for (int i = lane; i < in; i += 32) {
    const float wv = load_as_float(wr, i);
#pragma unroll
    for (int r = 0; r < MAXN; ++r)
      if (r < N) acc[r] = fmaf(wv, x[(size_t)r * in + i], acc[r]);
  }
  const float sc = scale ? scale[o] : 1.f, b = bias ? bias[o] : 0.f;
#pragma unroll
  for (int r = 0; r < MAXN; ++r) {
    if (r >= N) break;                                 // N is uniform across the warp
    const float v = warp_sum(acc[r]) * sc + b;
    if (lane == 0) {
      float* dst = y + (size_t)r * out + o;
      *dst = accumulate ? *dst + v : v;
    }
  }
}

template <typename WT>
void launch_linear_rows(const LinearWeights& lin, const WT* w, const float* x, float* y, int N, bool accumulate,
                        cudaStream_t s) {
  const dim3 grid(blocks_for(lin.out, kRowsWarps)), block(kRowsWarps * 32);
  const float* scale = lin.type == DType::I8 ? lin.scale : nullptr;
  if (N <= 8)
    linear_rows_kernel<WT, 8><<<grid, block, 0, s>>>(x, w, scale, lin.bias, y, N, lin.out, lin.in, accumulate);
  else if (N <= 16)
    linear_rows_kernel<WT, 16><<<grid, block, 0, s>>>(x, w, scale, lin.bias, y, N, lin.out, lin.in, accumulate);
  else
    linear_rows_kernel<WT, 32><<<grid, block, 0, s>>>(x, w, scale, lin.bias, y, N, lin.out, lin.in, accumulate);
}

// Up to which N linear_cuda takes the few-rows kernel (batch 1-3 x beam 10). On by default since it passed the
// GPU tests, memcheck and racecheck (tests/logs/2026-12-02_small_batch_kernels_h200/) and, with the energy split,
// gave the same tokens 15 % faster at batch 1 and 7 % at batch 256 (H200,
// benchmarks/results/decoders_H200_small-batch_2026-12-02.json); set_linear_rows_max_n(0) turns it off.
std::atomic<int> g_linear_rows_max_n{32};
constexpr int kLinearRowsLimit = 32;
// The energy's channel split (energy_splits below): on (up to 16 slices) by default, checked as above;
// set_energy_max_splits(1) turns it off.
std::atomic<int> g_energy_max_splits{16};
constexpr int kMaxEnergySplits = 16;
constexpr long long kEnergyTargetBlocks = 264;

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

// ---- coverage energy (tensor cores) ------------------------------------------------------------------
// energy[r, l] = sum_c v_c tanh(uaf[img, l, c] + wa[r, c] + cov_b[c] + (cov_w[c] * beta_r)(l)) on valid l,
// -inf elsewhere.
//
// The folded k x k coverage convolution is a GEMM per row: A[l, tap] = beta_r at position l shifted by
// the tap (im2col of the zero-haloed coverage map), B[tap, c] = cov_w[c, tap], taps padded to KP (a
// multiple of 16). It runs on the tensor cores (WMMA 16x16x16, FP16 inputs, FP32 accumulation) with each
// operand split into an FP16 high part and an FP16 residual: A = A_hi + A_lo, B = B_hi + B_lo. Products of
// two FP16 numbers are exact in FP32, so A_hi B_hi + A_lo B_hi + A_hi B_lo carries ~22 bits of each
// operand: the result matches the FP32 convolution to accumulation order, not to FP16 rounding. FP16
// weights (the FP16 / INT8 decoders) are exact in FP16, so B_lo is zero there and skipped.
//
// Block: one row, kTcPos positions (one 16-position m-tile per warp). Shared memory: the row's coverage
// with a zero halo of k/2 (cells outside the image's valid extent are zero too), wa + cov_b and v, the
// A_hi / A_lo tile, one kTcChan-channel chunk of B_hi (and B_lo), and one 16x16 FP32 staging tile per warp
// for the epilogue: + uaf + wa + cov_b, tanh, times v, summed over channels. A warp whose 16 positions all
// lie outside the image skips its MMAs.
constexpr int kTcWarps = 8;
constexpr int kTcPos = 16 * kTcWarps;   // positions per block
constexpr int kTcChan = 32;             // channels per staged chunk of B (two n-tiles)
constexpr int kTcPadH = 8;              // halves of padding per A / B row: ldmatrix rows hit distinct banks
constexpr int kTcLdC = 20;              // floats per row of a staging tile (a multiple of 4, as WMMA needs)

inline int tc_taps_padded(int ks) { return (ks * ks + 15) / 16 * 16; }
__host__ __device__ inline size_t align128(size_t n) { return (n + 127) / 128 * 128; }

struct TcLayout {   // byte offsets into the dynamic shared memory of coverage_energy_tc_kernel
  size_t beta, base, vvec, a_hi, a_lo, b_hi, b_lo, cstage, total;
  __host__ __device__ TcLayout(int H, int W, int ks, int d, int KP, bool split_b) {
    const int half = ks / 2;
    const size_t lda = KP + kTcPadH;
    beta = 0;
    base = align128(beta + sizeof(float) * (size_t)(H + 2 * half) * (W + 2 * half));
    vvec = align128(base + sizeof(float) * d);
    a_hi = align128(vvec + sizeof(float) * d);
    a_lo = align128(a_hi + 2 * lda * kTcPos);
    b_hi = align128(a_lo + 2 * lda * kTcPos);
    b_lo = align128(b_hi + 2 * lda * kTcChan);
    cstage = align128(b_lo + (split_b ? 2 * lda * kTcChan : 0));
    total = align128(cstage + sizeof(float) * kTcWarps * 16 * kTcLdC);
  }
};

// x as an FP16 high part (.x) and the FP16 rounding of what it leaves over (.y).
__device__ __forceinline__ __half2 split_half(float x) {
  const __half hi = __float2half_rn(x);
  return __halves2half2(hi, __float2half_rn(x - __half2float(hi)));
}

template <typename FT>
__global__ void __launch_bounds__(kTcWarps * 32)
coverage_energy_tc_kernel(const FT* __restrict__ uaf, const float* __restrict__ wa, const FT* __restrict__ cov_w,
                          const float* __restrict__ cov_b, const float* __restrict__ v,
                          const float* __restrict__ coverage, const int32_t* __restrict__ row_image,
                          const int32_t* __restrict__ hv, const int32_t* __restrict__ wv,
                          float* __restrict__ energy, int H, int W, int d, int ks, int KP, int splits) {
  using namespace nvcuda;
  constexpr bool kSplitB = std::is_same<FT, float>::value;   // FP32 weights need their residual too
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const TcLayout lay(H, W, ks, d, KP, kSplitB);
  float* beta = reinterpret_cast<float*>(smem_raw + lay.beta);
  float* base = reinterpret_cast<float*>(smem_raw + lay.base);
  float* vvec = reinterpret_cast<float*>(smem_raw + lay.vvec);
  __half* a_hi = reinterpret_cast<__half*>(smem_raw + lay.a_hi);
  __half* a_lo = reinterpret_cast<__half*>(smem_raw + lay.a_lo);
  __half* b_hi = reinterpret_cast<__half*>(smem_raw + lay.b_hi);
  __half* b_lo = reinterpret_cast<__half*>(smem_raw + lay.b_lo);
  float* cstage = reinterpret_cast<float*>(smem_raw + lay.cstage);
  const int lda = KP + kTcPadH, ldb = KP + kTcPadH;

  const int r = blockIdx.y, tid = threadIdx.x;
  const int img = row_image[r];
  const int vh = hv[img], vw = wv[img];
  const int half = ks / 2, PW = W + 2 * half, PH = H + 2 * half, taps = ks * ks;
  const int L = H * W, p0 = blockIdx.x * kTcPos;
  // Split z of `splits` takes a slice of whole kTcChan-channel chunks, [c_begin, c_end), and writes its
  // partial sum over them to energy slice z ([splits, N, L]); softmax_context adds the slices up.
  const int z = blockIdx.z, chunks = (d + kTcChan - 1) / kTcChan;
  const int c_begin = z * chunks / splits * kTcChan, c_end = min(d, (z + 1) * chunks / splits * kTcChan);
  const float* cov_r = coverage + (size_t)r * L;
  for (int e = tid; e < PH * PW; e += blockDim.x) {
    const int i = e / PW - half, j = e % PW - half;
    beta[e] = (i >= 0 && j >= 0 && i < vh && j < vw) ? cov_r[i * W + j] : 0.f;
  }
  const float* wa_r = wa + (size_t)r * d;
  for (int c = tid; c < d; c += blockDim.x) {
    base[c] = wa_r[c] + cov_b[c];
    vvec[c] = v[c];
  }
  __syncthreads();
  // im2col of the block's positions: A[p, tap], zero past the taps and for positions outside the image
  for (int e = tid; e < kTcPos * KP; e += blockDim.x) {
    const int p = e / KP, k = e % KP, pos = p0 + p;
    float x = 0.f;
    if (k < taps && pos < L) {
      const int i = pos / W, j = pos % W;
      if (i < vh && j < vw) x = beta[(i + k / ks) * PW + j + k % ks];   // halo offsets cancel the -k/2 shift
    }
    const __half2 parts = split_half(x);
    a_hi[p * lda + k] = __low2half(parts);
    a_lo[p * lda + k] = __high2half(parts);
  }

  const int warp = tid / 32, lane = tid % 32;
  const int m0 = warp * 16;                          // the warp's m-tile within the block
  const int my_p = m0 + lane / 2, my_pos = p0 + my_p; // epilogue: lane -> (position, 8-channel half)
  const int my_half = lane % 2;
  const bool my_valid = my_pos < L && my_pos / W < vh && my_pos % W < vw;
  const bool warp_busy = __any_sync(0xffffffffu, my_valid);
  const FT* uaf_p = uaf + ((size_t)img * L + (my_valid ? my_pos : 0)) * d;
  float* cw = cstage + warp * 16 * kTcLdC;
  float e_part = 0.f;
  for (int c0 = c_begin; c0 < c_end; c0 += kTcChan) {
    __syncthreads();                                 // A is built; the previous B chunk is no longer read
    for (int e = tid; e < kTcChan * KP; e += blockDim.x) {
      const int cl = e / KP, k = e % KP, c = c0 + cl;
      const float w = (c < c_end && k < taps) ? load_as_float(cov_w, c * taps + k) : 0.f;
      const __half2 parts = split_half(w);
      b_hi[cl * ldb + k] = __low2half(parts);
      if (kSplitB) b_lo[cl * ldb + k] = __high2half(parts);
    }
    __syncthreads();
    if (!warp_busy) continue;
    for (int nt = 0; nt < kTcChan / 16 && c0 + nt * 16 < c_end; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kt = 0; kt < KP / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa_hi, fa_lo;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb_hi;
        wmma::load_matrix_sync(fa_hi, a_hi + m0 * lda + kt * 16, lda);
        wmma::load_matrix_sync(fa_lo, a_lo + m0 * lda + kt * 16, lda);
        wmma::load_matrix_sync(fb_hi, b_hi + nt * 16 * ldb + kt * 16, ldb);
        wmma::mma_sync(acc, fa_lo, fb_hi, acc);      // small terms first
        if (kSplitB) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb_lo;
          wmma::load_matrix_sync(fb_lo, b_lo + nt * 16 * ldb + kt * 16, ldb);
          wmma::mma_sync(acc, fa_hi, fb_lo, acc);
        }
        wmma::mma_sync(acc, fa_hi, fb_hi, acc);
      }
      wmma::store_matrix_sync(cw, acc, kTcLdC, wmma::mem_row_major);
      __syncwarp();
      if (my_valid) {
        const int cbase = c0 + nt * 16 + my_half * 8;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const int c = cbase + q;
          if (c < c_end) {
            const float x = cw[(lane / 2) * kTcLdC + my_half * 8 + q] + base[c] + load_as_float(uaf_p, c);
            e_part = fmaf(vvec[c], tanhf(x), e_part);
          }
        }
      }
      __syncwarp();                                  // the staging tile is rewritten by the next n-tile
    }
  }
  e_part += __shfl_xor_sync(0xffffffffu, e_part, 1);
  if (my_half == 0 && my_pos < L)
    energy[((size_t)z * gridDim.y + r) * L + my_pos] = my_valid ? e_part : -INFINITY;
}

// ---- masked softmax, context and coverage update: one block per row ------------------------------------
template <typename FT>
__global__ void softmax_context_kernel(const float* __restrict__ energy, const FT* __restrict__ feats,
                                       const float* __restrict__ coverage, const int32_t* __restrict__ row_image,
                                       float* __restrict__ alpha, float* __restrict__ context,
                                       float* __restrict__ coverage_out, int L, int D, int splits) {
  // [L4] attention, L rounded up to a multiple of 4 and the tail zeroed: the compiler may read the
  // context loop's a_s[l] four at a time (seen under compute-sanitizer: a 16-byte read at a_s[64] for L = 65).
  extern __shared__ float a_s[];
  __shared__ float red[32];
  const int L4 = (L + 3) & ~3;
  const int r = blockIdx.x, img = row_image[r];
  const float* e = energy + (size_t)r * L;
  const size_t slice = (size_t)gridDim.x * L;           // energy is [splits, N, L]: slices add up (in order)
  auto energy_at = [&](int l) {
    float v = e[l];
    for (int z = 1; z < splits; ++z) v += e[z * slice + l];
    return v;
  };
  float mx = -INFINITY;
  for (int l = threadIdx.x; l < L; l += blockDim.x) mx = fmaxf(mx, energy_at(l));
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
    const float el = energy_at(l);
    const float p = el == -INFINITY ? 0.f : expf(el - mx);
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


template <typename FT>
size_t energy_smem_bytes(int H, int W, int ks, int d) {
  return TcLayout(H, W, ks, d, tc_taps_padded(ks), std::is_same<FT, float>::value).total;
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
  const size_t smem = energy_smem_bytes<FT>(t.H, t.W, w.ksize, w.d);
  int dev = 0, optin = 0;
  ABM_CUDA_CHECK(cudaGetDevice(&dev));
  ABM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  ABM_CHECK(smem <= (size_t)optin, "feature grid " << t.H << " x " << t.W << " is too large for the CUDA attention "
            "kernel: it needs " << smem << " bytes of shared memory per block, the device allows " << optin
            << " (downscale the image)");
  allow_dynamic_smem(reinterpret_cast<const void*>(coverage_energy_tc_kernel<FT>), smem, energy_limit);
  const int chunks = (w.d + kTcChan - 1) / kTcChan;
  ABM_CHECK(t.energy_splits >= 1 && t.energy_splits <= chunks, "energy_splits must be in 1.." << chunks
            << " (channel chunks of d = " << w.d << "), got " << t.energy_splits);
  dim3 grid(blocks_for(L, kTcPos), t.N, t.energy_splits);
  coverage_energy_tc_kernel<FT><<<grid, kTcWarps * 32, smem, s>>>(
      static_cast<const FT*>(t.uaf), t.wa, static_cast<const FT*>(w.cov_w), w.cov_b, w.v, t.coverage,
      t.row_image, t.hv, t.wv, t.energy, t.H, t.W, w.d, w.ksize, tc_taps_padded(w.ksize), t.energy_splits);
  ABM_CUDA_CHECK(cudaGetLastError());
  const size_t smem2 = sizeof(float) * (size_t)((L + 3) & ~3);
  allow_dynamic_smem(reinterpret_cast<const void*>(softmax_context_kernel<FT>), smem2, context_limit);
  softmax_context_kernel<FT><<<t.N, 256, smem2, s>>>(t.energy, static_cast<const FT*>(t.feats), t.coverage,
                                                     t.row_image, t.alpha, t.context, t.coverage_out, L, w.D,
                                                     t.energy_splits);
  ABM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void set_energy_max_splits(int s) {
  ABM_CHECK(s >= 1 && s <= kMaxEnergySplits, "energy_max_splits must be in 1.." << kMaxEnergySplits << ", got " << s);
  g_energy_max_splits.store(s);
}

int energy_max_splits() { return g_energy_max_splits.load(); }

int energy_splits(int N, int L, int d) {
  // Double the slices while the grid has fewer blocks than ~2 waves of a 132-SM GPU, within the limit and
  // the channel chunks (every slice keeps at least one chunk).
  const int max_s = g_energy_max_splits.load(std::memory_order_relaxed), chunks = (d + kTcChan - 1) / kTcChan;
  const long long blocks = (long long)blocks_for(L, kTcPos) * N;
  int s = 1;
  while (s * 2 <= max_s && s * 2 <= chunks && blocks * s < kEnergyTargetBlocks) s *= 2;
  return s;
}

void set_linear_rows_max_n(int n) {
  ABM_CHECK(n >= 0 && n <= kLinearRowsLimit, "linear_rows_max_n must be in 0.." << kLinearRowsLimit << ", got " << n);
  g_linear_rows_max_n.store(n);
}

int linear_rows_max_n() { return g_linear_rows_max_n.load(); }

void linear_cuda(const LinearWeights& lin, const float* x, float* y, int N, bool accumulate, cudaStream_t s) {
  if (N == 0) return;
  if (N <= g_linear_rows_max_n.load(std::memory_order_relaxed)) {
    switch (lin.type) {
      case DType::F32: launch_linear_rows(lin, static_cast<const float*>(lin.w), x, y, N, accumulate, s); break;
      case DType::F16: launch_linear_rows(lin, static_cast<const __half*>(lin.w), x, y, N, accumulate, s); break;
      case DType::I8: launch_linear_rows(lin, static_cast<const int8_t*>(lin.w), x, y, N, accumulate, s); break;
    }
    ABM_CUDA_CHECK(cudaGetLastError());
    return;
  }
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
