// Argument checks and CUDA error checks shared by every op. Messages name the argument.
#pragma once
#include <stdexcept>
#include <string>
#include <type_traits>

namespace abm {
namespace detail {

// An error message built without std::ostream. On the GPU machine, streaming a number into an
// std::ostringstream inside this module crashed the process under pytest (cuda-gdb: inside
// basic_ostream::_M_insert<long> from validate(), tests/logs/2026-12-02_native_check_h200/gdb_raising.log),
// most likely a mismatch between the locale facets of the libstdc++ this module was built against and
// the one loaded in the process. std::to_string formats through vsnprintf and needs no locale facet.
class Message {
 public:
  Message& operator<<(const char* s) { text_ += s; return *this; }
  Message& operator<<(const std::string& s) { text_ += s; return *this; }
  Message& operator<<(char c) { text_ += c; return *this; }
  template <typename T, typename = typename std::enable_if<std::is_arithmetic<T>::value>::type>
  Message& operator<<(T v) { text_ += std::to_string(v); return *this; }
  const std::string& str() const { return text_; }

 private:
  std::string text_;
};

}  // namespace detail
}  // namespace abm

#define ABM_CHECK(cond, msg)                                                   \
  do {                                                                         \
    if (!(cond)) {                                                             \
      ::abm::detail::Message abm_msg_;                                         \
      abm_msg_ << msg;                                                         \
      throw std::invalid_argument(abm_msg_.str());                             \
    }                                                                          \
  } while (0)

#ifdef ABM_WITH_CUDA
#include <cuda_runtime.h>
#define ABM_CUDA_CHECK(expr)                                                   \
  do {                                                                         \
    cudaError_t abm_err_ = (expr);                                             \
    if (abm_err_ != cudaSuccess) {                                             \
      throw std::runtime_error(std::string("CUDA error: ") +                   \
                               cudaGetErrorString(abm_err_) + " at " __FILE__); \
    }                                                                          \
  } while (0)
#endif
