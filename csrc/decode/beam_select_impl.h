// The per-image bookkeeping of beam_select, shared by the CPU twin and the CUDA kernel (one thread
// runs it per image on the GPU): given the k best candidates in rank order, update the image's
// finished list, live slots and history exactly as abm_rt/decode/batched.py does.
#pragma once
#include <cmath>
#include <cstdint>

#include "beam_select.h"

#ifdef __CUDACC__
#define ABM_HD __host__ __device__
#else
#define ABM_HD
#endif

namespace abm {

// The step index t of a beam_select call (see BeamState::step_ptr).
ABM_HD inline int beam_step(const BeamState& s) { return s.step_ptr ? *s.step_ptr : s.step; }

// Whether a call at step t updates anything: with step_ptr, only t in [0, max_steps) does.
ABM_HD inline bool beam_step_active(const BeamState& s, int t) {
  return s.step_ptr == nullptr || (t >= 0 && t < s.max_steps);
}

// s as beam_bookkeeping sees step t: step = t and, with step_ptr, the history pointers at row t.
// Only for an active t (a row outside the histories is never addressed).
ABM_HD inline BeamState at_step(BeamState s, int t) {
  s.step = t;
  if (s.step_ptr) {
    const size_t row = (size_t)t * s.B * s.k;
    s.words += row;
    s.parents += row;
    s.sources += row;
  }
  return s;
}

// top_cost/top_idx: the k best candidates of image b (ascending cost; index = slot * V + word).
ABM_HD inline void beam_bookkeeping(const BeamState& s, int b, const float* top_cost, const int32_t* top_idx) {
  const int k = s.k;
  int dead = s.dead[b];
  const bool done = s.done[b] != 0;
  const int limit = k - dead;
  int n_live = 0, n_eos = 0;
  for (int rank = 0; rank < k; ++rank) {
    const int parent = top_idx[rank] / s.V, word = top_idx[rank] % s.V;
    s.words[b * k + rank] = word;
    s.parents[b * k + rank] = parent;
    s.sources[b * k + rank] = -1;
  }
  float new_score[64];
  int new_src[64];
  for (int slot = 0; slot < k; ++slot) new_src[slot] = -1;
  for (int rank = 0; rank < k; ++rank) {
    const float c = top_cost[rank];
    const bool finite = (c - c) == 0.f;   // false for inf and NaN
    const bool valid = rank < limit && !done && finite;
    if (!valid) continue;
    if (s.words[b * k + rank] == s.eos) {
      const int pos = dead + n_eos++;
      s.fin_score[b * k + pos] = top_cost[rank];
      s.fin_step[b * k + pos] = s.step;
      s.fin_cand[b * k + pos] = rank;
    } else {
      new_src[n_live++] = rank;
    }
  }
  dead += n_eos;
  for (int slot = 0; slot < k; ++slot) {
    const int src = new_src[slot] >= 0 ? new_src[slot] : 0;
    new_score[slot] = new_src[slot] >= 0 ? top_cost[src] : INFINITY;
    s.sources[b * k + slot] = new_src[slot];
    s.parent_rows[b * k + slot] = b * k + s.parents[b * k + src];
    s.prev_token[b * k + slot] = s.words[b * k + src];
  }
  for (int slot = 0; slot < k; ++slot) s.score[b * k + slot] = new_score[slot];
  s.dead[b] = dead;
  s.done[b] = (done || dead >= k || n_live == 0) ? 1 : 0;
}

}  // namespace abm
