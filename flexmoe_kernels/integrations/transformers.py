"""Our MoE layer inside Hugging Face transformers models: :func:`apply_flexmoe`.

Legend: B sequences, S positions, T = B*S tokens, D hidden, F expert width, E experts, K top-k.

``apply_flexmoe(model)`` patches, in place, every sparse MoE block of a transformers model of
type ``flex_olmo``, ``olmoe``, ``qwen3_moe`` or ``mixtral`` so that its forward is one
:func:`flexmoe_kernels.flexmoe_forward` on the block's own parameters (shared, never
copied): the router weight ``gate.weight`` (E, D), ``experts.gate_up_proj`` (E, 2F, D) and
``experts.down_proj`` (E, D, F), transformers' layout and ours. Each family's routing is kept:

==============  ==================================================  ==========================
model type      transformers' router                                our ``norm_topk_prob``
==============  ==================================================  ==========================
``flex_olmo``   softmax over E, top-k, renormalise iff config says  ``gate.norm_topk_prob``
``olmoe``       softmax over E, top-k, renormalise iff config says  ``gate.norm_topk_prob``
``qwen3_moe``   softmax over E, top-k, renormalise iff config says  ``gate.norm_topk_prob``
``mixtral``     top-k of the logits, softmax over those k           True
==============  ==================================================  ==========================

Mixtral's "top-k then softmax over the k" is our "softmax over E, top-k, renormalise":
``exp(l_i) / sum_{j in top-k} exp(l_j) = p_i / sum_{j in top-k} p_j`` with ``p = softmax(l)``,
and softmax is monotone, so the top-k of ``l`` and of ``p`` are the same experts (the tests
check it numerically against transformers' Mixtral).

The patched block returns what transformers' block returns (the (B, S, D) output) and calls
its router module with the result, ``gate(x, (logits_TE, None, None))``, so transformers'
``output_router_logits=True`` records the (T, E) router logits (in x's dtype; ``-inf`` for
opted-out experts) from the router's forward hook, as before, and the auxiliary
load-balancing loss is computed from them. The router called alone still routes as before.

Opt-out: the patched ``model(..., allowed_experts=...)`` and ``model.generate(...,
allowed_experts=...)`` take every form :func:`flexmoe_kernels.resolve_allowed_experts` takes
(names, indices, (E,), (B, E) per sequence, (T, E) per token; ``generate``: not per token),
with names from ``expert_names``, else the config's ``expert_names``, else ``expert_0 ..``.
:func:`allowed_experts` sets it for code that cannot pass arguments. An opted-out expert is
removed exactly (logit ``-inf`` before the softmax) and its weights are never read.

Under gradient checkpointing (training mode), the mask of the last forward stays active after
it returns, so the recomputation in backward routes as the forward did: run each backward
before the next forward. ``remove_flexmoe(model)`` undoes the patch.

Importing this module registers the ``"flexmoe"`` experts implementation in transformers'
experts registry (:mod:`.experts`), for MoE models whose router we do not patch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Iterator, Optional, Sequence

import torch

from ..modules.allow import AllowedExperts
from ..ops.layer import flexmoe_forward
from .experts import expert_weights, register_experts_implementation
from .opt_out import OptOutState

__all__ = ["SUPPORTED_MODEL_TYPES", "apply_flexmoe", "remove_flexmoe", "allowed_experts", "is_patched"]

# model type -> (modeling module, sparse MoE block class, renormalise: "config" or always True)
_FAMILIES = {
    "flex_olmo": ("transformers.models.flex_olmo.modeling_flex_olmo", "FlexOlmoSparseMoeBlock", "config"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", "config"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", "config"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", True),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


# ----------------------------------------------------------------------------- the patched block
def _block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Patched ``*SparseMoeBlock.forward``: (B, S, D) -> (B, S, D) through ``flexmoe_forward``.

    Mixtral's router jitter (training, ``jitter_noise > 0``) multiplies the input by the same
    uniform noise as transformers (same RNG draw), out of place.
    """
    B, S, D = hidden_states.shape
    jitter = getattr(self, "jitter_noise", 0.0)
    if self.training and jitter and jitter > 0:
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
    x_TD = hidden_states.reshape(-1, D)
    gate = self.gate
    norm = self._flexmoe_norm_topk
    gate_up, down = expert_weights(self.experts)
    allow = self._flexmoe_state.mask_for(B, S, x_TD.device)
    out_TD, logits_TE = flexmoe_forward(
        x_TD, gate.weight, gate_up, down, gate.top_k, allow_mask=allow,
        norm_topk_prob=bool(gate.norm_topk_prob) if norm == "config" else norm,
        validate=allow is None or torch.compiler.is_compiling(), backend=self._flexmoe_backend,
    )
    gate(x_TD, (logits_TE.to(x_TD.dtype), None, None))  # transformers records router logits here
    return out_TD.reshape(B, S, D)


