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
