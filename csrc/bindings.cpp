// pybind11 module flexmoe_kernels._C: raw-pointer entry points of the CUDA kernels.
//
// Built by setup.py (CUDA EXTENSION section) from this file (g++) and the .cu files (nvcc:
// routing.cu, permute.cu, combine.cu, one per pipeline stage),
// linked against the static CUDA runtime. No PyTorch headers: pointers, sizes, dtype codes
// and the stream are plain integers, so the module is independent of PyTorch's C++ ABI.
// Importing it makes no CUDA call (safe on a machine without a GPU).
#include <pybind11/pybind11.h>

#include "flexmoe.h"

#ifndef FLEXMOE_CUDA_ARCHS
#define FLEXMOE_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using flexmoe::DType;

// Launch entry points release the GIL (launches are asynchronous; errors still propagate).
using nogil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "flexmoe_kernels._C: CUDA kernels for masked routing, permutation and combine. "
      "Arguments are raw device pointers (int), sizes, dtype codes (0 float32, 1 float16, "
      "2 bfloat16) and a cudaStream_t as int. Use flexmoe_kernels.ops.cuda, which validates "
      "tensors and allocates outputs.";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(flexmoe::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(flexmoe::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(flexmoe::kBFloat16);
  m.attr("MAX_EXPERTS") = flexmoe::kMaxExperts;
  m.attr("CUDA_ARCHS") = FLEXMOE_CUDA_ARCHS;

  m.def("built_cuda_version", &flexmoe::built_cuda_version,
        "CUDART_VERSION of the toolkit the module was compiled with (no CUDA call).");
  m.def("driver_cuda_version", &flexmoe::driver_cuda_version,
        "CUDA version supported by the installed driver (0: no driver); creates no context.");
  m.def("router_workspace_bytes", &flexmoe::router_workspace_bytes, py::arg("num_tokens"),
        py::arg("num_experts"), "Scratch bytes router_forward needs for T tokens and E experts.");
  m.def("router_forward", &flexmoe::router_forward, nogil(), py::arg("logits"), py::arg("dtype"),
        py::arg("num_tokens"), py::arg("num_experts"), py::arg("top_k"), py::arg("bias"),
        py::arg("mask"), py::arg("mask_mode"), py::arg("renorm"), py::arg("topk_ids"),
        py::arg("topk_w"), py::arg("probs"), py::arg("z"), py::arg("counts"), py::arg("offsets"),
        py::arg("sorted_pairs"), py::arg("inv_pairs"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "Fused masked softmax-top-k + histogram + prefix sum + stable permutation.");
  m.def("router_backward", &flexmoe::router_backward, nogil(), py::arg("probs"),
        py::arg("topk_ids"), py::arg("topk_w"), py::arg("d_topk_w"), py::arg("d_z"),
        py::arg("mask"), py::arg("mask_mode"), py::arg("num_tokens"), py::arg("num_experts"),
        py::arg("top_k"), py::arg("renorm"), py::arg("dz_out"), py::arg("stream"),
        "d loss / d masked logits from the weight gradient (softmax + top-k + renorm backward).");
  m.def("gather_rows", &flexmoe::gather_rows, nogil(), py::arg("src"), py::arg("elem_bytes"),
        py::arg("num_tokens"), py::arg("hidden"), py::arg("sorted_pairs"), py::arg("num_pairs"),
        py::arg("top_k"), py::arg("dst"), py::arg("stream"),
        "dst[i] = src[sorted_pairs[i] // top_k] row-wise.");
  m.def("combine_forward", &flexmoe::combine_forward, nogil(), py::arg("y"), py::arg("dtype"),
        py::arg("num_tokens"), py::arg("hidden"), py::arg("top_k"), py::arg("w"),
        py::arg("inv_pairs"), py::arg("out"), py::arg("stream"),
        "out[t] = sum_k w[t,k] * y[inv_pairs[t*K+k]] (fp32 accumulation, fixed order).");
  m.def("combine_backward", &flexmoe::combine_backward, nogil(), py::arg("dout"), py::arg("dtype"),
        py::arg("num_tokens"), py::arg("hidden"), py::arg("top_k"), py::arg("y"), py::arg("w"),
        py::arg("inv_pairs"), py::arg("dy"), py::arg("dw"), py::arg("stream"),
        "dy[inv[t*K+k]] = w[t,k] * dout[t]; dw[t,k] = <dout[t], y[inv[t*K+k]]>.");
}
