// Argument checks and CUDA error checks shared by every op. Messages name the argument.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define ABM_CHECK(cond, msg)                                                   \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::ostringstream abm_os_;                                              \
      abm_os_ << msg;                                                          \
      throw std::invalid_argument(abm_os_.str());                              \
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
