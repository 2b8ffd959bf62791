// Shared helpers for the flexmoe CUDA kernels: argument checks, launch checks, dtype glue,
// the row kernels' block shape and size check.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "flexmoe.h"

// Argument check: throws std::invalid_argument (Python ValueError) with a full sentence.
//   FLEXMOE_CHECK(E <= 256, "num_experts must be <= 256, got " << E);
#define FLEXMOE_CHECK(cond, msg)                                             \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::ostringstream flexmoe_os_;                                        \
      flexmoe_os_ << "flexmoe_kernels._C." << __func__ << ": " << msg;       \
      throw std::invalid_argument(flexmoe_os_.str());                        \
    }                                                                        \
  } while (0)

#define FLEXMOE_CHECK_PTR(ptr) \
  FLEXMOE_CHECK((ptr) != 0, "pointer argument '" #ptr "' must not be null (0)")

// Every CUDA call and launch: throws std::runtime_error with the CUDA error text.
#define FLEXMOE_CUDA_CHECK(expr, what)                                                  \
  do {                                                                                  \
    cudaError_t flexmoe_err_ = (expr);                                                  \
    if (flexmoe_err_ != cudaSuccess) {                                                  \
      std::ostringstream flexmoe_os_;                                                   \
      flexmoe_os_ << "flexmoe_kernels._C." << __func__ << ": " << what << " failed: " \
                  << cudaGetErrorName(flexmoe_err_) << ": "                            \
                  << cudaGetErrorString(flexmoe_err_);                                 \
      throw std::runtime_error(flexmoe_os_.str());                                      \
    }                                                                                   \
  } while (0)

#define FLEXMOE_LAUNCH_CHECK(kernel) FLEXMOE_CUDA_CHECK(cudaGetLastError(), "launch of " kernel)

namespace flexmoe {

constexpr std::int64_t kInt32Max = 2147483647LL;

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
inline T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline void check_dtype(int dtype) {
  FLEXMOE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
                "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " << dtype);
}

// Warps per block of the row kernels (gather in permute.cu, combine in combine.cu): one warp
// per row, blockDim (32, kWarpsPerBlock).
constexpr int kWarpsPerBlock = 8;

// Sizes of the row kernels: T, D >= 1, K in [1, 256], T*K pair ids and the grid fit in int32.
inline void check_rows(std::int64_t T, std::int64_t D, int K) {
  FLEXMOE_CHECK(T >= 1, "num_tokens (T) must be >= 1, got " << T);
  FLEXMOE_CHECK(D >= 1, "hidden (D) must be >= 1, got " << D);
  FLEXMOE_CHECK(K >= 1 && K <= kMaxExperts, "top_k (K) must be in [1, 256], got " << K);
  FLEXMOE_CHECK(T * K <= kInt32Max, "T*K = " << T * K << " pairs exceed the int32 pair ids");
  FLEXMOE_CHECK((T + kWarpsPerBlock - 1) / kWarpsPerBlock * K <= kInt32Max,
                "num_tokens=" << T << " needs too many blocks");
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T loaded/stored as one aligned vector access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Dispatch a dtype code to a C++ element type.
#define FLEXMOE_DISPATCH_DTYPE(dtype, T, ...)       \
  switch (dtype) {                                  \
    case kFloat32: {                                \
      using T = float;                              \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case kFloat16: {                                \
      using T = __half;                             \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case kBFloat16: {                               \
      using T = __nv_bfloat16;                      \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    default:                                        \
      check_dtype(dtype);                           \
  }

}  // namespace flexmoe
