// C++ twin of decode_step.h: one ABM decode step over N rows (image x beam), OpenMP across
// output channels (linears) and rows (element-wise parts, attention), FP32 accumulation everywhere.
//
// Layout recap (decode_step.h): rows r share image row_image[r]; the padded grid is H x W with
// l = i * W + j, and cell l is valid for image b iff i < hv[b] and j < wv[b].
//
// Hot loops are written so GCC vectorizes them at -O3 (no -ffast-math: the runtime is compared
// with the PyTorch reference at 1e-5); on x86-64 the attention and linear kernels are also cloned
// for x86-64-v3 (AVX2 + FMA) and picked at load time, so the wheel still runs on any x86-64.
#include "ops/decode_step.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/check.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define ABM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ABM_CLONES
#endif

// Multiply-adds (or element-wise ops times 16) below which a loop stays on the calling thread: a
// fork/join costs microseconds, and far more when the cores are oversubscribed.
constexpr long long kMinParallelWork = 1LL << 17;

// Helpers called from the cloned kernels must be inlined into each clone to get its instruction set.
#define ABM_INLINE inline __attribute__((always_inline))

namespace abm {
namespace {

// ---- scalar helpers -------------------------------------------------------------------------

ABM_INLINE float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// IEEE binary16 -> binary32, exact for normals, subnormals, signed zeros, inf and NaN. Integer
// arithmetic only for normals (no denormal float operands, so it is right under DAZ/FTZ too).
ABM_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;                                   // exponent + mantissa
  float mag = bits_to_float((em << 13) + ((127u - 15u) << 23));      // normal: rebias exponent
  if (em < 0x0400u) mag = float(em) * 0x1p-24f;                      // subnormal (and zero)
  if (em >= 0x7c00u) mag = bits_to_float(0x7f800000u | ((em & 0x3ffu) << 13));  // inf / NaN
  uint32_t b;
  std::memcpy(&b, &mag, sizeof b);
  return bits_to_float(b | sign);
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// exp for the vectorized attention loop (Cephes expf: ~1 ulp on [-87, 88]). Written with
// selects and bit casts only, so `omp simd` loops that call it vectorize without -ffast-math.
ABM_INLINE float exp_vec(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;                 // round to nearest (1.5 * 2^23)
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  return p * bits_to_float(static_cast<uint32_t>(n + 127) << 23);
}

// tanh for the attention energies (Cephes tanhf: odd polynomial below 0.625, exp form above;
// max error a few ulp). Scalar twin of tanh8 below, used for channel tails.
ABM_INLINE float tanh_vec(float x) {
  const float ax = std::fabs(x);
  const float z = x * x;
  float small = -5.70498872745e-3f;
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * ax + ax;
  const float e = exp_vec(2.0f * std::min(ax, 10.0f));               // tanh(10) == 1 in FP32
  const float big = 1.0f - 2.0f / (e + 1.0f);
  // Branch-free select and sign (integer masks), as in tanh8.
  const uint32_t use_small = 0u - static_cast<uint32_t>(ax < 0.625f);
  uint32_t sb, bb, xb;
  std::memcpy(&sb, &small, 4);
  std::memcpy(&bb, &big, 4);
  std::memcpy(&xb, &x, 4);
  return bits_to_float(((sb & use_small) | (bb & ~use_small)) | (xb & 0x80000000u));
}

// Element i of a feature-type array (F32 or F16).
ABM_INLINE float load_feat(const void* p, size_t i, DType t) {
  return t == DType::F16 ? half_to_float(static_cast<const uint16_t*>(p)[i])
                         : static_cast<const float*>(p)[i];
}

// n consecutive feature-type values starting at element `offset` -> dst (FP32).
ABM_INLINE void load_feat_row(const void* p, size_t offset, int n, DType t, float* dst) {
  if (t == DType::F16) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + offset;
    for (int i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
    std::memcpy(dst, static_cast<const float*>(p) + offset, sizeof(float) * n);
  }
}

// Eight floats as one GCC/Clang vector: 1 AVX register in the x86-64-v3 clone, 2 SSE registers in the
// baseline. Used where the compiler will not keep an accumulator array in registers on its own.
typedef float v8f __attribute__((vector_size(32)));
ABM_INLINE v8f loadu8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ABM_INLINE void storeu8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
ABM_INLINE float hsum8(v8f a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }
typedef int32_t v8i __attribute__((vector_size(32)));

// tanh_vec on eight lanes (same algorithm and constants, written with vector types: GCC leaves the
// scalar form un-vectorized inside the energy reduction). NaN inputs give NaN, as with libm.
ABM_INLINE v8f tanh8(v8f x) {
  const v8i sign = reinterpret_cast<v8i>(x) & static_cast<int32_t>(0x80000000u);
  const v8f ax = reinterpret_cast<v8f>(reinterpret_cast<v8i>(x) & 0x7fffffff);
  const v8f z = x * x;
  v8f small = v8f{} + -5.70498872745e-3f;
  small = small * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * ax + ax;
  // e = exp(2 min(ax, 10)) as in exp_vec (argument in [0, 20], so no lower clamp is needed)
  const v8f xx = 2.0f * (10.0f < ax ? 10.0f : ax);   // std::min's order: a NaN stays NaN
  const v8f tt = xx * 1.44269504088896341f;
  const v8f fn = (tt + 12582912.0f) - 12582912.0f;
  v8f rr = xx - fn * 0.693359375f;
  rr = rr - fn * -2.12194440e-4f;
  const v8f zz = rr * rr;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * rr + 1.3981999507e-3f;
  p = p * rr + 8.3334519073e-3f;
  p = p * rr + 4.1665795894e-2f;
  p = p * rr + 1.6666665459e-1f;
  p = p * rr + 5.0000001201e-1f;
  p = p * zz + rr + 1.0f;
  const v8i n = __builtin_convertvector(fn, v8i);
  const v8f e = p * reinterpret_cast<v8f>((n + 127) << 23);
  const v8f big = 1.0f - 2.0f / (e + 1.0f);
  const v8i use_small = ax < 0.625f;  // lanes: -1 or 0
  const v8i mag = (reinterpret_cast<v8i>(small) & use_small) | (reinterpret_cast<v8i>(big) & ~use_small);
  return reinterpret_cast<v8f>(mag | sign);
}

// ---- argument checks --------------------------------------------------------------------------

void check_linear(const LinearWeights& l, const char* name, long long out, long long in, bool bias) {
  ABM_CHECK(l.w != nullptr, name << ".w is null");
  ABM_CHECK(l.out == out && l.in == in,
            name << " must be [" << out << ", " << in << "], got [" << l.out << ", " << l.in << "]");
  ABM_CHECK(l.type == DType::F32 || l.type == DType::F16 || l.type == DType::I8,
            name << ".type is not a DType");
  ABM_CHECK(l.type != DType::I8 || l.scale != nullptr, name << ".scale is null (INT8 weights need scales)");
  if (bias) {
    ABM_CHECK(l.bias != nullptr, name << ".bias is null (this linear has a bias)");
  } else {
    ABM_CHECK(l.bias == nullptr, name << ".bias must be null (this linear has no bias of its own)");
  }
}

// Values the CPU twin can read on the host: image indices, valid extents, tokens.
void check_host_indices(const DecoderWeights& w, const StepTensors& t, bool tokens) {
  for (int r = 0; r < t.N; ++r) {
    ABM_CHECK(t.row_image[r] >= 0 && t.row_image[r] < t.B,
              "row_image[" << r << "] = " << t.row_image[r] << " is not in [0, B=" << t.B << ")");
    if (tokens) {
      ABM_CHECK(t.prev_token[r] >= 0 && t.prev_token[r] < w.K,
                "prev_token[" << r << "] = " << t.prev_token[r] << " is not in [0, K=" << w.K << ")");
    }
  }
  for (int b = 0; b < t.B; ++b) {
    ABM_CHECK(t.hv[b] >= 1 && t.hv[b] <= t.H, "hv[" << b << "] = " << t.hv[b] << " is not in [1, H=" << t.H << "]");
    ABM_CHECK(t.wv[b] >= 1 && t.wv[b] <= t.W, "wv[" << b << "] = " << t.wv[b] << " is not in [1, W=" << t.W << "]");
  }
}

// What coverage_attention reads and writes (a subset of validate()).
void check_attention_args(const DecoderWeights& w, const StepTensors& t) {
  ABM_CHECK(w.d > 0 && w.D > 0, "d and D must be positive, got d=" << w.d << " D=" << w.D);
  ABM_CHECK(w.ksize > 0 && w.ksize % 2 == 1, "ksize must be odd and positive, got " << w.ksize);
  ABM_CHECK(w.feat_type == DType::F32 || w.feat_type == DType::F16,
            "feat_type must be F32 or F16, got " << static_cast<int>(w.feat_type));
  ABM_CHECK(w.cov_w && w.cov_b && w.v, "cov_w, cov_b and v must not be null");
  ABM_CHECK(t.N > 0 && t.B > 0 && t.H > 0 && t.W > 0,
            "N, B, H, W must be positive, got N=" << t.N << " B=" << t.B << " H=" << t.H << " W=" << t.W);
  ABM_CHECK(t.row_image && t.hv && t.wv, "row_image, hv and wv must not be null");
  ABM_CHECK(t.feats && t.uaf, "feats and uaf must not be null");
  ABM_CHECK(t.coverage && t.wa && t.energy, "coverage, wa and energy must not be null");
  ABM_CHECK(t.alpha && t.context && t.coverage_out, "alpha, context and coverage_out must not be null");
}

}  // namespace

// ---- validate ----------------------------------------------------------------------------------

void validate(const DecoderWeights& w, const StepTensors& t) {
  ABM_CHECK(w.K > 0 && w.m > 0 && w.n > 0 && w.d > 0 && w.D > 0,
            "K, m, n, d, D must be positive, got K=" << w.K << " m=" << w.m << " n=" << w.n
                                                     << " d=" << w.d << " D=" << w.D);
  ABM_CHECK(w.m % 2 == 0, "m must be even (pairwise maxout), got " << w.m);
  // Both twins write the maxout output [N, m/2] into the gates scratch [N, 3n] (free by then).
  ABM_CHECK(w.m / 2 <= 3 * w.n, "m / 2 must not exceed 3n (maxout reuses the gates scratch), got m=" << w.m
                                    << " n=" << w.n);
  ABM_CHECK(w.gy_table != nullptr, "gy_table is null");
  ABM_CHECK(w.oy_table != nullptr, "oy_table is null");
  const long long n3 = 3LL * w.n;
  check_linear(w.U_h, "U_h", n3, w.n, false);
  check_linear(w.W_a, "W_a", w.d, w.n, false);
  check_linear(w.W_c, "W_c", n3, w.D, false);
  check_linear(w.U_h2, "U_h2", n3, w.n, true);
  check_linear(w.W_oc, "W_oc", w.m, w.D, false);
  check_linear(w.W_oh, "W_oh", w.m, w.n, false);
  check_linear(w.W_o, "W_o", w.K, w.m / 2, true);
  check_attention_args(w, t);
  ABM_CHECK(t.energy_splits >= 1 && t.energy_splits <= 16, "energy_splits must be in 1..16, got " << t.energy_splits);
  ABM_CHECK(static_cast<long long>(t.H) * t.W <= (1LL << 30), "H * W is too large: " << t.H << " x " << t.W);
  ABM_CHECK(t.prev_token && t.hidden, "prev_token and hidden must not be null");
  ABM_CHECK(t.gates && t.h_hat && t.gates2 && t.gates2u && t.out_pre,
            "scratch gates, h_hat, gates2, gates2u and out_pre must not be null");
  ABM_CHECK(t.hidden_out && t.log_probs, "hidden_out and log_probs must not be null");
}

// ---- linear ------------------------------------------------------------------------------------

namespace {

// Outputs [o0, o1) of y = x W^T * scale + bias for all N rows, four outputs at a time: their weight
// rows are widened to FP32 once (F16/I8; `wbuf` holds 4 * in floats) and each x load feeds four
// vector accumulators. Weight-stationary: W is read once per call, x stays in cache.
ABM_CLONES
void linear_range(const LinearWeights& lin, const float* x, float* y, int N, bool accumulate, int o0, int o1,
                  float* wbuf) {
  const int O = lin.out, I = lin.in, I8 = I - I % 8;
  for (int o = o0; o < o1; o += 4) {
    const int no = std::min(4, o1 - o);
    const float* wr[4];
    float s[4], b[4];
    for (int q = 0; q < 4; ++q) {
      const int oq = o + std::min(q, no - 1);  // a short block repeats its last row (results dropped)
      const size_t off = static_cast<size_t>(oq) * I;
      if (lin.type == DType::F32) {
        wr[q] = static_cast<const float*>(lin.w) + off;
      } else if (lin.type == DType::F16) {
        const uint16_t* src = static_cast<const uint16_t*>(lin.w) + off;
        float* dst = wbuf + static_cast<size_t>(q) * I;
        for (int i = 0; i < I; ++i) dst[i] = half_to_float(src[i]);
        wr[q] = dst;
      } else {
        const int8_t* src = static_cast<const int8_t*>(lin.w) + off;
        float* dst = wbuf + static_cast<size_t>(q) * I;
        for (int i = 0; i < I; ++i) dst[i] = static_cast<float>(src[i]);
        wr[q] = dst;
      }
      s[q] = lin.type == DType::I8 ? lin.scale[oq] : 1.0f;
      b[q] = lin.bias ? lin.bias[oq] : 0.0f;
    }
    for (int r = 0; r < N; ++r) {
      const float* xr = x + static_cast<size_t>(r) * I;
      v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int i = 0; i < I8; i += 8) {
        const v8f xv = loadu8(xr + i);
        a0 += xv * loadu8(wr[0] + i);
        a1 += xv * loadu8(wr[1] + i);
        a2 += xv * loadu8(wr[2] + i);
        a3 += xv * loadu8(wr[3] + i);
      }
      float acc[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
      for (int i = I8; i < I; ++i)
        for (int q = 0; q < 4; ++q) acc[q] += xr[i] * wr[q][i];
      float* yr = y + static_cast<size_t>(r) * O + o;
      for (int q = 0; q < no; ++q) {
        const float v = acc[q] * s[q] + b[q];
        yr[q] = accumulate ? yr[q] + v : v;
      }
    }
  }
}

}  // namespace

void linear_cpu(const LinearWeights& lin, const float* x, float* y, int N, bool accumulate) {
  const int O = lin.out, I = lin.in;
  if (N <= 0 || O <= 0) return;
  const int blocks = (O + 3) / 4;
#pragma omp parallel if (static_cast<long long>(N) * O * I >= kMinParallelWork)
  {
    int nt = 1, id = 0;
#ifdef _OPENMP
    nt = omp_get_num_threads();
    id = omp_get_thread_num();
#endif
    const int b0 = static_cast<int>(static_cast<long long>(blocks) * id / nt);
    const int b1 = static_cast<int>(static_cast<long long>(blocks) * (id + 1) / nt);
    if (b1 > b0) {
      std::vector<float> wbuf(lin.type == DType::F32 ? 0 : 4 * static_cast<size_t>(I));
      linear_range(lin, x, y, N, accumulate, 4 * b0, std::min(O, 4 * b1), wbuf.data());
    }
  }
}

// ---- coverage attention ------------------------------------------------------------------------

namespace {

// Energies of grid row i of step row r: energy[l] = v . tanh(uaf[l] + wa + cov_b + conv(beta)[l]),
// -inf on invalid cells. `wT` is the folded kernel transposed to [k*k, d] in FP32, `base` is
// wa[r] + cov_b; `tap_off` / `tap_val` are k*k-sized buffers for the cell's nonzero taps, `acc` d floats.
ABM_CLONES
void energy_grid_row(const DecoderWeights& w, const StepTensors& t, const float* wT, const float* base,
                     int r, int i, int* tap_off, float* tap_val, float* acc) {
  const int d = w.d, k = w.ksize, half = k / 2, W = t.W;
  const int img = t.row_image[r], hv = t.hv[img], wv = t.wv[img];
  const size_t L = static_cast<size_t>(t.H) * W;
  float* energy = t.energy + static_cast<size_t>(r) * L + static_cast<size_t>(i) * W;
  const float* beta = t.coverage + static_cast<size_t>(r) * L;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (i >= hv) {
    for (int j = 0; j < W; ++j) energy[j] = neg_inf;
    return;
  }
  const int d32 = d - d % 32;
  const float* v = w.v;  // hoisted: a load through `w` inside the loop blocks vectorization
  const int dy0 = std::max(0, half - i), dy1 = std::min(k, hv - i + half);  // taps inside [0, hv)
  for (int j = 0; j < wv; ++j) {
    // The cell's taps inside the valid extent with nonzero coverage (a zero cell adds exactly 0;
    // at step 1 the coverage is all zero and the conv vanishes).
    int ntap = 0;
    const int dx0 = std::max(0, half - j), dx1 = std::min(k, wv - j + half);
    for (int dy = dy0; dy < dy1; ++dy) {
      const float* brow = beta + static_cast<size_t>(i + dy - half) * W + (j - half);
      for (int dx = dx0; dx < dx1; ++dx) {
        if (brow[dx] != 0.0f) {
          tap_off[ntap] = (dy * k + dx) * d;
          tap_val[ntap++] = brow[dx];
        }
      }
    }
    load_feat_row(t.uaf, (static_cast<size_t>(img) * L + static_cast<size_t>(i) * W + j) * d, d, w.feat_type, acc);
#pragma omp simd
    for (int c = 0; c < d; ++c) acc[c] += base[c];
    // Blocks of 32 channels: four vector accumulators stay in registers across all taps.
    for (int c0 = 0; c0 < d32; c0 += 32) {
      v8f a0 = loadu8(acc + c0), a1 = loadu8(acc + c0 + 8), a2 = loadu8(acc + c0 + 16), a3 = loadu8(acc + c0 + 24);
      for (int q = 0; q < ntap; ++q) {
        const float b = tap_val[q];
        const float* wt = wT + tap_off[q] + c0;
        a0 += b * loadu8(wt);
        a1 += b * loadu8(wt + 8);
        a2 += b * loadu8(wt + 16);
        a3 += b * loadu8(wt + 24);
      }
      storeu8(acc + c0, a0);
      storeu8(acc + c0 + 8, a1);
      storeu8(acc + c0 + 16, a2);
      storeu8(acc + c0 + 24, a3);
    }
    for (int q = 0; q < ntap; ++q) {  // channel tail (d not a multiple of 32)
      const float b = tap_val[q];
      const float* wt = wT + tap_off[q];
      for (int c = d32; c < d; ++c) acc[c] += b * wt[c];
    }
    v8f e8 = {};
    const int d8 = d - d % 8;
    for (int c = 0; c < d8; c += 8) e8 += loadu8(v + c) * tanh8(loadu8(acc + c));
    float e = hsum8(e8);
    for (int c = d8; c < d; ++c) e += v[c] * tanh_vec(acc[c]);
    energy[j] = e;
  }
  for (int j = wv; j < W; ++j) energy[j] = neg_inf;
}

// Masked max-subtracted softmax of row r's energies -> alpha (exact 0 on invalid cells), context
// = sum_l alpha_l F[img, l], coverage_out = coverage + alpha.
ABM_CLONES
void softmax_context_row(const DecoderWeights& w, const StepTensors& t, int r, float* frow) {
  const int W = t.W, D = w.D;
  const int img = t.row_image[r], hv = t.hv[img], wv = t.wv[img];
  const size_t L = static_cast<size_t>(t.H) * W;
  const float* e = t.energy + static_cast<size_t>(r) * L;
  float* alpha = t.alpha + static_cast<size_t>(r) * L;
  float mx = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < hv; ++i)
    for (int j = 0; j < wv; ++j) mx = std::max(mx, e[static_cast<size_t>(i) * W + j]);
  std::fill(alpha, alpha + L, 0.0f);
  float sum = 0.0f;
  for (int i = 0; i < hv; ++i) {
    for (int j = 0; j < wv; ++j) {
      const size_t l = static_cast<size_t>(i) * W + j;
      const float p = std::exp(e[l] - mx);
      alpha[l] = p;
      sum += p;
    }
  }
  const float inv = 1.0f / sum;
  float* ctx = t.context + static_cast<size_t>(r) * D;
  std::fill(ctx, ctx + D, 0.0f);
  for (int i = 0; i < hv; ++i) {
    for (int j = 0; j < wv; ++j) {
      const size_t l = static_cast<size_t>(i) * W + j;
      const float a = alpha[l] * inv;
      alpha[l] = a;
      if (w.feat_type == DType::F32) {
        const float* f = static_cast<const float*>(t.feats) + (static_cast<size_t>(img) * L + l) * D;
#pragma omp simd
        for (int c = 0; c < D; ++c) ctx[c] += a * f[c];
      } else {
        load_feat_row(t.feats, (static_cast<size_t>(img) * L + l) * D, D, w.feat_type, frow);
#pragma omp simd
        for (int c = 0; c < D; ++c) ctx[c] += a * frow[c];
      }
    }
  }
  const float* cov = t.coverage + static_cast<size_t>(r) * L;
  float* cov_out = t.coverage_out + static_cast<size_t>(r) * L;
#pragma omp simd
  for (size_t l = 0; l < L; ++l) cov_out[l] = cov[l] + alpha[l];
}

void coverage_attention_impl(const DecoderWeights& w, const StepTensors& t) {
  const int d = w.d, kk = w.ksize * w.ksize, N = t.N, H = t.H;
  // Folded kernel [d, k*k] (feature type) -> FP32 [k*k, d], so the conv is an axpy over channels.
  std::vector<float> wT(static_cast<size_t>(kk) * d);
  for (int c = 0; c < d; ++c)
    for (int q = 0; q < kk; ++q) wT[static_cast<size_t>(q) * d + c] = load_feat(w.cov_w, static_cast<size_t>(c) * kk + q, w.feat_type);
  std::vector<float> base(static_cast<size_t>(N) * d);  // wa[r] + cov_b
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < d; ++c) base[static_cast<size_t>(r) * d + c] = t.wa[static_cast<size_t>(r) * d + c] + w.cov_b[c];

