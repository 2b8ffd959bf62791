// The routing stage: fused masked softmax-top-k router, per-expert histogram, prefix sum and
// stable permutation; and the router backward. (Also the two version queries of the module.)
//
// Legend: T tokens, E experts (<= 256), K top-k, P = T*K pairs, NB router blocks,
// G lanes per token row (a power of two <= 32), VPL logits per lane (E <= G * VPL).
//
// Launches per forward (all on the caller's stream, no host synchronisation):
//   1. cudaMemsetAsync of a 4-byte completion counter;
//   2. router_fwd_kernel: one G-lane group per token row (vectorised over E, fp32 math),
//      writes ids / weights / probs / masked logits and a per-block histogram; the last block
//      to finish (threadfence-reduction pattern) scans the NB x E histograms into counts,
//      offsets and per-(block, expert) base positions;
//   3. permute_kernel: re-reads the block's top-k ids and writes sorted_pairs / inv_pairs with
//      a stable (pair-id ordered) rank inside the block (warp match + per-warp counts).
// The result is deterministic and equals torch.sort(topk_ids.flatten(), stable=True).

#include "common.cuh"

namespace flexmoe {
namespace {

constexpr int kRouterThreads = 256;
constexpr int kPermuteThreads = 256;
constexpr int kPermuteWarps = kPermuteThreads / 32;
// Selection key of an allowed expert whose probability is NaN: below every probability (>= 0),
// above disallowed experts (-1), so such rows still pick allowed, in-range experts.
constexpr float kNanProb = -0.5f;

struct RouterShape {
  int G;               // lanes per row
  int VPL;             // values per lane
  int rows_per_block;  // token rows per block
};

inline RouterShape router_shape(int E) {
  RouterShape s;
  if (E <= 32) {
    s.G = 4;
    while (s.G < E) s.G *= 2;
    s.VPL = 1;
  } else {
    s.G = 32;
    s.VPL = (E <= 64) ? 2 : (E <= 128) ? 4 : 8;
  }
  const int groups = kRouterThreads / s.G;
  // 32 rows per block for E <= 32 (many blocks in flight at moderate T), 64 for larger E
  // (keeps the NB x E histogram table that the last block scans small).
  const int rows = s.VPL == 1 ? 32 : 64;
  s.rows_per_block = groups * ((rows + groups - 1) / groups);
  return s;
}

template <int G>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off, G));
  return v;
}

template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, G);
  return v;
}

// Arg-max over the group; ties go to the lower index (all lanes end with the same answer).
template <int G>
__device__ __forceinline__ void group_argmax(float& v, int& i) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off, G);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off, G);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

__device__ __forceinline__ bool allowed_at(const uint8_t* __restrict__ mask, int mask_mode,
                                           std::int64_t t, int E, int j) {
  if (mask_mode == kMaskExperts) return mask[j] != 0;
  if (mask_mode == kMaskTokens) return mask[t * E + j] != 0;
  return true;
}

