// flexmoe_kernels._C: host API of the CUDA kernels (no CUDA or PyTorch headers needed).
//
// Legend: T tokens, E experts (<= 256), K top-k, P = T*K routed (token, slot) pairs,
// D hidden size, NB router blocks.
//
// Every function takes raw device pointers as std::uintptr_t (0 = absent where optional),
// sizes, a dtype code and the CUDA stream (a cudaStream_t as std::uintptr_t; 0 = legacy
// default stream). Nothing here depends on PyTorch's C++ ABI.
//
// Errors: a bad argument throws std::invalid_argument (Python ValueError) whose message
// names the argument; a failed CUDA call or launch throws std::runtime_error (Python
// RuntimeError) carrying cudaGetErrorName/cudaGetErrorString.
#pragma once

#include <cstdint>
#include <string>

namespace flexmoe {

// dtype codes shared with flexmoe_kernels/ops/cuda/_ext.py
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// allow-mask layouts
enum MaskMode : int { kMaskNone = 0, kMaskExperts = 1, kMaskTokens = 2 };

constexpr int kMaxExperts = 256;

// ---- routing.cu: routing stage

// Bytes of scratch memory router_forward needs (int32 block histograms + a counter).
std::int64_t router_workspace_bytes(std::int64_t num_tokens, int num_experts);

// Fused masked softmax-top-k router + per-expert histogram + prefix sum + stable permutation.
//   logits      (T, E) dtype `dtype`, row-major
//   bias        (E,)   float32 or 0; min(bias, 0) is added to the logits
//   mask        0 | (E,) | (T, E) uint8/bool, layout `mask_mode`; false = logit -inf
//   topk_ids    (T, K) int32 out, by decreasing probability (ties: lower expert id)
//   topk_w      (T, K) float32 out, selected probabilities (renormalised iff renorm)
//   probs       (T, E) float32 out, softmax over allowed experts (0 where disallowed)
//   z           (T, E) float32 out or 0: masked logits (-inf where disallowed)
//   counts      (E,)   int32 out;  offsets (E+1,) int32 out (exclusive prefix sum)
//   sorted_pairs(P,)   int32 out: pair ids t*K+k grouped by expert, increasing within one
//   inv_pairs   (P,)   int32 out: sorted_pairs[inv_pairs[p]] == p
//   workspace   router_workspace_bytes(T, E) bytes, any content
void router_forward(std::uintptr_t logits, int dtype, std::int64_t num_tokens, int num_experts,
                    int top_k, std::uintptr_t bias, std::uintptr_t mask, int mask_mode,
                    bool renorm, std::uintptr_t topk_ids, std::uintptr_t topk_w,
                    std::uintptr_t probs, std::uintptr_t z, std::uintptr_t counts,
                    std::uintptr_t offsets, std::uintptr_t sorted_pairs,
                    std::uintptr_t inv_pairs, std::uintptr_t workspace,
                    std::int64_t workspace_bytes, std::uintptr_t stream);

// Router backward: dz (T, E) float32 = d loss / d (masked logits), from
//   d_topk_w (T, K) float32 or 0 (gradient of topk_w) and d_z (T, E) float32 or 0 (gradient
//   of the z output, e.g. from a z-loss; dropped where the mask disallows).
void router_backward(std::uintptr_t probs, std::uintptr_t topk_ids, std::uintptr_t topk_w,
                     std::uintptr_t d_topk_w, std::uintptr_t d_z, std::uintptr_t mask,
                     int mask_mode, std::int64_t num_tokens, int num_experts, int top_k,
                     bool renorm, std::uintptr_t dz_out, std::uintptr_t stream);

// ---- permute.cu: permutation stage

// Gather: dst (P, D)[i] = src (T, D)[sorted_pairs[i] / K]; `elem_bytes` in {2, 4}.
void gather_rows(std::uintptr_t src, int elem_bytes, std::int64_t num_tokens, std::int64_t hidden,
                 std::uintptr_t sorted_pairs, std::int64_t num_pairs, int top_k,
                 std::uintptr_t dst, std::uintptr_t stream);

// ---- combine.cu: combine stage

// Weighted top-k combine: out (T, D)[t] = sum_k w[t,k] * y (P, D)[inv_pairs[t*K+k]],
// float32 accumulation in k order (deterministic). w (T, K) float32 or 0 (all ones: the
// backward of gather_rows). y and out have dtype `dtype`.
void combine_forward(std::uintptr_t y, int dtype, std::int64_t num_tokens, std::int64_t hidden,
                     int top_k, std::uintptr_t w, std::uintptr_t inv_pairs, std::uintptr_t out,
                     std::uintptr_t stream);

// Combine backward: dy (P, D)[inv[t*K+k]] = w[t,k] * dout[t] (if dy != 0) and
// dw (T, K) float32 [t,k] = <dout[t], y[inv[t*K+k]]> (if dw != 0; needs y).
void combine_backward(std::uintptr_t dout, int dtype, std::int64_t num_tokens,
                      std::int64_t hidden, int top_k, std::uintptr_t y, std::uintptr_t w,
                      std::uintptr_t inv_pairs, std::uintptr_t dy, std::uintptr_t dw,
                      std::uintptr_t stream);

// ---- routing.cu: version queries (kept with the router, the first launcher to load)

// The CUDA runtime version this module was built against (no CUDA call).
int built_cuda_version();

// The CUDA version the installed driver supports (cudaDriverGetVersion; creates no context),
// 0 when no driver is installed. The static runtime needs driver >= the built major version.
int driver_cuda_version();

}  // namespace flexmoe
