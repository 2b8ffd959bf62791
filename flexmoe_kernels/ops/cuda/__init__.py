"""The "cuda" backend: CUDA C++ kernels (csrc/, the extension ``flexmoe_kernels._C``) for
routing, permutation and combine, around torch's grouped GEMM; one module per stage.

=============  ===================================================================
stage          module
=============  ===================================================================
routing        :mod:`.routing` (csrc/routing.cu): fused masked softmax-top-k,
               histogram, prefix sum and stable permutation -> ``RoutingPlan``, and
               its backward; custom ops ``flexmoe_cuda::route`` / ``route_bwd``
permutation    :mod:`.permute` (csrc/permute.cu): gather of x rows into
               expert-grouped order; custom op ``flexmoe_cuda::gather``
experts        :mod:`.experts`: no kernel of ours: torch ``grouped_mm`` (CUTLASS)
               when usable, else the reference's per-expert loop
combine        :mod:`.combine` (csrc/combine.cu): fixed-order weighted top-k sum and
               its backward; custom ops ``flexmoe_cuda::combine`` / ``combine_bwd``
backend entry  :mod:`.backend`: ``is_available(device)``, ``forward(args)``
shared         :mod:`._ext`: loading ``_C``, ``cuda_is_available`` /
               ``cuda_unavailable_reason``, validation and launch helpers
=============  ===================================================================

Importing this package (or any module in it) does not import ``_C``; the extension loads on
the first launch or availability check.
"""