template <typename T, int G, int VPL>
__global__ void __launch_bounds__(kRouterThreads) router_fwd_kernel(
    const T* __restrict__ logits_TE,     // (T, E) T
    const float* __restrict__ bias_E,    // (E,) fp32 or null
    const uint8_t* __restrict__ mask,    // null | (E,) | (T, E) bool
    int mask_mode, std::int64_t num_tokens, int E, int K, int renorm, int rows_per_block,
    int32_t* __restrict__ topk_ids_TK,   // (T, K) int32 out
    float* topk_w_TK,                    // (T, K) fp32 out (re-read by the same thread)
    float* __restrict__ probs_TE,        // (T, E) fp32 out
    float* __restrict__ z_TE,            // (T, E) fp32 out or null
    int32_t* __restrict__ table_BE,      // (NB, E) int32: block histograms -> block bases
    unsigned int* __restrict__ counter,  // zeroed before the launch
    int32_t* __restrict__ counts_E,      // (E,) int32 out
    int32_t* __restrict__ offsets_E1) {  // (E+1,) int32 out
  __shared__ int s_hist[kMaxExperts];
  __shared__ int s_scan[kRouterThreads];
  __shared__ bool s_last;

  const int tid = threadIdx.x;
  for (int e = tid; e < E; e += blockDim.x) s_hist[e] = 0;
  __syncthreads();

  const int lane = tid % G;
  const int group = tid / G;
  constexpr int kGroups = kRouterThreads / G;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * rows_per_block;

  // Loads one row's masked logits: z = logit + min(bias, 0), -inf where disallowed or j >= E;
  // sel = 0 for allowed experts (replaced by the probability), -1 disallowed, -inf absent.
  auto load_row = [&](std::int64_t t, float (&z)[VPL], float (&sel)[VPL]) {
    const bool row_ok = t < num_tokens;
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      const int j = v * G + lane;
      z[v] = -INFINITY;
      sel[v] = -INFINITY;
      if (row_ok && j < E) {
        float x = to_float(logits_TE[t * E + j]);
        // min(b, 0) keeping a NaN bias NaN (fminf would drop it): NaN must not vanish.
        if (bias_E != nullptr) x += bias_E[j] > 0.0f ? 0.0f : bias_E[j];
        const bool ok = allowed_at(mask, mask_mode, t, E, j);
        z[v] = ok ? x : -INFINITY;
        sel[v] = ok ? 0.0f : -1.0f;
      }
    }
  };

  float z_next[VPL], sel_next[VPL];
  load_row(row0 + group, z_next, sel_next);
  // The trip count is uniform across the block so every lane reaches every shuffle. The next
  // row's loads are issued before this row's arithmetic (software prefetch).
  for (int it = 0; it < rows_per_block; it += kGroups) {
    const std::int64_t t = row0 + it + group;
    const bool row_ok = t < num_tokens;
    float z[VPL], sel[VPL];
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      z[v] = z_next[v];
      sel[v] = sel_next[v];
    }
    if (it + kGroups < rows_per_block) load_row(t + kGroups, z_next, sel_next);

    float m = -INFINITY;
#pragma unroll
    for (int v = 0; v < VPL; ++v) m = fmaxf(m, z[v]);
    m = group_max<G>(m);
    if (m == -INFINITY) m = 0.0f;  // no allowed expert (invalid row): probabilities 0, not NaN
    float ex[VPL];
    float s = 0.0f;
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      ex[v] = expf(z[v] - m);
      s += ex[v];
    }
    s = group_sum<G>(s);
    const float inv_s = (s > 0.0f || isnan(s)) ? 1.0f / s : 0.0f;  // NaN logits: NaN probabilities
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      const int j = v * G + lane;
      const float p = ex[v] * inv_s;
      if (sel[v] == 0.0f) sel[v] = isnan(p) ? kNanProb : p;  // NaN: ranked after every number
      if (row_ok && j < E) {
        probs_TE[t * E + j] = p;
        if (z_TE != nullptr) z_TE[t * E + j] = z[v];
      }
    }

    // Top-k: K rounds of a group arg-max; the winner's owner lane retires it.
    float wsum = 0.0f;
    for (int k = 0; k < K; ++k) {
      float best = -INFINITY;
      int bi = 0x7fffffff;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        if (sel[v] > best) {
          best = sel[v];
          bi = v * G + lane;
        }
      }
      group_argmax<G>(best, bi);
      // a disallowed pick (invalid row) weighs 0; an allowed expert whose probability is NaN
      // (NaN logits or bias) keeps its NaN weight, so the NaN reaches the output
      const float w = best == kNanProb ? __int_as_float(0x7fc00000) : fmaxf(best, 0.0f);
      wsum += w;
