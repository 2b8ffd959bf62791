// Weighted top-k combine (forward and backward): the combine stage.
//
// Legend: T tokens, K top-k, P = T*K pairs, D hidden, VEC elements per vector access.
// One warp per token row; rows are addressed with int64 offsets (T*K*D may exceed 2^31).
// Every reduction runs in a fixed order (k ascending, then a fixed butterfly), so results
// are bitwise deterministic: no atomics.

#include "common.cuh"

namespace flexmoe {
namespace {

// out (T, D)[t] = sum_k w[t,k] * y (P, D)[inv[t*K+k]]   (w null: weights 1)
template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) combine_fwd_kernel(
    const T* __restrict__ y_PD,            // (P, D) T
    const float* __restrict__ w_TK,        // (T, K) fp32 or null
    const int32_t* __restrict__ inv_pairs, // (P,) int32
    std::int64_t num_tokens, std::int64_t D, int K,
    T* __restrict__ out_TD) {              // (T, D) T out
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (t >= num_tokens) return;
  using V = Vec<T, VEC>;
  const std::int64_t nvec = D / VEC;
  V* out = reinterpret_cast<V*>(out_TD + t * D);
  for (std::int64_t c = threadIdx.x; c < nvec; c += 32) {
    float acc[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] = 0.0f;
    for (int k = 0; k < K; ++k) {
      const std::int64_t row = inv_pairs[t * K + k];
      const float w = w_TK != nullptr ? w_TK[t * K + k] : 1.0f;
      const V yv = reinterpret_cast<const V*>(y_PD + row * D)[c];
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] = fmaf(w, to_float(yv.v[u]), acc[u]);
    }
    V o;
#pragma unroll
    for (int u = 0; u < VEC; ++u) o.v[u] = from_float<T>(acc[u]);
    out[c] = o;
  }
}

// dy (P, D)[inv[t*K+k]] = w[t,k] * dout[t]          (if dy_PD)
// dw (T, K)[t,k] = <dout[t], y[inv[t*K+k]]>  fp32    (if dw_TK)
template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) combine_bwd_kernel(
    const T* __restrict__ dout_TD,          // (T, D) T
    const T* __restrict__ y_PD,             // (P, D) T or null (when dw_TK is null)
    const float* __restrict__ w_TK,         // (T, K) fp32 or null (weights 1)
    const int32_t* __restrict__ inv_pairs,  // (P,) int32
    std::int64_t num_tokens, std::int64_t D, int K,
    T* __restrict__ dy_PD,                  // (P, D) T out or null
    float* __restrict__ dw_TK) {            // (T, K) fp32 out or null
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (t >= num_tokens) return;
  using V = Vec<T, VEC>;
  const std::int64_t nvec = D / VEC;
  const V* dout = reinterpret_cast<const V*>(dout_TD + t * D);
  for (int k = 0; k < K; ++k) {
    const std::int64_t row = inv_pairs[t * K + k];
    const float w = w_TK != nullptr ? w_TK[t * K + k] : 1.0f;
    float dot = 0.0f;
    for (std::int64_t c = threadIdx.x; c < nvec; c += 32) {
      const V g = dout[c];
      if (dw_TK != nullptr) {
        const V yv = reinterpret_cast<const V*>(y_PD + row * D)[c];
#pragma unroll
        for (int u = 0; u < VEC; ++u) dot = fmaf(to_float(g.v[u]), to_float(yv.v[u]), dot);
      }
      if (dy_PD != nullptr) {
        V o;
#pragma unroll
        for (int u = 0; u < VEC; ++u) o.v[u] = from_float<T>(w * to_float(g.v[u]));
        reinterpret_cast<V*>(dy_PD + row * D)[c] = o;
      }
    }
    if (dw_TK != nullptr) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (threadIdx.x == 0) dw_TK[t * K + k] = dot;
    }
  }
}

