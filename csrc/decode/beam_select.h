// One beam-search bookkeeping step for B images x k slots (spec 5.1, shrinking beam), after a decode
// step produced log_probs for every row. Same rules as abm_rt/decode/batched.py, which is the
// oracle: per image, the k lowest costs score[s] - log p(w) over (slot, word) in rank order; the
// first k - dead ranks that are finite count; an end token moves its candidate to the image's
// finished list, the others fill the live slots in rank order. Everything stays on the device:
// per-step history (word, parent, source) is written for the final back-tracking, and parent_rows
// tells the caller which old row each new row continues (to reorder hidden state and coverage).
//
// Step counter in memory (for CUDA graphs, where one captured launch sequence is replayed step after
// step and so cannot carry t or per-step pointers as arguments): when step_ptr is set, t is read from
// *step_ptr (host memory for the CPU twin, device memory for CUDA) instead of `step`, and words,
// parents and sources are the BASES of whole [max_steps, B, k] histories, of which the call writes
// row t. A call with t outside [0, max_steps) changes nothing (state, history, fin_*, parent_rows,
// prev_token) but still computes all_done. Every call then adds 1 to *step_ptr, once every image has
// read t (on CUDA in the all_done kernel, so all_done must be set whenever step_ptr is). With
// step_ptr null, `step` is t and words/parents/sources point at this step's [B, k] row.
#pragma once
#include <cstdint>

#include "../ops/decode_step.h"

namespace abm {

struct BeamState {
  int B = 0, k = 0, V = 0;
  int eos = 1;
  int step = 0;                  // t, recorded in fin_step (unless step_ptr is set)
  const float* log_probs = nullptr;  // [B * k, V]
  float* score = nullptr;        // [B, k] raw -log p sums of live slots, +inf for empty slots (in/out)
  int32_t* dead = nullptr;       // [B] finished count (in/out)
  uint8_t* done = nullptr;       // [B] image finished (in/out)
  float* fin_score = nullptr;    // [B, k] (in/out)
  int32_t* fin_step = nullptr;   // [B, k] (in/out)
  int32_t* fin_cand = nullptr;   // [B, k] (in/out)
  int32_t* words = nullptr;      // [B, k] this step's candidate words by rank (out: history row t)
  int32_t* parents = nullptr;    // [B, k] candidate parent slots by rank (out)
  int32_t* sources = nullptr;    // [B, k] rank feeding each new live slot, -1 if empty (out)
  int32_t* parent_rows = nullptr;  // [B * k] old row continued by each new row (out)
  int32_t* prev_token = nullptr;   // [B * k] next input token of each new row (out)
  int32_t* all_done = nullptr;     // [1] set to 1 when every image is done, 0 otherwise (out)
  int32_t* step_ptr = nullptr;     // [1] t, advanced by 1 per call (in/out; null: use `step`, see above)
  int max_steps = 0;               // with step_ptr: rows of the words/parents/sources histories
};

void beam_select_cpu(const BeamState& s);
void beam_select_cuda(const BeamState& s, cudaStream_t stream);

// Reorder rows: dst[r, :] = src[rows[r], :] for r < N (hidden state, coverage).
void gather_rows_cpu(const float* src, const int32_t* rows, float* dst, int N, int width);
void gather_rows_cuda(const float* src, const int32_t* rows, float* dst, int N, int width, cudaStream_t stream);

}  // namespace abm