#pragma unroll
      for (int v = 0; v < VPL; ++v)
        if (v * G + lane == bi) sel[v] = -INFINITY;
      if (row_ok) {
        if (lane == (k % G)) {
          topk_ids_TK[t * K + k] = bi;
          topk_w_TK[t * K + k] = w;
        }
        if (lane == 0 && bi < E) atomicAdd(&s_hist[bi], 1);
      }
    }
    if (renorm && row_ok) {
      for (int k = lane; k < K; k += G) topk_w_TK[t * K + k] = topk_w_TK[t * K + k] / wsum;
    }
  }

  // Publish this block's histogram; the last block to arrive scans all of them.
  __syncthreads();
  const int NB = gridDim.x;
  for (int e = tid; e < E; e += blockDim.x) table_BE[static_cast<std::int64_t>(blockIdx.x) * E + e] = s_hist[e];
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = (atomicAdd(counter, 1u) == static_cast<unsigned>(NB - 1));
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  // Thread (e, seg) owns expert e and a contiguous segment of blocks.
  const int segs = kRouterThreads / E;  // >= 1 because E <= 256
  const int e = tid % E;
  const int seg = tid / E;
  const int seg_len = (NB + segs - 1) / segs;
  const bool active = seg < segs;
  const int b0 = seg * seg_len;
  const int b1 = min(NB, b0 + seg_len);
  int run = 0;
  if (active)
    for (int b = b0; b < b1; ++b) run += __ldcg(&table_BE[static_cast<std::int64_t>(b) * E + e]);
  if (active) s_scan[seg * E + e] = run;
  __syncthreads();
  if (tid < E) {  // exclusive scan over segments, per expert
    int acc = 0;
    for (int sg = 0; sg < segs; ++sg) {
      const int v = s_scan[sg * E + tid];
      s_scan[sg * E + tid] = acc;
      acc += v;
    }
    s_hist[tid] = acc;  // total pairs of expert tid
    counts_E[tid] = acc;
  }
  __syncthreads();
  // Exclusive scan of the totals over experts (Hillis-Steele in s_hist's upper use of s_scan
  // is not possible while s_scan is live, so one warp does it with shuffles).
  __shared__ int s_off[kMaxExperts + 1];
  if (tid < 32) {
    int carry = 0;
    for (int base = 0; base < E; base += 32) {
      const int idx = base + tid;
      int v = idx < E ? s_hist[idx] : 0;
      int incl = v;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(0xffffffffu, incl, off);
        if (tid >= off) incl += o;
      }
      if (idx < E) s_off[idx] = carry + incl - v;
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (tid == 0) s_off[E] = carry;
  }
  __syncthreads();
  for (int i = tid; i <= E; i += blockDim.x) offsets_E1[i] = s_off[i];
  if (active) {
    int pos = s_off[e] + s_scan[seg * E + e];
    for (int b = b0; b < b1; ++b) {
      const std::int64_t idx = static_cast<std::int64_t>(b) * E + e;
      const int c = __ldcg(&table_BE[idx]);
      table_BE[idx] = pos;
      pos += c;
    }
  }
}

// Stable scatter of the pairs of one router block to their grouped positions.
__global__ void __launch_bounds__(kPermuteThreads) permute_kernel(
    const int32_t* __restrict__ topk_ids_TK,  // (T, K) int32
    const int32_t* __restrict__ base_BE,      // (NB, E) int32 first position per block/expert
    std::int64_t num_tokens, int E, int K, int rows_per_block,
    int32_t* __restrict__ sorted_pairs_P,     // (P,) int32 out
    int32_t* __restrict__ inv_pairs_P) {      // (P,) int32 out
  __shared__ int s_base[kMaxExperts];
  __shared__ int s_run[kMaxExperts];
  __shared__ int s_wcnt[kPermuteWarps][kMaxExperts];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  for (int e = tid; e < E; e += blockDim.x) {
    s_base[e] = base_BE[static_cast<std::int64_t>(blockIdx.x) * E + e];
    s_run[e] = 0;
  }
  for (int i = tid; i < kPermuteWarps * kMaxExperts; i += blockDim.x) (&s_wcnt[0][0])[i] = 0;
  __syncthreads();

  const std::int64_t t0 = static_cast<std::int64_t>(blockIdx.x) * rows_per_block;
  const std::int64_t t1 = min(num_tokens, t0 + rows_per_block);
  const std::int64_t p0 = t0 * K;
  const std::int64_t p1 = t1 * K;
  for (std::int64_t pb = p0; pb < p1; pb += kPermuteThreads) {
    const std::int64_t p = pb + tid;
    const bool valid = p < p1;
    const int e = valid ? topk_ids_TK[p] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const bool leader = rank == 0;
    if (valid && leader) s_wcnt[warp][e] = __popc(peers);
    __syncthreads();
    if (valid) {
      int pos = s_base[e] + s_run[e] + rank;
      for (int w = 0; w < warp; ++w) pos += s_wcnt[w][e];
      sorted_pairs_P[pos] = static_cast<int32_t>(p);
      inv_pairs_P[p] = pos;
    }
    __syncthreads();
    if (valid && leader) {
      atomicAdd(&s_run[e], __popc(peers));
      s_wcnt[warp][e] = 0;
    }
    __syncthreads();
  }
}

