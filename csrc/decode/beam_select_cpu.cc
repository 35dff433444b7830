// CPU twin of beam_select.h.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../common/check.h"
#include "beam_select_impl.h"

namespace abm {

namespace {

// The k best candidates of image b (cost and idx: scratch of k * V), then its bookkeeping.
void select_image(const BeamState& s, int b, std::vector<float>& cost, std::vector<int32_t>& idx) {
  const int k = s.k;
  for (int slot = 0; slot < k; ++slot) {
    const float sc = s.score[b * k + slot];
    const float* lp = s.log_probs + (size_t)(b * k + slot) * s.V;
    for (int w = 0; w < s.V; ++w) cost[slot * s.V + w] = sc - lp[w];
  }
  std::iota(idx.begin(), idx.end(), 0);
  // k smallest costs, ties to the lower index; NaN ranks as +inf (and is never a valid candidate).
  for (float& c : cost) c = std::isnan(c) ? INFINITY : c;
  auto less = [&](int32_t a, int32_t c) { return cost[a] < cost[c] || (cost[a] == cost[c] && a < c); };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), less);
  float top_cost[64];
  for (int r = 0; r < k; ++r) top_cost[r] = cost[idx[r]];
  beam_bookkeeping(s, b, top_cost, idx.data());
}

}  // namespace

void beam_select_cpu(const BeamState& state) {
  ABM_CHECK(state.k >= 1 && state.k <= 64, "beam size must be in 1..64, got " << state.k);
  ABM_CHECK(state.V >= 1 && state.B >= 0, "bad sizes V=" << state.V << " B=" << state.B);
  const int t = beam_step(state);
  if (beam_step_active(state, t)) {
    const BeamState s = at_step(state, t);
    std::vector<float> cost((size_t)s.k * s.V);
    std::vector<int32_t> idx(cost.size());
    for (int b = 0; b < s.B; ++b) select_image(s, b, cost, idx);
  }
  bool all = true;
  for (int b = 0; b < state.B; ++b) all = all && state.done[b];
  if (state.all_done) *state.all_done = all ? 1 : 0;
  if (state.step_ptr) ++*state.step_ptr;
}

void gather_rows_cpu(const float* src, const int32_t* rows, float* dst, int N, int width) {
#pragma omp parallel for
  for (int r = 0; r < N; ++r) std::copy_n(src + (size_t)rows[r] * width, width, dst + (size_t)r * width);
}

}  // namespace abm