  // Energies: (row, grid row) pairs in parallel, so one image with few beams still uses every core.
#pragma omp parallel if (static_cast<long long>(N) * H * t.W * d >= kMinParallelWork / 8)
  {
    std::vector<int> tap_off(kk);
    std::vector<float> tap_val(kk), acc(d);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int r = 0; r < N; ++r)
      for (int i = 0; i < H; ++i)
        energy_grid_row(w, t, wT.data(), base.data() + static_cast<size_t>(r) * d, r, i, tap_off.data(),
                        tap_val.data(), acc.data());
  }
#pragma omp parallel if (static_cast<long long>(N) * H * t.W * w.D >= kMinParallelWork)
  {
    std::vector<float> frow(w.feat_type == DType::F32 ? 0 : w.D);
#pragma omp for schedule(static)
    for (int r = 0; r < N; ++r) softmax_context_row(w, t, r, frow.data());
  }
}

}  // namespace

void coverage_attention_cpu(const DecoderWeights& w, const StepTensors& t) {
  check_attention_args(w, t);
  check_host_indices(w, t, false);
  coverage_attention_impl(w, t);
}

// ---- the whole step ----------------------------------------------------------------------------

void decode_step_cpu(const DecoderWeights& w, const StepTensors& t) {
  validate(w, t);
  check_host_indices(w, t, true);
  const int N = t.N, n = w.n, m = w.m, K = w.K, half_m = w.m / 2;
  const size_t n3 = 3 * static_cast<size_t>(n);

  // GRU-1: gates = U_h h; gy = gy_table[y]; h_hat = z h + (1 - z) tanh(r * gh + yh).
  linear_cpu(w.U_h, t.hidden, t.gates, N, false);
#pragma omp parallel for schedule(static) if (static_cast<long long>(N) * n >= kMinParallelWork / 16)
  for (int r = 0; r < N; ++r) {
    const float* gh = t.gates + r * n3;
    const float* gy = w.gy_table + static_cast<size_t>(t.prev_token[r]) * n3;
    const float* h = t.hidden + static_cast<size_t>(r) * n;
    float* hh = t.h_hat + static_cast<size_t>(r) * n;
    for (int c = 0; c < n; ++c) {
      const float z = sigmoidf(gh[c] + gy[c]);
      const float rr = sigmoidf(gh[n + c] + gy[n + c]);
      const float cand = std::tanh(rr * gh[2 * n + c] + gy[2 * n + c]);
      hh[c] = z * h[c] + (1.0f - z) * cand;
    }
  }

  // Attention.
  linear_cpu(w.W_a, t.h_hat, t.wa, N, false);
  coverage_attention_impl(w, t);

  // GRU-2: gates2 = W_c c; gates2u = U_h2 h_hat + b; h = z h_hat + (1 - z) tanh(ch + r * uh).
  linear_cpu(w.W_c, t.context, t.gates2, N, false);
  linear_cpu(w.U_h2, t.h_hat, t.gates2u, N, false);
#pragma omp parallel for schedule(static) if (static_cast<long long>(N) * n >= kMinParallelWork / 16)
  for (int r = 0; r < N; ++r) {
    const float* gc = t.gates2 + r * n3;
    const float* gu = t.gates2u + r * n3;
    const float* hh = t.h_hat + static_cast<size_t>(r) * n;
    float* ho = t.hidden_out + static_cast<size_t>(r) * n;
    for (int c = 0; c < n; ++c) {
      const float z = sigmoidf(gc[c] + gu[c]);
      const float rr = sigmoidf(gc[n + c] + gu[n + c]);
      const float cand = std::tanh(gc[2 * n + c] + rr * gu[2 * n + c]);
      ho[c] = z * hh[c] + (1.0f - z) * cand;
    }
  }

  // Deep output: out_pre = W_oc c + W_oh h + oy_table[y]; pairwise maxout; logits = W_o o' + b.
  linear_cpu(w.W_oc, t.context, t.out_pre, N, false);
  linear_cpu(w.W_oh, t.hidden_out, t.out_pre, N, true);
  float* maxout = t.gates;  // [N, m/2]: GRU-1's gates are consumed (validate checks m/2 <= 3n)
#pragma omp parallel for schedule(static) if (static_cast<long long>(N) * m >= kMinParallelWork)
  for (int r = 0; r < N; ++r) {
    float* o = t.out_pre + static_cast<size_t>(r) * m;
    const float* oy = w.oy_table + static_cast<size_t>(t.prev_token[r]) * m;
    for (int q = 0; q < m; ++q) o[q] += oy[q];
    float* mo = maxout + static_cast<size_t>(r) * half_m;
    for (int q = 0; q < half_m; ++q) mo[q] = std::max(o[2 * q], o[2 * q + 1]);
  }
  linear_cpu(w.W_o, maxout, t.log_probs, N, false);

  // log_softmax in place.
#pragma omp parallel for schedule(static) if (static_cast<long long>(N) * K >= kMinParallelWork / 16)
  for (int r = 0; r < N; ++r) {
    float* lp = t.log_probs + static_cast<size_t>(r) * K;
    float mx = lp[0];
    for (int q = 1; q < K; ++q) mx = std::max(mx, lp[q]);
    float s = 0.0f;
    for (int q = 0; q < K; ++q) s += std::exp(lp[q] - mx);
    const float lse = mx + std::log(s);
    for (int q = 0; q < K; ++q) lp[q] -= lse;
  }
}

}  // namespace abm