template <int G, int VPL>
__global__ void __launch_bounds__(kRouterThreads) router_bwd_kernel(
    const float* __restrict__ probs_TE,     // (T, E) fp32
    const int32_t* __restrict__ topk_ids_TK,// (T, K) int32
    const float* __restrict__ topk_w_TK,    // (T, K) fp32 (final weights)
    const float* __restrict__ d_topk_w_TK,  // (T, K) fp32 or null
    const float* __restrict__ d_z_TE,       // (T, E) fp32 or null
    const uint8_t* __restrict__ mask, int mask_mode, std::int64_t num_tokens, int E, int K,
    int renorm,
    float* __restrict__ dz_TE) {            // (T, E) fp32 out
  const int lane = threadIdx.x % G;
  const std::int64_t t = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  const bool row_ok = t < num_tokens;  // uniform within a group; groups never straddle warps
  float p[VPL], dp[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int j = v * G + lane;
    p[v] = (row_ok && j < E) ? probs_TE[t * E + j] : 0.0f;
    dp[v] = 0.0f;
  }
  if (row_ok && d_topk_w_TK != nullptr) {
    float S = 0.0f, sdw = 0.0f;
    if (renorm) {
      for (int k = 0; k < K; ++k) {
        const int id = topk_ids_TK[t * K + k];
        S += probs_TE[t * E + id];
        sdw += d_topk_w_TK[t * K + k] * topk_w_TK[t * K + k];
      }
    }
    for (int k = 0; k < K; ++k) {
      const int id = topk_ids_TK[t * K + k];
      const float g = d_topk_w_TK[t * K + k];
      const float d = renorm ? (g - sdw) / S : g;
#pragma unroll
      for (int v = 0; v < VPL; ++v)
        if (v * G + lane == id) dp[v] += d;
    }
  }
  float dot = 0.0f;
#pragma unroll
  for (int v = 0; v < VPL; ++v) dot += p[v] * dp[v];
  dot = group_sum<G>(dot);
  if (!row_ok) return;
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int j = v * G + lane;
    if (j < E) {
      float g = p[v] * (dp[v] - dot);
      if (d_z_TE != nullptr && allowed_at(mask, mask_mode, t, E, j)) g += d_z_TE[t * E + j];
      dz_TE[t * E + j] = g;
    }
  }
}

// Runs __VA_ARGS__ with constexpr G and VPL fitting E (see router_shape).
#define FLEXMOE_DISPATCH_ROUTER_SHAPE(E, ...)                          \
  do {                                                                 \
    const RouterShape flexmoe_rs_ = router_shape(E);                   \
    if (flexmoe_rs_.VPL == 1 && flexmoe_rs_.G == 4) {                  \
      constexpr int G = 4, VPL = 1;                                    \
      __VA_ARGS__;                                                     \
    } else if (flexmoe_rs_.VPL == 1 && flexmoe_rs_.G == 8) {           \
      constexpr int G = 8, VPL = 1;                                    \
      __VA_ARGS__;                                                     \
    } else if (flexmoe_rs_.VPL == 1 && flexmoe_rs_.G == 16) {          \
      constexpr int G = 16, VPL = 1;                                   \
      __VA_ARGS__;                                                     \
    } else if (flexmoe_rs_.VPL == 1) {                                 \
      constexpr int G = 32, VPL = 1;                                   \
      __VA_ARGS__;                                                     \
    } else if (flexmoe_rs_.VPL == 2) {                                 \
      constexpr int G = 32, VPL = 2;                                   \
      __VA_ARGS__;                                                     \
    } else if (flexmoe_rs_.VPL == 4) {                                 \
      constexpr int G = 32, VPL = 4;                                   \
      __VA_ARGS__;                                                     \
    } else {                                                           \
      constexpr int G = 32, VPL = 8;                                   \
      __VA_ARGS__;                                                     \
    }                                                                  \
  } while (0)

