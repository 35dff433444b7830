// pybind11 module abm_rt._C: the plain structs of decode_step.h as Python classes, and the ops.
// Thin on purpose: argument checks, device dispatch, GIL release, docstrings; no math here.
// Pointer fields are Python ints (uintptr_t, e.g. tensor.data_ptr()); the caller keeps the memory
// alive and on the right device for the call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/check.h"
#include "decode/beam_select.h"
#include "ops/decode_step.h"

namespace py = pybind11;
using namespace abm;

namespace {

enum class Device { CPU, CUDA };

Device parse_device(const std::string& device) {
  if (device == "cpu") return Device::CPU;
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) return Device::CUDA;
  ABM_CHECK(false, "device must be 'cpu' or 'cuda', got '" << device << "'");
  return Device::CPU;
}

cudaStream_t to_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check_linear_args(const LinearWeights& lin, std::uintptr_t x, std::uintptr_t y, int N) {
  ABM_CHECK(lin.w != nullptr, "lin.w is null");
  ABM_CHECK(lin.out > 0 && lin.in > 0, "lin must have positive sizes, got out=" << lin.out << " in=" << lin.in);
  ABM_CHECK(lin.type == DType::F32 || lin.type == DType::F16 || lin.type == DType::I8, "lin.type is not a DType");
  ABM_CHECK(lin.type != DType::I8 || lin.scale != nullptr, "lin.scale is null (INT8 weights need scales)");
  ABM_CHECK(x != 0, "x_ptr is null");
  ABM_CHECK(y != 0, "y_ptr is null");
  ABM_CHECK(N > 0, "N must be positive, got " << N);
}

// What coverage_attention reads and writes (the CPU twin repeats these and checks the host values).
void check_attention_args(const DecoderWeights& w, const StepTensors& t) {
  ABM_CHECK(w.d > 0 && w.D > 0, "weights.d and weights.D must be positive");
  ABM_CHECK(w.ksize > 0 && w.ksize % 2 == 1, "weights.ksize must be odd and positive, got " << w.ksize);
  ABM_CHECK(w.feat_type == DType::F32 || w.feat_type == DType::F16, "weights.feat_type must be F32 or F16");
  ABM_CHECK(w.cov_w && w.cov_b && w.v, "weights.cov_w, cov_b and v must not be null");
  ABM_CHECK(t.N > 0 && t.B > 0 && t.H > 0 && t.W > 0, "tensors.N, B, H, W must be positive");
  ABM_CHECK(t.row_image && t.hv && t.wv && t.feats && t.uaf && t.coverage && t.wa,
            "tensors.row_image, hv, wv, feats, uaf, coverage and wa must not be null");
  ABM_CHECK(t.energy && t.alpha && t.context && t.coverage_out,
            "tensors.energy, alpha, context and coverage_out must not be null");
}