// Largest vector width (in elements of `elem_bytes`) dividing D with all pointers aligned.
int pick_vec(std::int64_t D, int elem_bytes, std::initializer_list<std::uintptr_t> ptrs) {
  for (int bytes = 16; bytes > elem_bytes; bytes /= 2) {
    const int vec = bytes / elem_bytes;
    if (D % vec) continue;
    bool ok = true;
    for (std::uintptr_t p : ptrs) ok = ok && (p % bytes == 0);
    if (ok) return vec;
  }
  return 1;
}

#define FLEXMOE_DISPATCH_VEC(vec, ...)      \
  do {                                      \
    switch (vec) {                          \
      case 8: {                             \
        constexpr int VEC = 8;              \
        __VA_ARGS__;                        \
        break;                              \
      }                                     \
      case 4: {                             \
        constexpr int VEC = 4;              \
        __VA_ARGS__;                        \
        break;                              \
      }                                     \
      case 2: {                             \
        constexpr int VEC = 2;              \
        __VA_ARGS__;                        \
        break;                              \
      }                                     \
      default: {                            \
        constexpr int VEC = 1;              \
        __VA_ARGS__;                        \
      }                                     \
    }                                       \
  } while (0)

inline int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace

void combine_forward(std::uintptr_t y, int dtype, std::int64_t num_tokens, std::int64_t hidden,
                     int top_k, std::uintptr_t w, std::uintptr_t inv_pairs, std::uintptr_t out,
                     std::uintptr_t stream) {
  check_dtype(dtype);
  check_rows(num_tokens, hidden, top_k);
  FLEXMOE_CHECK_PTR(y);
  FLEXMOE_CHECK_PTR(inv_pairs);
  FLEXMOE_CHECK_PTR(out);
  const int vec = pick_vec(hidden, elem_size(dtype), {y, out});
  const dim3 block(32, kWarpsPerBlock);
  const std::int64_t grid = (num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  cudaStream_t st = as_stream(stream);
  FLEXMOE_DISPATCH_DTYPE(dtype, T, {
    FLEXMOE_DISPATCH_VEC(vec, {
      combine_fwd_kernel<T, VEC><<<static_cast<unsigned>(grid), block, 0, st>>>(
          as_ptr<const T>(y), as_ptr<const float>(w), as_ptr<const int32_t>(inv_pairs),
          num_tokens, hidden, top_k, as_ptr<T>(out));
    });
  });
  FLEXMOE_LAUNCH_CHECK("combine_fwd_kernel");
}

void combine_backward(std::uintptr_t dout, int dtype, std::int64_t num_tokens,
                      std::int64_t hidden, int top_k, std::uintptr_t y, std::uintptr_t w,
                      std::uintptr_t inv_pairs, std::uintptr_t dy, std::uintptr_t dw,
                      std::uintptr_t stream) {
  check_dtype(dtype);
  check_rows(num_tokens, hidden, top_k);
  FLEXMOE_CHECK_PTR(dout);
  FLEXMOE_CHECK_PTR(inv_pairs);
  FLEXMOE_CHECK(dy != 0 || dw != 0, "at least one of dy and dw must be a device pointer");
  FLEXMOE_CHECK(dw == 0 || y != 0, "y must be a device pointer when dw is requested");
  const int vec = pick_vec(hidden, elem_size(dtype), {dout, y, dy});
  const dim3 block(32, kWarpsPerBlock);
  const std::int64_t grid = (num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  cudaStream_t st = as_stream(stream);
  FLEXMOE_DISPATCH_DTYPE(dtype, T, {
    FLEXMOE_DISPATCH_VEC(vec, {
      combine_bwd_kernel<T, VEC><<<static_cast<unsigned>(grid), block, 0, st>>>(
          as_ptr<const T>(dout), as_ptr<const T>(y), as_ptr<const float>(w),
          as_ptr<const int32_t>(inv_pairs), num_tokens, hidden, top_k, as_ptr<T>(dy),
          as_ptr<float>(dw));
    });
  });
  FLEXMOE_LAUNCH_CHECK("combine_bwd_kernel");
}

}  // namespace flexmoe