std::int64_t num_router_blocks(std::int64_t T, int E) {
  const std::int64_t rpb = router_shape(E).rows_per_block;
  return (T + rpb - 1) / rpb;
}

void check_router_sizes(std::int64_t T, int E, int K) {
  FLEXMOE_CHECK(T >= 1, "num_tokens (T) must be >= 1, got " << T);
  FLEXMOE_CHECK(E >= 1 && E <= kMaxExperts,
                "num_experts (E) must be in [1, " << kMaxExperts << "], got " << E);
  FLEXMOE_CHECK(K >= 1 && K <= E, "top_k (K) must be in [1, E=" << E << "], got " << K);
  FLEXMOE_CHECK(T * K <= kInt32Max, "T*K = " << T * K << " pairs exceed the int32 pair ids");
  FLEXMOE_CHECK(T * E <= (std::int64_t(1) << 62), "T*E is too large: " << T * E);
}

void check_mask(std::uintptr_t mask, int mask_mode) {
  FLEXMOE_CHECK(mask_mode == kMaskNone || mask_mode == kMaskExperts || mask_mode == kMaskTokens,
                "mask_mode must be 0 (none), 1 ((E,) mask) or 2 ((T, E) mask), got " << mask_mode);
  FLEXMOE_CHECK(mask_mode == kMaskNone || mask != 0,
                "mask must be a device pointer when mask_mode is " << mask_mode << ", got 0");
}

}  // namespace

std::int64_t router_workspace_bytes(std::int64_t num_tokens, int num_experts) {
  FLEXMOE_CHECK(num_tokens >= 1, "num_tokens (T) must be >= 1, got " << num_tokens);
  FLEXMOE_CHECK(num_experts >= 1 && num_experts <= kMaxExperts,
                "num_experts (E) must be in [1, " << kMaxExperts << "], got " << num_experts);
  const std::int64_t nb = num_router_blocks(num_tokens, num_experts);
  return 16 + nb * num_experts * static_cast<std::int64_t>(sizeof(int32_t));
}

