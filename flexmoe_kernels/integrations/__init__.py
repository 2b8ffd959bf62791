"""Our layer inside other libraries' models.

* :mod:`.transformers`: :func:`~.transformers.apply_flexmoe` patches a Hugging Face
  transformers MoE model (FlexOlmo, OLMoE, Qwen3-MoE, Mixtral) to run
  :func:`flexmoe_kernels.flexmoe_forward`, with ``allowed_experts`` in ``forward`` /
  ``generate`` and the :func:`~.transformers.allowed_experts` context manager; importing it
  registers the ``"flexmoe"`` experts implementation in transformers' registry.
* :mod:`.experts`: :func:`~.experts.plan_from_topk` (a routing plan from experts chosen
  elsewhere) and :func:`~.experts.flexmoe_experts_forward` (that registry entry; it runs the
  expert stage of the backend ``FlexMoE(backend="auto")`` resolves: torch on CPU, on CUDA the
  fastest of triton / cuda / torch).

``import flexmoe_kernels.integrations`` imports nothing else: import the submodule you use
(``from flexmoe_kernels.integrations.transformers import apply_flexmoe``).
"""