def _gate_forward(self, hidden_states: torch.Tensor, routed: Optional[tuple] = None):
    """Patched router forward: returns ``routed`` (the block's result) when given, so the
    router's forward hooks see it; routes as transformers does when called alone."""
    if routed is None:
        return type(self).forward(self, hidden_states)
    return routed


# ----------------------------------------------------------------------------- top-level wrappers
def _model_forward(self, *args, allowed_experts: AllowedExperts = None, **kwargs):
    """Patched top-level forward: transformers' forward, plus ``allowed_experts`` (see the
    module docstring) for this call; None / omitted = the default in force (the
    :func:`allowed_experts` context's set, every expert outside any context): a wrapper
    that forwards its own None default never widens the context's opt-out."""
    state: OptOutState = self._flexmoe_state
    if allowed_experts is None:
        state.activate_default()
    else:
        state.activate(allowed_experts)
    try:
        return self._flexmoe_inner["forward"](*args, **kwargs)
    finally:
        if not (self.training and torch.is_grad_enabled() and _checkpointing(self)):
            state.activate_default()


def _model_generate(self, *args, allowed_experts: AllowedExperts = None, **kwargs):
    """Patched ``generate``: transformers' generate, plus ``allowed_experts`` (names,
    indices, (E,) or (B, E) per sequence) applied to the prompt and every new token of
    each sequence (KV-cache decode steps and expanded batches included). None / omitted =
    the default in force (the :func:`allowed_experts` context's set)."""
    state: OptOutState = self._flexmoe_state
    spec = state.default if allowed_experts is None else allowed_experts
    inputs = args[0] if args else next(
        (kwargs[k] for k in ("input_ids", "inputs", "inputs_embeds") if kwargs.get(k) is not None), None)
    batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) else None
    mask = state.per_sequence_mask(spec, batch)
    with state.scoped_default(mask, per_sequence=True):
        return self._flexmoe_inner["generate"](*args, **kwargs)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` recomputes its forward in backward (activation checkpointing)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _install(model: torch.nn.Module, name: str, wrapper) -> None:
    """Set ``model.<name>`` to ``wrapper`` bound to the model; the previous method (an
    instance attribute, e.g. from accelerate, or the class's) is kept for the wrapper and
    for :func:`remove_flexmoe`."""
    previous = model.__dict__.get(name)
    inner = previous if previous is not None else getattr(type(model), name).__get__(model)
    model._flexmoe_inner[name] = inner
    model._flexmoe_previous[name] = previous

    @functools.wraps(getattr(type(model), name))
    def method(self, *args, **kwargs):
        return wrapper(self, *args, **kwargs)

    model.__dict__[name] = types.MethodType(method, model)


# ----------------------------------------------------------------------------- public API
def apply_flexmoe(model: torch.nn.Module, backend: str = "auto",
                  expert_names: Optional[Sequence[str]] = None) -> torch.nn.Module:
    """Patch every sparse MoE block of a transformers model to run our layer; returns ``model``.

    Args:
        model: a transformers model whose ``config.model_type`` is one of
            :data:`SUPPORTED_MODEL_TYPES` (a ``*ForCausalLM`` or the base ``*Model``).
        backend: our layer's backend, "torch", "triton", "cuda" or "auto" (see
            :func:`flexmoe_kernels.available_backends`).
        expert_names: E names for ``allowed_experts``; default the config's ``expert_names``
            when it has them, else ``expert_0 .. expert_{E-1}``.

    Returns:
        The same model, patched in place (weights shared). Applying again only updates
        ``backend`` and ``expert_names``; :func:`remove_flexmoe` undoes it.

    Raises:
        ValueError: an unsupported model type (the message lists the supported ones), a model
            with no MoE block, ``expert_names`` of the wrong length or with repeats, or an
            unknown ``backend``.
    """
    from ..ops.backends import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS) + ['auto']}, got {backend!r}")
    blocks, norm = _moe_blocks(model)
    num_experts, top_k = blocks[0].gate.weight.shape[0], blocks[0].gate.top_k
    names = _expert_names(model.config, num_experts, expert_names)
    state = getattr(model, "_flexmoe_state", None)
    if state is None:
        state = OptOutState(names, top_k)
        model._flexmoe_state = state
        model._flexmoe_inner, model._flexmoe_previous = {}, {}
        _install(model, "forward", _model_forward)
        if hasattr(model, "generate"):
            _install(model, "generate", _model_generate)
    state.expert_names = names
    for block in blocks:
        expert_weights(block.experts)  # the layout check, before anything is patched
    for block in blocks:
        block._flexmoe_state, block._flexmoe_backend, block._flexmoe_norm_topk = state, backend, norm
        block.__dict__["forward"] = types.MethodType(_block_forward, block)
        block.gate.__dict__["forward"] = types.MethodType(_gate_forward, block.gate)
    return model


def remove_flexmoe(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_flexmoe`: the blocks, ``forward`` and ``generate`` are transformers'
    again (weights untouched). A model that is not patched is returned unchanged."""
    for module in model.modules():
        if "_flexmoe_state" in module.__dict__ and hasattr(module, "gate"):
            for m, attrs in ((module, ("forward", "_flexmoe_state", "_flexmoe_backend", "_flexmoe_norm_topk")),
                             (module.gate, ("forward",))):
                for a in attrs:
                    m.__dict__.pop(a, None)
    if "_flexmoe_state" in model.__dict__:
        for name, previous in model._flexmoe_previous.items():
            model.__dict__.pop(name, None)
            if previous is not None:
                model.__dict__[name] = previous
        for a in ("_flexmoe_state", "_flexmoe_inner", "_flexmoe_previous"):
            model.__dict__.pop(a, None)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """True when :func:`apply_flexmoe` patched ``model`` (and it was not removed)."""
    return "_flexmoe_state" in model.__dict__


@contextlib.contextmanager
def allowed_experts(model: torch.nn.Module, allowed: AllowedExperts) -> Iterator[torch.nn.Module]:
    """Within the ``with`` block, every forward and generate of the patched ``model`` that
    passes no ``allowed_experts`` (or None) uses ``allowed`` (any form ``forward`` takes;
    ``generate`` needs a per-sequence form). For pipelines and trainers, which cannot pass
    arguments. Restores the previous setting on exit; nests: ``allowed=None`` keeps the set
    in force (an enclosing block's), so code forwarding a None default never widens it; to
    allow every expert explicitly, name them all.

    Raises ``ValueError`` naming ``model`` if it is not patched by :func:`apply_flexmoe`.
    """
    if not is_patched(model):
        raise ValueError("model is not patched: call flexmoe_kernels.integrations.transformers.apply_flexmoe(model) first")
    state: OptOutState = model._flexmoe_state
    if allowed is None:  # the set in force stays (never widened by a None default)
        allowed, per_sequence = state.default, state.default_per_sequence
    else:
        per_sequence = False
    with state.scoped_default(allowed, per_sequence):
        yield model


# ----------------------------------------------------------------------------- helpers
def _moe_blocks(model: torch.nn.Module) -> tuple[list, object]:
    """``(the model's sparse MoE blocks, the family's renormalisation rule)``; ``ValueError``
    for an unsupported model (listing the supported types) or one without MoE blocks."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model has model_type={model_type!r} ({type(model).__name__}); apply_flexmoe supports "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )
    module_name, block_name, norm = _FAMILIES[model_type]
    block_cls = getattr(importlib.import_module(module_name), block_name)
    blocks = [m for m in model.modules() if isinstance(m, block_cls)]
    if not blocks:
        raise ValueError(f"model ({type(model).__name__}) has no {block_name}: nothing to patch")
    return blocks, norm


def _expert_names(config, num_experts: int, expert_names: Optional[Sequence[str]]) -> list[str]:
    """The E expert names: ``expert_names``, else ``config.expert_names``, else ``expert_i``."""
    names = expert_names if expert_names is not None else getattr(config, "expert_names", None)
    if names is None:
        return [f"expert_{i}" for i in range(num_experts)]
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"expert_names must be a sequence of str, got {names!r}")
    names = list(names)
    if len(names) != num_experts:
        raise ValueError(f"expert_names has {len(names)} names but the model has E={num_experts} experts")
    if len(set(names)) != len(names):
        raise ValueError(f"expert_names has repeated names: {names}")
    return names


register_experts_implementation()