void router_forward(std::uintptr_t logits, int dtype, std::int64_t num_tokens, int num_experts,
                    int top_k, std::uintptr_t bias, std::uintptr_t mask, int mask_mode,
                    bool renorm, std::uintptr_t topk_ids, std::uintptr_t topk_w,
                    std::uintptr_t probs, std::uintptr_t z, std::uintptr_t counts,
                    std::uintptr_t offsets, std::uintptr_t sorted_pairs,
                    std::uintptr_t inv_pairs, std::uintptr_t workspace,
                    std::int64_t workspace_bytes, std::uintptr_t stream) {
  check_dtype(dtype);
  check_router_sizes(num_tokens, num_experts, top_k);
  check_mask(mask, mask_mode);
  FLEXMOE_CHECK_PTR(logits);
  FLEXMOE_CHECK_PTR(topk_ids);
  FLEXMOE_CHECK_PTR(topk_w);
  FLEXMOE_CHECK_PTR(probs);
  FLEXMOE_CHECK_PTR(counts);
  FLEXMOE_CHECK_PTR(offsets);
  FLEXMOE_CHECK_PTR(sorted_pairs);
  FLEXMOE_CHECK_PTR(inv_pairs);
  FLEXMOE_CHECK_PTR(workspace);
  FLEXMOE_CHECK(workspace % 16 == 0, "workspace must be 16-byte aligned");
  const std::int64_t need = router_workspace_bytes(num_tokens, num_experts);
  FLEXMOE_CHECK(workspace_bytes >= need, "workspace_bytes must be >= " << need
                                             << " (router_workspace_bytes), got " << workspace_bytes);
  const RouterShape shape = router_shape(num_experts);
  const std::int64_t nb = num_router_blocks(num_tokens, num_experts);
  FLEXMOE_CHECK(nb <= 2147483647LL, "too many router blocks: " << nb);
  cudaStream_t st = as_stream(stream);
  unsigned int* counter = as_ptr<unsigned int>(workspace);
  int32_t* table = as_ptr<int32_t>(workspace + 16);
  FLEXMOE_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned int), st),
                     "cudaMemsetAsync of the router completion counter");
  FLEXMOE_DISPATCH_DTYPE(dtype, T, {
    FLEXMOE_DISPATCH_ROUTER_SHAPE(num_experts, {
      router_fwd_kernel<T, G, VPL><<<static_cast<unsigned>(nb), kRouterThreads, 0, st>>>(
          as_ptr<const T>(logits), as_ptr<const float>(bias), as_ptr<const uint8_t>(mask),
          mask_mode, num_tokens, num_experts, top_k, renorm ? 1 : 0, shape.rows_per_block,
          as_ptr<int32_t>(topk_ids), as_ptr<float>(topk_w), as_ptr<float>(probs),
          as_ptr<float>(z), table, counter, as_ptr<int32_t>(counts), as_ptr<int32_t>(offsets));
    });
  });
  FLEXMOE_LAUNCH_CHECK("router_fwd_kernel");
  permute_kernel<<<static_cast<unsigned>(nb), kPermuteThreads, 0, st>>>(
      as_ptr<const int32_t>(topk_ids), table, num_tokens, num_experts, top_k,
      shape.rows_per_block, as_ptr<int32_t>(sorted_pairs), as_ptr<int32_t>(inv_pairs));
  FLEXMOE_LAUNCH_CHECK("permute_kernel");
}

void router_backward(std::uintptr_t probs, std::uintptr_t topk_ids, std::uintptr_t topk_w,
                     std::uintptr_t d_topk_w, std::uintptr_t d_z, std::uintptr_t mask,
                     int mask_mode, std::int64_t num_tokens, int num_experts, int top_k,
                     bool renorm, std::uintptr_t dz_out, std::uintptr_t stream) {
  check_router_sizes(num_tokens, num_experts, top_k);
  check_mask(mask, mask_mode);
  FLEXMOE_CHECK_PTR(probs);
  FLEXMOE_CHECK_PTR(topk_ids);
  FLEXMOE_CHECK_PTR(topk_w);
  FLEXMOE_CHECK_PTR(dz_out);
  const RouterShape shape = router_shape(num_experts);
  const std::int64_t threads = num_tokens * shape.G;
  const std::int64_t blocks = (threads + kRouterThreads - 1) / kRouterThreads;
  FLEXMOE_CHECK(blocks <= 2147483647LL, "too many blocks for num_tokens=" << num_tokens);
  cudaStream_t st = as_stream(stream);
  FLEXMOE_DISPATCH_ROUTER_SHAPE(num_experts, {
    router_bwd_kernel<G, VPL><<<static_cast<unsigned>(blocks), kRouterThreads, 0, st>>>(
        as_ptr<const float>(probs), as_ptr<const int32_t>(topk_ids),
        as_ptr<const float>(topk_w), as_ptr<const float>(d_topk_w), as_ptr<const float>(d_z),
        as_ptr<const uint8_t>(mask), mask_mode, num_tokens, num_experts, top_k, renorm ? 1 : 0,
        as_ptr<float>(dz_out));
  });
  FLEXMOE_LAUNCH_CHECK("router_bwd_kernel");
}

// ----------------------------------------------------------------- version queries

int built_cuda_version() { return CUDART_VERSION; }

int driver_cuda_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace flexmoe
