"""Hugging Face models that come out of ``from_pretrained`` already running our MoE layer.

Two ways, both on top of :func:`~flexmoe_kernels.integrations.transformers.apply_flexmoe`
(the same patch, the same opt-out semantics):

* a class-level patch before loading, one function per supported family::

      from flexmoe_kernels.integrations.hf_auto import apply_flexmoe_to_flex_olmo
      apply_flexmoe_to_flex_olmo()                       # FlexOlmoForCausalLM / FlexOlmoModel
      model = transformers.AutoModelForCausalLM.from_pretrained("allenai/FlexOlmo-7x7B-1T")
      model(input_ids, allowed_experts=["public", "math"])   # already patched

  ``apply_flexmoe_to_olmoe()``, ``apply_flexmoe_to_qwen3_moe()``, ``apply_flexmoe_to_mixtral()``
  do the same for their families, :func:`apply_flexmoe_to_all` for every supported one. After
  the call, every ``from_pretrained`` / ``from_config`` (``AutoModel*`` included, which call
  the class's) of that family's ``*ForCausalLM`` and ``*Model`` returns a patched model.
  :func:`revert_flexmoe_class_patch` undoes it for models loaded afterwards. A model built
  with ``Class(config)`` directly is not patched: call ``apply_flexmoe(model)``.

* a loader: ``AutoFlexMoEForCausalLM.from_pretrained(path, backend=None, expert_names=None,
  **kwargs)`` / ``.from_config(config, ...)``: ``transformers.AutoModelForCausalLM``'s, then
  ``apply_flexmoe``; ``ValueError`` listing the supported model types for any other.

The patched model's ``forward`` accepts ``allowed_experts`` and says so in its signature, so
``transformers.Trainer`` keeps an ``allowed_experts`` batch column ((B, E) bool: one permission
set per row) with its default ``remove_unused_columns=True`` (see training/README.md).
"""
from __future__ import annotations

import functools
import importlib
import threading
from typing import Optional, Sequence

import torch

from .transformers import SUPPORTED_MODEL_TYPES, apply_flexmoe

__all__ = ["AutoFlexMoEForCausalLM", "enable_fused_cross_entropy", "disable_fused_cross_entropy",
           "apply_flexmoe_to_flex_olmo", "apply_flexmoe_to_olmoe",
           "apply_flexmoe_to_qwen3_moe", "apply_flexmoe_to_mixtral", "apply_flexmoe_to_all",
           "revert_flexmoe_class_patch", "class_patched_families"]

