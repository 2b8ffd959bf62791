"""The "triton" backend: fused Triton kernels, one module per stage.

=============  ===================================================================
stage          module
=============  ===================================================================
routing        :mod:`.routing` (+ :mod:`.routing_kernels`): masked softmax-top-k, the
               expert grouping and the padded tile schedule, in 1-3 launches
permutation    fused into the up-projection GEMM (x rows gathered in the A load)
experts        :mod:`.grouped_gemm` (+ :mod:`.grouped_gemm_kernels`): grouped SwiGLU
               GEMMs forward and backward; launch configs in :mod:`.configs` (tables in
               ``tables/``)
combine        fused into the down-projection GEMM (router weight in the epilogue, then a
               fixed-order top-k sum or fp32 atomics)
backend entry  :mod:`.backend`: ``torch.library`` custom ops + autograd, ``forward(args)``
shared         :mod:`.launch`: availability, buffer allocation, small launch helpers
=============  ===================================================================

Importing this package does not import Triton; the kernel modules load on first launch.
"""
