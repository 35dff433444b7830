// One ABM decode step (spec 3.3 in the runtime form of spec 3.6) over N rows (image x beam).
//
// One declaration, two twins: decode_step_cpu (decode_step_cpu.cc, OpenMP over rows) and
// decode_step_cuda (decode_step_cuda.cu). Both take plain structs of pointers and sizes: no torch
// types below bindings.cc. Rows share their image's features through row_image[], so beams never
// copy the feature map. Images sit top-left in a padded H x W grid; hv/wv give each image's valid
// extent, which is the attention mask.
//
// Precisions: linear weights are FP32, FP16 or INT8 (per-output-channel scales); the per-image
// tensors F, U_a F and the folded coverage kernel are FP32 or FP16 ("feature type"); every
// activation (hidden state, energies, attention, coverage, logits) and every accumulation is FP32.
#pragma once
#include <cstdint>

#ifdef ABM_WITH_CUDA
#include <cuda_runtime.h>
#else
typedef struct CUstream_st* cudaStream_t;
#endif

namespace abm {

enum class DType : int { F32 = 0, F16 = 1, I8 = 2 };

// y[r, o] = sum_i x[r, i] * W[o, i] * scale[o] + bias[o]; W is [out, in] row-major.
struct LinearWeights {
  const void* w = nullptr;
  const float* scale = nullptr;  // [out], INT8 only (nullptr otherwise)
  const float* bias = nullptr;   // [out] or nullptr
  int out = 0, in = 0;
  DType type = DType::F32;
};

struct DecoderWeights {
  int K = 0;      // vocabulary size
  int m = 0;      // embedding size = width before maxout (even)
  int n = 0;      // GRU hidden size
  int d = 0;      // attention size
  int D = 0;      // feature channels
  int ksize = 0;  // folded coverage kernel size (odd)
  const float* gy_table = nullptr;  // [K, 3n]  W_y E[y] + b_y           (gates z, r, h)
  const float* oy_table = nullptr;  // [K, m]   W_oy E[y] + b_oy + b_oc + b_oh (every output bias)
  LinearWeights U_h;    // [3n, n], no bias
  LinearWeights W_a;    // [d, n], no bias
  LinearWeights W_c;    // [3n, D], no bias
  LinearWeights U_h2;   // [3n, n] + bias (inside GRU-2's reset product for the h part)
  LinearWeights W_oc;   // [m, D], bias folded into oy_table
  LinearWeights W_oh;   // [m, n], bias folded into oy_table
  LinearWeights W_o;    // [K, m / 2] + bias
  const void* cov_w = nullptr;   // [d, ksize * ksize] folded U_l Q_l + U_s pad(Q_s), feature type
  const float* cov_b = nullptr;  // [d]  b_l + b_s
  const float* v = nullptr;      // [d]  energy vector (b_v cancels in the softmax)
  DType feat_type = DType::F32;  // type of cov_w and of the per-image tensors
};

// Per-step inputs, outputs and scratch. Every pointer is device memory for the CUDA twin and host
// memory for the CPU twin. Outputs must not alias inputs.
struct StepTensors {
  int N = 0;               // rows
  int B = 0;               // images
  int H = 0, W = 0;        // padded feature grid (L = H * W)
  const int32_t* row_image = nullptr;  // [N] image of each row
  const int32_t* hv = nullptr;         // [B] valid rows of each image's grid
  const int32_t* wv = nullptr;         // [B] valid columns
  const void* feats = nullptr;         // [B, L, D] F, feature type
  const void* uaf = nullptr;           // [B, L, d] U_a F + b_a, feature type
  const int32_t* prev_token = nullptr; // [N]
  const float* hidden = nullptr;       // [N, n]  h_{t-1}
  const float* coverage = nullptr;     // [N, L]  beta_t (zero outside the valid extent)
  // scratch
  float* gates = nullptr;     // [N, 3n]
  float* h_hat = nullptr;     // [N, n]
  float* wa = nullptr;        // [N, d]
  float* energy = nullptr;    // [N, L]; CUDA: [energy_splits, N, L] partial sums over channel slices
  float* gates2 = nullptr;    // [N, 3n]  W_c c
  float* gates2u = nullptr;   // [N, 3n]  U_h2 h_hat + b
  float* out_pre = nullptr;   // [N, m]
  // outputs
  float* alpha = nullptr;        // [N, L]  attention (0 outside the valid extent)
  float* context = nullptr;      // [N, D]
  float* hidden_out = nullptr;   // [N, n]  h_t
  float* coverage_out = nullptr; // [N, L]  beta_{t+1} = beta_t + alpha_t
  float* log_probs = nullptr;    // [N, K]
  int energy_splits = 1;         // CUDA: channel slices of the energy, each its own blocks (energy_splits())
};

// Checks sizes and pointers; throws std::invalid_argument naming the field.
void validate(const DecoderWeights& w, const StepTensors& t);

// The whole step.
void decode_step_cpu(const DecoderWeights& w, const StepTensors& t);
void decode_step_cuda(const DecoderWeights& w, const StepTensors& t, cudaStream_t stream);

// The step's parts, exposed so each op can be tested against the PyTorch reference.
// linear: y[N, out] = x[N, in] W^T * scale + bias (+ y when accumulate).
void linear_cpu(const LinearWeights& lin, const float* x, float* y, int N, bool accumulate);
void linear_cuda(const LinearWeights& lin, const float* x, float* y, int N, bool accumulate, cudaStream_t s);
// The CUDA linear takes a one-warp-per-output kernel for N <= this (0..32; default 32; 0 means never):
// a process-wide switch (see decode_step_cuda.cu for why it is on).
void set_linear_rows_max_n(int n);
int linear_rows_max_n();
// The CUDA energy may be split over up to this many channel slices (1..16; default 16; 1 means never) when
// N x position tiles is too few blocks to fill the GPU; a process-wide switch, like the above.
void set_energy_max_splits(int s);
int energy_max_splits();
// The split count the CUDA step uses for N rows on an L-cell grid of attention width d (1 when off): the
// caller sizes the energy scratch [splits, N, L] and passes it in StepTensors::energy_splits.
int energy_splits(int N, int L, int d);
// coverage attention: energy -> masked max-subtracted softmax -> alpha, context, coverage_out.
// Reads wa, coverage, feats, uaf; writes energy, alpha, context, coverage_out.
void coverage_attention_cpu(const DecoderWeights& w, const StepTensors& t);
void coverage_attention_cuda(const DecoderWeights& w, const StepTensors& t, cudaStream_t stream);

bool cuda_available();  // true when built with CUDA and a device is present

}  // namespace abm
