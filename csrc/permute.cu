// Gather of token rows into expert-grouped pair order (the permutation stage).
//
// Legend: T tokens, K top-k, P = T*K pairs, D hidden.
// One warp per output row, copied in the widest word (16/8/4/2 bytes) that the row size and
// both pointers allow; rows are addressed with int64 offsets (T*K*D may exceed 2^31).
// The gather's backward is the combine with unit weights (combine.cu).

#include "common.cuh"

namespace flexmoe {
namespace {

// dst (P, W-byte words per row)[i] = src (T, ...)[sorted_pairs[i] / K]
template <typename W>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) gather_rows_kernel(
    const W* __restrict__ src_TD,             // (T, row_words) W
    const int32_t* __restrict__ sorted_pairs, // (P,) int32
    std::int64_t num_pairs, int K, std::int64_t row_words,
    W* __restrict__ dst_PD) {                 // (P, row_words) W out
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (i >= num_pairs) return;
  const std::int64_t t = sorted_pairs[i] / K;
  const W* s = src_TD + t * row_words;
  W* d = dst_PD + i * row_words;
  for (std::int64_t c = threadIdx.x; c < row_words; c += 32) d[c] = s[c];
}

}  // namespace

void gather_rows(std::uintptr_t src, int elem_bytes, std::int64_t num_tokens, std::int64_t hidden,
                 std::uintptr_t sorted_pairs, std::int64_t num_pairs, int top_k,
                 std::uintptr_t dst, std::uintptr_t stream) {
  check_rows(num_tokens, hidden, top_k);
  FLEXMOE_CHECK(elem_bytes == 2 || elem_bytes == 4, "elem_bytes must be 2 or 4, got " << elem_bytes);
  FLEXMOE_CHECK(num_pairs == num_tokens * top_k,
                "num_pairs must equal num_tokens * top_k = " << num_tokens * top_k << ", got " << num_pairs);
  FLEXMOE_CHECK_PTR(src);
  FLEXMOE_CHECK_PTR(sorted_pairs);
  FLEXMOE_CHECK_PTR(dst);
  const std::int64_t row_bytes = hidden * elem_bytes;
  int word = elem_bytes;
  for (int b = 16; b > elem_bytes; b /= 2) {
    if (row_bytes % b == 0 && src % b == 0 && dst % b == 0) {
      word = b;
      break;
    }
  }
  const std::int64_t words = row_bytes / word;
  const dim3 block(32, kWarpsPerBlock);
  const std::int64_t grid = (num_pairs + kWarpsPerBlock - 1) / kWarpsPerBlock;
  cudaStream_t st = as_stream(stream);
  const int32_t* sp = as_ptr<const int32_t>(sorted_pairs);
  switch (word) {
    case 16:
      gather_rows_kernel<uint4><<<static_cast<unsigned>(grid), block, 0, st>>>(
          as_ptr<const uint4>(src), sp, num_pairs, top_k, words, as_ptr<uint4>(dst));
      break;
    case 8:
      gather_rows_kernel<uint2><<<static_cast<unsigned>(grid), block, 0, st>>>(
          as_ptr<const uint2>(src), sp, num_pairs, top_k, words, as_ptr<uint2>(dst));
      break;
    case 4:
      gather_rows_kernel<uint32_t><<<static_cast<unsigned>(grid), block, 0, st>>>(
          as_ptr<const uint32_t>(src), sp, num_pairs, top_k, words, as_ptr<uint32_t>(dst));
      break;
    default:
      gather_rows_kernel<uint16_t><<<static_cast<unsigned>(grid), block, 0, st>>>(
          as_ptr<const uint16_t>(src), sp, num_pairs, top_k, words, as_ptr<uint16_t>(dst));
  }
  FLEXMOE_LAUNCH_CHECK("gather_rows_kernel");
}

}  // namespace flexmoe