template <class S, class T>
void ptr_field(py::class_<S>& cls, const char* name, T* S::*field, const char* doc) {
  cls.def_property(
      name, [field](const S& s) { return reinterpret_cast<std::uintptr_t>(s.*field); },
      [field](S& s, std::uintptr_t v) { s.*field = reinterpret_cast<T*>(v); }, doc);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "abm_rt native ops: one ABM decode step (CPU twin and, when built with nvcc, CUDA twin).\n\n"
            "Low level: every pointer is a Python int (tensor.data_ptr()) that must stay valid, contiguous and\n"
            "on the call's device until the call returns. abm_rt.decode.native wraps this with torch tensors.";

  py::enum_<DType>(m, "DType", "Storage type of linear weights (F32/F16/I8) and feature tensors (F32/F16).")
      .value("F32", DType::F32)
      .value("F16", DType::F16)
      .value("I8", DType::I8);

  py::class_<LinearWeights> lin(m, "LinearWeights",
                                "y[r, o] = sum_i x[r, i] * w[o, i] * scale[o] + bias[o]; w is [out, in] row-major.");
  lin.def(py::init<>());
  ptr_field(lin, "w", &LinearWeights::w, "weights [out, in] (float, uint16 half bits or int8)");
  ptr_field(lin, "scale", &LinearWeights::scale, "[out] float scales (INT8 only, else 0)");
  ptr_field(lin, "bias", &LinearWeights::bias, "[out] float bias or 0");
  lin.def_readwrite("out", &LinearWeights::out, "output features")
      .def_readwrite("in_", &LinearWeights::in, "input features ('in' is a Python keyword)")
      .def_readwrite("type", &LinearWeights::type, "DType of w")
      .def("__repr__", [](const LinearWeights& l) {
        return "<LinearWeights [" + std::to_string(l.out) + ", " + std::to_string(l.in) + "] type=" +
               std::to_string(static_cast<int>(l.type)) + ">";
      });

  py::class_<DecoderWeights> dw(m, "DecoderWeights", "Packed weights of one decoder branch (see decode_step.h).");
  dw.def(py::init<>())
      .def_readwrite("K", &DecoderWeights::K, "vocabulary size")
      .def_readwrite("m", &DecoderWeights::m, "embedding size = width before maxout (even)")
      .def_readwrite("n", &DecoderWeights::n, "GRU hidden size")
      .def_readwrite("d", &DecoderWeights::d, "attention size")
      .def_readwrite("D", &DecoderWeights::D, "feature channels")
      .def_readwrite("ksize", &DecoderWeights::ksize, "folded coverage kernel size (odd)");
  ptr_field(dw, "gy_table", &DecoderWeights::gy_table, "[K, 3n] float: W_y E[y] + b_y");
  ptr_field(dw, "oy_table", &DecoderWeights::oy_table, "[K, m] float: W_oy E[y] + b_oy + b_oc + b_oh");
  dw.def_readwrite("U_h", &DecoderWeights::U_h, "[3n, n], no bias")
      .def_readwrite("W_a", &DecoderWeights::W_a, "[d, n], no bias")
      .def_readwrite("W_c", &DecoderWeights::W_c, "[3n, D], no bias")
      .def_readwrite("U_h2", &DecoderWeights::U_h2, "[3n, n] + bias")
      .def_readwrite("W_oc", &DecoderWeights::W_oc, "[m, D], bias folded into oy_table")
      .def_readwrite("W_oh", &DecoderWeights::W_oh, "[m, n], bias folded into oy_table")
      .def_readwrite("W_o", &DecoderWeights::W_o, "[K, m/2] + bias");
  ptr_field(dw, "cov_w", &DecoderWeights::cov_w, "[d, ksize*ksize] folded coverage kernel, feature type");
  ptr_field(dw, "cov_b", &DecoderWeights::cov_b, "[d] float: b_l + b_s");
  ptr_field(dw, "v", &DecoderWeights::v, "[d] float energy vector");
  dw.def_readwrite("feat_type", &DecoderWeights::feat_type, "DType of cov_w, feats and uaf (F32 or F16)");

  py::class_<StepTensors> st(m, "StepTensors", "Per-step inputs, scratch and outputs (see decode_step.h).");
  st.def(py::init<>())
      .def_readwrite("N", &StepTensors::N, "rows (image x beam)")
      .def_readwrite("B", &StepTensors::B, "images")
      .def_readwrite("H", &StepTensors::H, "padded grid height")
      .def_readwrite("W", &StepTensors::W, "padded grid width");
  ptr_field(st, "row_image", &StepTensors::row_image, "[N] int32 image of each row");
  ptr_field(st, "hv", &StepTensors::hv, "[B] int32 valid grid rows");
  ptr_field(st, "wv", &StepTensors::wv, "[B] int32 valid grid columns");
  ptr_field(st, "feats", &StepTensors::feats, "[B, L, D] F, feature type");
  ptr_field(st, "uaf", &StepTensors::uaf, "[B, L, d] U_a F + b_a, feature type");
  ptr_field(st, "prev_token", &StepTensors::prev_token, "[N] int32");
  ptr_field(st, "hidden", &StepTensors::hidden, "[N, n] float h_{t-1}");
  ptr_field(st, "coverage", &StepTensors::coverage, "[N, L] float beta_t (0 outside the valid extent)");
  ptr_field(st, "gates", &StepTensors::gates, "scratch [N, 3n]");
  ptr_field(st, "h_hat", &StepTensors::h_hat, "scratch [N, n]");
  ptr_field(st, "wa", &StepTensors::wa, "scratch [N, d] (input of coverage_attention)");
  ptr_field(st, "energy", &StepTensors::energy, "scratch [N, L] (CUDA: [energy_splits, N, L])");
  st.def_readwrite("energy_splits", &StepTensors::energy_splits,
                   "CUDA: channel slices of the energy (1..16, from energy_splits(N, L, d)); the CPU ignores it");
  ptr_field(st, "gates2", &StepTensors::gates2, "scratch [N, 3n]");
  ptr_field(st, "gates2u", &StepTensors::gates2u, "scratch [N, 3n]");
  ptr_field(st, "out_pre", &StepTensors::out_pre, "scratch [N, m]");
  ptr_field(st, "alpha", &StepTensors::alpha, "out [N, L]");
  ptr_field(st, "context", &StepTensors::context, "out [N, D]");
  ptr_field(st, "hidden_out", &StepTensors::hidden_out, "out [N, n] h_t");
  ptr_field(st, "coverage_out", &StepTensors::coverage_out, "out [N, L] beta_{t+1}");
  ptr_field(st, "log_probs", &StepTensors::log_probs, "out [N, K]");

  m.def(
      "validate", [](const DecoderWeights& w, const StepTensors& t) { validate(w, t); }, py::arg("weights"),
      py::arg("tensors"), "Checks sizes and pointers of a whole step; raises ValueError naming the field.");

  m.def(
      "decode_step",
      [](const DecoderWeights& w, const StepTensors& t, const std::string& device, std::uintptr_t stream) {
        const Device dev = parse_device(device);
        validate(w, t);
        py::gil_scoped_release nogil;
        if (dev == Device::CPU) decode_step_cpu(w, t);
        else decode_step_cuda(w, t, to_stream(stream));
      },
      py::arg("weights"), py::arg("tensors"), py::arg("device"), py::arg("stream") = 0,
      "One decode step for tensors.N rows: GRU-1, coverage attention, GRU-2, maxout output, log_softmax.\n\n"
      "Args:\n  weights: DecoderWeights.\n  tensors: StepTensors (inputs, scratch, outputs; device memory of `device`).\n"
      "  device: 'cpu' or 'cuda'.\n  stream: cudaStream_t as int (CUDA only; 0 = default stream).\n"
      "Raises:\n  ValueError on bad sizes or null pointers; RuntimeError for 'cuda' in a CPU-only build.");

  m.def(
      "linear",
      [](const LinearWeights& lin, std::uintptr_t x, std::uintptr_t y, int N, bool accumulate,
         const std::string& device, std::uintptr_t stream) {
        const Device dev = parse_device(device);
        check_linear_args(lin, x, y, N);
        const float* xp = reinterpret_cast<const float*>(x);
        float* yp = reinterpret_cast<float*>(y);
        py::gil_scoped_release nogil;
        if (dev == Device::CPU) linear_cpu(lin, xp, yp, N, accumulate);
        else linear_cuda(lin, xp, yp, N, accumulate, to_stream(stream));
      },
      py::arg("lin"), py::arg("x_ptr"), py::arg("y_ptr"), py::arg("N"), py::arg("accumulate"), py::arg("device"),
      py::arg("stream") = 0,
      "y[N, out] = x[N, in] W^T * scale + bias (+ y when accumulate); x and y are float32 pointers.");

  m.def("set_linear_rows_max_n", &set_linear_rows_max_n, py::arg("n"),
        "CUDA linear: use the one-warp-per-output kernel for N <= n rows (0..32; 0 = never; default 32).\n"
        "Process-wide. RuntimeError in a CPU-only build.");
  m.def("linear_rows_max_n", &linear_rows_max_n, "The current set_linear_rows_max_n threshold (0 = off; 0 in a CPU-only build).");
  m.def("set_energy_max_splits", &set_energy_max_splits, py::arg("s"),
        "CUDA energy: allow up to s channel slices (1..16; 1 = never split; default 16).\n"
        "Process-wide. RuntimeError in a CPU-only build.");
  m.def("energy_max_splits", &energy_max_splits, "The current set_energy_max_splits limit (1 = off; 1 in a CPU-only build).");
  m.def("energy_splits", &energy_splits, py::arg("N"), py::arg("L"), py::arg("d"),
        "How many channel slices the CUDA energy uses for N rows, L cells and attention width d (1 when off or\n"
        "in a CPU-only build); size StepTensors.energy for that many [N, L] slices and set energy_splits.");

  m.def(
      "coverage_attention",
      [](const DecoderWeights& w, const StepTensors& t, const std::string& device, std::uintptr_t stream) {
        const Device dev = parse_device(device);
        check_attention_args(w, t);
        py::gil_scoped_release nogil;
        if (dev == Device::CPU) coverage_attention_cpu(w, t);
        else coverage_attention_cuda(w, t, to_stream(stream));
      },
      py::arg("weights"), py::arg("tensors"), py::arg("device"), py::arg("stream") = 0,
      "Coverage attention alone: reads tensors.wa (= W_a h_hat), coverage, feats, uaf; writes energy, alpha,\n"
      "context and coverage_out.");

  py::class_<BeamState> bs(m, "BeamState", "One beam-search bookkeeping step for B images x k slots (see beam_select.h).");
  bs.def(py::init<>())
      .def_readwrite("B", &BeamState::B)
      .def_readwrite("k", &BeamState::k)
      .def_readwrite("V", &BeamState::V)
      .def_readwrite("eos", &BeamState::eos)
      .def_readwrite("step", &BeamState::step, "t when step_ptr is 0")
      .def_readwrite("max_steps", &BeamState::max_steps, "with step_ptr: rows of the words/parents/sources histories");
  ptr_field(bs, "log_probs", &BeamState::log_probs, "in [B*k, V]");
  ptr_field(bs, "score", &BeamState::score, "in/out [B, k] float32");
  ptr_field(bs, "dead", &BeamState::dead, "in/out [B] int32");
  ptr_field(bs, "done", &BeamState::done, "in/out [B] uint8");
  ptr_field(bs, "fin_score", &BeamState::fin_score, "in/out [B, k] float32");
  ptr_field(bs, "fin_step", &BeamState::fin_step, "in/out [B, k] int32");
  ptr_field(bs, "fin_cand", &BeamState::fin_cand, "in/out [B, k] int32");
  ptr_field(bs, "words", &BeamState::words, "out [B, k] int32");
  ptr_field(bs, "parents", &BeamState::parents, "out [B, k] int32");
  ptr_field(bs, "sources", &BeamState::sources, "out [B, k] int32");
  ptr_field(bs, "parent_rows", &BeamState::parent_rows, "out [B*k] int32");
  ptr_field(bs, "prev_token", &BeamState::prev_token, "out [B*k] int32");
  ptr_field(bs, "all_done", &BeamState::all_done, "out [1] int32 (may be 0: not computed, unless step_ptr is set)");
  ptr_field(bs, "step_ptr", &BeamState::step_ptr,
            "in/out [1] int32 step counter or 0; when set, t = *step_ptr, words/parents/sources are the bases of\n"
            "[max_steps, B, k] histories (row t is written), t outside [0, max_steps) changes nothing but all_done,\n"
            "and every call adds 1 to it (see beam_select.h)");

  m.def(
      "beam_select",
      [](const BeamState& s, const std::string& device, std::uintptr_t stream) {
        const Device dev = parse_device(device);
        ABM_CHECK(s.log_probs && s.score && s.dead && s.done && s.fin_score && s.fin_step && s.fin_cand && s.words &&
                      s.parents && s.sources && s.parent_rows && s.prev_token,
                  "every BeamState pointer except all_done and step_ptr must be set");
        ABM_CHECK(!s.step_ptr || (s.all_done && s.max_steps >= 0),
                  "with step_ptr set, all_done must be set too (the call advances the step counter after computing "
                  "it) and max_steps must be >= 0, got max_steps=" << s.max_steps);
        py::gil_scoped_release nogil;
        if (dev == Device::CPU) beam_select_cpu(s);
        else beam_select_cuda(s, to_stream(stream));
      },
      py::arg("state"), py::arg("device"), py::arg("stream") = 0,
      "Choose each image's k best candidates and update its finished list and live slots (spec 5.1), as\n"
      "abm_rt/decode/batched.py does; writes this step's history and the rows to continue.");

  m.def(
      "gather_rows",
      [](std::uintptr_t src, std::uintptr_t rows, std::uintptr_t dst, int N, int width, const std::string& device,
         std::uintptr_t stream) {
        const Device dev = parse_device(device);
        ABM_CHECK(src && rows && dst && N >= 0 && width >= 0, "gather_rows: null pointer or negative size");
        ABM_CHECK(src != dst, "gather_rows: src and dst must not alias");
        const float* sp = reinterpret_cast<const float*>(src);
        const int32_t* rp = reinterpret_cast<const int32_t*>(rows);
        float* dp = reinterpret_cast<float*>(dst);
        py::gil_scoped_release nogil;
        if (dev == Device::CPU) gather_rows_cpu(sp, rp, dp, N, width);
        else gather_rows_cuda(sp, rp, dp, N, width, to_stream(stream));
      },
      py::arg("src_ptr"), py::arg("rows_ptr"), py::arg("dst_ptr"), py::arg("N"), py::arg("width"), py::arg("device"),
      py::arg("stream") = 0, "dst[r, :] = src[rows[r], :] for float32 rows of `width` values.");

  m.def("cuda_available", &cuda_available, "True when built with CUDA and a CUDA device is present.");
  m.def(
      "built_with_cuda",
      []() {
#ifdef ABM_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA twins were compiled in (nvcc found at build time).");
}
