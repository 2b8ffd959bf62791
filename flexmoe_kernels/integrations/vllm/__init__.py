"""vLLM plugin: FlexOlmo served with exact per-request expert opt-out.

Installed with the package; vLLM finds it through two entry points (setup.py):

* ``vllm.general_plugins``: ``flexmoe = flexmoe_kernels.integrations.vllm:register``, which
  registers our model class for the ``FlexOlmoForCausalLM`` architecture (:mod:`.model`) and
  wraps the front end's request processing (:mod:`.frontend`: validation, cache salt);
* ``vllm.logits_processors``: :class:`.runtime.AllowedExpertsLogitsProcessor`, which tracks the
  batch layout in the worker and fills the allow-mask the model's MoE op reads.

A request chooses its experts with ``SamplingParams(extra_args={"allowed_experts": [...]})``
(names from the checkpoint's ``expert_names`` and/or indices) or, on the OpenAI server,
``extra_body={"vllm_xargs": {"allowed_experts": "public,code"}}`` (a list, or a comma-separated
string). No field: every expert. See docs/SERVING.md.

Importing this package does not import vLLM; :func:`register` does.
"""
from __future__ import annotations

__all__ = ["register", "MODEL_CLASS"]

MODEL_CLASS = "flexmoe_kernels.integrations.vllm.model:FlexOlmoForCausalLM"


def register() -> None:
    """vLLM general plugin: our FlexOlmo model class and the front-end hook (idempotent; vLLM
    calls it in every process it starts)."""
    from vllm import ModelRegistry

    from . import frontend

    ModelRegistry.register_model("FlexOlmoForCausalLM", MODEL_CLASS)
    frontend.install()
