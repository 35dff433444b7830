// CPU twin of beam_select.h.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../common/check.h"
#include "beam_select_impl.h"

namespace abm {

void beam_select_cpu(const BeamState& s) {
  ABM_CHECK(s.k >= 1 && s.k <= 64, "beam size must be in 1..64, got " << s.k);
  ABM_CHECK(s.V >= 1 && s.B >= 0, "bad sizes V=" << s.V << " B=" << s.B);
  const int k = s.k, C = k * s.V;
  bool all = true;
  std::vector<float> cost(C);
  std::vector<int32_t> idx(C);
  for (int b = 0; b < s.B; ++b) {
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
    all = all && s.done[b];
  }
  if (s.all_done) *s.all_done = all ? 1 : 0;
}

void gather_rows_cpu(const float* src, const int32_t* rows, float* dst, int N, int width) {
#pragma omp parallel for
  for (int r = 0; r < N; ++r) std::copy_n(src + (size_t)rows[r] * width, width, dst + (size_t)r * width);
}

}  // namespace abm