# family -> (modeling module, class-name prefix)
_CLASSES = {
    "flex_olmo": ("transformers.models.flex_olmo.modeling_flex_olmo", "FlexOlmo"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "Olmoe"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3Moe"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "Mixtral"),
}
assert set(_CLASSES) == set(SUPPORTED_MODEL_TYPES)
_CONSTRUCTORS = ("from_pretrained", "from_config", "_from_config")
_patched: dict[str, list] = {}  # family -> [(class, name, previous entry in the class __dict__ or None)]
_depth = threading.local()  # from_pretrained may call _from_config inside: patch once, outermost


def _patching_constructor(original, backend, expert_names):
    """A classmethod body: ``original`` (a bound-less function taking ``cls``), then apply_flexmoe."""

    @functools.wraps(original)
    def build(cls, *args, **kwargs):
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            model = original(cls, *args, **kwargs)
        finally:
            _depth.n -= 1
        if _depth.n == 0:
            apply_flexmoe(model, backend=backend, expert_names=expert_names)
        return model

    return build


def _class_patch(family: str, backend: Optional[str], expert_names: Optional[Sequence[str]]) -> list:
    module_name, prefix = _CLASSES[family]
    module = importlib.import_module(module_name)
    revert_flexmoe_class_patch(family)
    done = []
    for cls_name in (f"{prefix}ForCausalLM", f"{prefix}Model"):
        cls = getattr(module, cls_name)
        for name in _CONSTRUCTORS:
            if not hasattr(cls, name):
                continue
            previous = cls.__dict__.get(name)
            original = getattr(cls, name).__func__  # the classmethod's function (inherited or own)
            setattr(cls, name, classmethod(_patching_constructor(original, backend, expert_names)))
            done.append((cls, name, previous))
    _patched[family] = done
    return [c.__name__ for c in {c for c, _, _ in done}]


def apply_flexmoe_to_flex_olmo(backend: Optional[str] = None, expert_names: Optional[Sequence[str]] = None) -> None:
    """From now on, ``from_pretrained`` / ``from_config`` of transformers' ``FlexOlmoForCausalLM`` and
    ``FlexOlmoModel`` (and ``AutoModel*`` resolving to them) return models patched by
    ``apply_flexmoe(model, backend, expert_names)``."""
    _class_patch("flex_olmo", backend, expert_names)


def apply_flexmoe_to_olmoe(backend: Optional[str] = None, expert_names: Optional[Sequence[str]] = None) -> None:
    """As :func:`apply_flexmoe_to_flex_olmo`, for ``OlmoeForCausalLM`` / ``OlmoeModel``."""
    _class_patch("olmoe", backend, expert_names)


def apply_flexmoe_to_qwen3_moe(backend: Optional[str] = None, expert_names: Optional[Sequence[str]] = None) -> None:
    """As :func:`apply_flexmoe_to_flex_olmo`, for ``Qwen3MoeForCausalLM`` / ``Qwen3MoeModel``."""
    _class_patch("qwen3_moe", backend, expert_names)


def apply_flexmoe_to_mixtral(backend: Optional[str] = None, expert_names: Optional[Sequence[str]] = None) -> None:
    """As :func:`apply_flexmoe_to_flex_olmo`, for ``MixtralForCausalLM`` / ``MixtralModel``."""
    _class_patch("mixtral", backend, expert_names)


def apply_flexmoe_to_all(backend: Optional[str] = None) -> None:
    """The class-level patch for every supported family (expert names from each config)."""
    for family in _CLASSES:
        _class_patch(family, backend, None)


def revert_flexmoe_class_patch(family: Optional[str] = None) -> None:
    """Undo the class-level patch of ``family`` (None: of every family). Models loaded before
    stay patched (``remove_flexmoe(model)`` undoes that)."""
    if family is not None and family not in _CLASSES:
        raise ValueError(f"family must be one of {sorted(_CLASSES)}, got {family!r}")
    for fam in ([family] if family else list(_patched)):
        for cls, name, previous in reversed(_patched.pop(fam, [])):
            if previous is None:
                delattr(cls, name)
            else:
                setattr(cls, name, previous)


def class_patched_families() -> list[str]:
    """The families whose classes are patched now."""
    return sorted(_patched)


# ----------------------------------------------------------------------------- fused linear cross-entropy
def _fused_forward(self, *args, labels=None, **kwargs):
    """Forward with the LM head and cross-entropy fused (:func:`enable_fused_cross_entropy`)."""
    previous = self.__dict__["_flexmoe_fce"]["previous"]
    if labels is None or not (self.training and torch.is_grad_enabled()):
        return previous(*args, labels=labels, **kwargs)
    import torch.nn.functional as F

    from ..ops.linear_cross_entropy import linear_cross_entropy

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    captured = {}

    def grab(module, inputs, output):
        captured["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = self.model.register_forward_hook(grab)
    try:
        out = previous(*args, labels=None, logits_to_keep=1, **kwargs)  # the head on the last position only
    finally:
        handle.remove()
    h_BSD = captured["h"]
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:].to(h_BSD.device)  # as transformers' ForCausalLMLoss
    w = self.get_output_embeddings().weight
    loss = linear_cross_entropy(h_BSD.reshape(-1, h_BSD.shape[-1]), w, shift.reshape(-1), denom=num_items,
                                chunk_size=self.__dict__["_flexmoe_fce"]["chunk_size"])
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + self.router_aux_loss_coef * out.aux_loss.to(loss.device)
    out.loss = loss
    return out


def enable_fused_cross_entropy(model, chunk_size: int = 1024):
    """In training with ``labels`` (and gradients on), compute the loss with
    :func:`flexmoe_kernels.ops.linear_cross_entropy.linear_cross_entropy` from the base model's
    final hidden states and the LM head's weight, ``chunk_size`` tokens at a time: the (B, S, V)
    logits are never made. The loss (and the auxiliary loss added as transformers adds it) and the
    gradients equal transformers' (``tests/test_hf_auto.py``); the output's ``logits`` are the last
    position's only. Evaluation, generation and calls without labels run unchanged. Returns ``model``."""
    import types

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not hasattr(model, "model") or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no base model and LM head (a *ForCausalLM is needed)")
    state = model.__dict__.get("_flexmoe_fce")
    if state is not None:
        state["chunk_size"] = chunk_size
        return model
    previous = model.forward  # the patched forward when apply_flexmoe ran (its allowed_experts kept)

    @functools.wraps(previous)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    model.__dict__["_flexmoe_fce"] = {"previous": previous, "chunk_size": chunk_size,
                                      "had": model.__dict__.get("forward")}
    model.__dict__["forward"] = types.MethodType(forward, model)
    return model


def disable_fused_cross_entropy(model):
    """Undo :func:`enable_fused_cross_entropy`; returns ``model``."""
    state = model.__dict__.pop("_flexmoe_fce", None)
    if state is not None:
        if state["had"] is None:
            model.__dict__.pop("forward", None)
        else:
            model.__dict__["forward"] = state["had"]
    return model


class AutoFlexMoEForCausalLM:
    """``transformers.AutoModelForCausalLM`` whose models run our MoE layer (``apply_flexmoe``)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("AutoFlexMoEForCausalLM is built with .from_pretrained(...) or .from_config(...)")

    @staticmethod
    def _check(config) -> None:
        mt = getattr(config, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"AutoFlexMoEForCausalLM: model type {mt!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, backend: Optional[str] = None,
                        expert_names: Optional[Sequence[str]] = None, fused_cross_entropy: bool = False, **kwargs):
        """``AutoModelForCausalLM.from_pretrained(...)`` then ``apply_flexmoe(model, backend, expert_names)``
        (and :func:`enable_fused_cross_entropy` with ``fused_cross_entropy=True``); the model type
        is checked from the config before any weight is read."""
        import transformers

        config = kwargs.get("config")
        if config is None:
            cfg_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code", "cache_dir", "token",
                                                 "local_files_only") if k in kwargs}
            config = transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path, **cfg_kwargs)
            kwargs["config"] = config
        cls._check(config)
        model = transformers.AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = apply_flexmoe(model, backend=backend, expert_names=expert_names)
        return enable_fused_cross_entropy(model) if fused_cross_entropy else model

    @classmethod
    def from_config(cls, config, *, backend: Optional[str] = None, expert_names: Optional[Sequence[str]] = None,
                    **kwargs):
        """``AutoModelForCausalLM.from_config(config, ...)`` then ``apply_flexmoe``."""
        import transformers

        cls._check(config)
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        return apply_flexmoe(model, backend=backend, expert_names=expert_names)
