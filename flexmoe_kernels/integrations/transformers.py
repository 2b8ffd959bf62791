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

Under activation checkpointing (training mode) each checkpointed layer's recomputation in
backward routes by the mask of its own forward, whatever ``allowed_experts`` context is
active at backward time (the ``with`` block may have exited; other forwards may have run):
the patched forward wraps transformers' ``_gradient_checkpointing_func`` of every layer so
that the mask is stored with the checkpointed call (reentrant or not). A recomputation under
a checkpoint wrapper of its own (not transformers') uses the mask of the last training
forward. ``remove_flexmoe(model)`` undoes the patch.

Importing this module registers the ``"flexmoe"`` experts implementation in transformers'
experts registry (:mod:`.experts`), for MoE models whose router we do not patch; it runs on
the backend ``FlexMoE(backend="auto")`` resolves (torch on CPU; on CUDA the fastest available).
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
    state: OptOutState = self._flexmoe_state
    if self.training and _unwrapped_recompute(state):
        with state.replaying_snapshot(state.last_train):  # not transformers' checkpointing
            allow = state.mask_for(B, S, x_TD.device)
    else:
        allow = state.mask_for(B, S, x_TD.device)
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
    recompute = self.training and _unwrapped_recompute(state)  # under a checkpoint of its own
    if allowed_experts is not None:
        state.activate(allowed_experts)
    elif recompute:
        state.activate(*state.last_train[:2])
    else:
        state.activate_default()
    if self.training and torch.is_grad_enabled() and not recompute:
        state.last_train = state.snapshot()
        _wrap_checkpointing(self)
    try:
        return self._flexmoe_inner["forward"](*args, **kwargs)
    finally:
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


# ----------------------------------------------------------------------------- activation checkpointing
# transformers checkpoints a layer as ``layer._gradient_checkpointing_func(partial(forward, ...),
# *args)`` (torch.utils.checkpoint, reentrant or not): the function runs in forward and again in
# backward. The patched forward wraps each such function (``_replaying_checkpoint``, bound to
# the layer so that a deepcopy wraps the copy) so that it hands the checkpoint a function that
# restores the opt-out state's snapshot taken at forward time: the recomputation routes by the
# forward's mask, stored with the checkpointed call, whatever context is active at backward.
def _replaying_checkpoint(self, function, *args, **kwargs):
    states = {id(m._flexmoe_state): m._flexmoe_state for m in self.modules()
              if isinstance(m.__dict__.get("_flexmoe_state"), OptOutState) and hasattr(m, "gate")}
    snapshots = [(st, st.snapshot()) for st in states.values()]

    def run(*a, **k):
        with contextlib.ExitStack() as stack:
            for st, snap in snapshots:
                stack.enter_context(st.replaying_snapshot(snap))
            return function(*a, **k)

    return self.__dict__["_flexmoe_checkpoint_inner"](run, *args, **kwargs)


def _is_replaying_checkpoint(f) -> bool:
    return isinstance(f, types.MethodType) and f.__func__ is _replaying_checkpoint


def _wrap_checkpointing(model: torch.nn.Module) -> None:
    """Wrap every ``_gradient_checkpointing_func`` set on a module of ``model`` (by
    ``gradient_checkpointing_enable``, before or after apply_flexmoe) not wrapped yet."""
    for m in model.modules():
        f = m.__dict__.get("_gradient_checkpointing_func")
        if f is not None and not _is_replaying_checkpoint(f):
            m.__dict__["_flexmoe_checkpoint_inner"] = f
            m.__dict__["_gradient_checkpointing_func"] = types.MethodType(_replaying_checkpoint, m)


def _unwrap_checkpointing(model: torch.nn.Module) -> None:
    for m in model.modules():
        inner = m.__dict__.pop("_flexmoe_checkpoint_inner", None)
        if inner is not None and _is_replaying_checkpoint(m.__dict__.get("_gradient_checkpointing_func")):
            m.__dict__["_gradient_checkpointing_func"] = inner


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _unwrapped_recompute(state: OptOutState) -> bool:
    """A block runs inside a backward pass (a checkpoint's recomputation) but not under
    :func:`_replaying_checkpoint`: some other checkpoint wrapper recomputes it."""
    return (torch.is_grad_enabled() and not state.replaying and not torch.compiler.is_compiling()
            and _graph_task_id() >= 0)


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

    method.__signature__ = _with_allowed_experts(getattr(type(model), name))
    model.__dict__[name] = types.MethodType(method, model)


def _with_allowed_experts(function):
    """``function``'s signature plus a keyword ``allowed_experts=None``: what the patched method
    takes, so that code reading the signature (``transformers.Trainer``'s
    ``remove_unused_columns``) keeps an ``allowed_experts`` batch column instead of dropping it."""
    import inspect

    try:
        sig = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    params = [p for p in sig.parameters.values() if p.name != "allowed_experts"]
    new = inspect.Parameter("allowed_experts", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:at] + [new] + params[at:])


# ----------------------------------------------------------------------------- guards (issue 21)
# An opt-out the model cannot honour is an error, never a silent run with every expert:
# transformers' forward / generate swallow an unknown ``allowed_experts`` keyword.
#
# * after remove_flexmoe(model), model.forward / generate stay thin guards (``_guard_*``) that
#   raise when ``allowed_experts`` is given (not None), and otherwise call transformers'
#   method (the one before apply_flexmoe). apply_flexmoe removes them again.
# * while a model is patched, every transformers model module between it and its MoE blocks
#   (e.g. ``model.model``) gets the guard ``_guard_inner_forward``: calling it directly with
#   ``allowed_experts`` would run the blocks with the state's set, not the one asked for.
# The guards read everything from ``self`` (no closure over the model), so a deepcopy calls
# the copy's own methods.
def _guard_call(self, name: str, args, kwargs, allowed: AllowedExperts, why: str):
    if allowed is not None:
        raise RuntimeError(
            f"{name}(allowed_experts={allowed!r}) cannot be honoured: {why}; without it transformers "
            f"would silently run every expert. Call flexmoe_kernels.integrations.transformers."
            f"apply_flexmoe(model) again to opt experts out, or pass allowed_experts=None"
        )
    previous = self.__dict__["_flexmoe_removed"].get(name)
    inner = previous if previous is not None else getattr(type(self), name).__get__(self)
    return inner(*args, **kwargs)


def _guard_forward(self, *args, allowed_experts: AllowedExperts = None, **kwargs):
    """``forward`` after :func:`remove_flexmoe`: transformers' forward; ``RuntimeError`` if
    ``allowed_experts`` is given (not None)."""
    why = f"remove_flexmoe removed flexmoe from this {type(self).__name__}, so nothing routes by it"
    return _guard_call(self, "forward", args, kwargs, allowed_experts, why)


def _guard_generate(self, *args, allowed_experts: AllowedExperts = None, **kwargs):
    """``generate`` after :func:`remove_flexmoe` (see :func:`_guard_forward`)."""
    why = f"remove_flexmoe removed flexmoe from this {type(self).__name__}, so nothing routes by it"
    return _guard_call(self, "generate", args, kwargs, allowed_experts, why)


_GUARDS = {"forward": _guard_forward, "generate": _guard_generate}


def _bind(module: torch.nn.Module, name: str, function) -> None:
    """``module.<name>`` = ``function`` bound to ``module``, with the signature and docstring of
    the class's method (transformers inspects ``forward``'s signature)."""
    @functools.wraps(getattr(type(module), name))
    def method(self, *args, **kwargs):
        return function(self, *args, **kwargs)

    module.__dict__[name] = types.MethodType(method, module)


def _install_guards(model: torch.nn.Module, previous: dict) -> None:
    """After :func:`remove_flexmoe`: ``forward`` / ``generate`` become the guards; ``previous``
    (name -> the instance method before apply_flexmoe, or None for the class's) is kept."""
    model.__dict__["_flexmoe_removed"] = dict(previous)
    for name in previous:
        _bind(model, name, _GUARDS[name])


def _drop_guards(model: torch.nn.Module) -> None:
    """Undo :func:`_install_guards` (before patching again)."""
    previous = model.__dict__.pop("_flexmoe_removed", None)
    for name, method in (previous or {}).items():
        model.__dict__.pop(name, None)
        if method is not None:
            model.__dict__[name] = method


def _guard_inner_forward(self, *args, allowed_experts: AllowedExperts = None, **kwargs):
    """``forward`` of a module between a patched model and its MoE blocks: ``ValueError`` if
    called with ``allowed_experts`` (it would be swallowed), else the module's own forward."""
    if allowed_experts is not None:
        owner = self.__dict__["_flexmoe_owner"]
        raise ValueError(
            f"allowed_experts={allowed_experts!r} passed to {type(self).__name__}, whose MoE blocks are patched "
            f"through its parent {owner}: it would be ignored here. Call the parent {owner} with "
            f"allowed_experts=..., or wrap this call in allowed_experts(parent, ...)"
        )
    previous = self.__dict__["_flexmoe_inner_previous"]
    inner = previous if previous is not None else type(self).forward.__get__(self)
    return inner(*args, **kwargs)


def _inner_models(model: torch.nn.Module, blocks: list) -> list:
    """The transformers models strictly inside ``model`` that hold some of ``blocks`` (e.g. the
    base ``*Model`` of a ``*ForCausalLM``)."""
    from transformers import PreTrainedModel

    ids = {id(b) for b in blocks}
    return [m for m in model.modules() if m is not model and isinstance(m, PreTrainedModel)
            and any(id(b) in ids for b in m.modules())]


def _patched_descendant(model: torch.nn.Module) -> Optional[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of a module strictly inside ``model`` patched by apply_flexmoe."""
    return next(((n, m) for n, m in model.named_modules() if m is not model and "_flexmoe_inner" in m.__dict__),
                None)


def _refuse_nested(model: torch.nn.Module, blocks: list, action: str) -> None:
    """``ValueError`` when ``model``'s MoE blocks are patched through another module (a parent
    patched first, or a submodule): a second level would leave one level's opt-out unrestricted."""
    own = model.__dict__.get("_flexmoe_state")
    desc = _patched_descendant(model)
    if desc is not None:
        name, sub = desc
        what = ("patching both levels would leave one of them without the opt-out. Call "
                f"remove_flexmoe(model.{name}) first, or keep using the {type(sub).__name__}"
                if action == "apply_flexmoe" else f"call remove_flexmoe(model.{name}) instead")
        raise ValueError(
            f"{action}: {name!r} ({type(sub).__name__}) is already patched by apply_flexmoe inside this "
            f"{type(model).__name__}: {what}"
        )
    other = next((b.__dict__["_flexmoe_state"] for b in blocks
                  if b.__dict__.get("_flexmoe_state") is not None and b.__dict__["_flexmoe_state"] is not own), None)
    if other is not None:
        owner = getattr(other, "owner", "another module")
        raise ValueError(
            f"{action}: this {type(model).__name__} is already patched through its parent {owner} (its MoE "
            f"blocks route by the parent's opt-out). Call {action} on that {owner} instead, or "
            f"remove_flexmoe(parent) first to patch this {type(model).__name__} on its own"
        )


# ----------------------------------------------------------------------------- public API
def apply_flexmoe(model: torch.nn.Module, backend: Optional[str] = None,
                  expert_names: Optional[Sequence[str]] = None) -> torch.nn.Module:
    """Patch every sparse MoE block of a transformers model to run our layer; returns ``model``.

    Args:
        model: a transformers model whose ``config.model_type`` is one of
            :data:`SUPPORTED_MODEL_TYPES` (a ``*ForCausalLM`` or the base ``*Model``).
        backend: our layer's backend, "torch", "triton", "cuda" or "auto" (see
            :func:`flexmoe_kernels.available_backends`); None: the one set by an earlier
            call, else "auto".
        expert_names: E names for ``allowed_experts``; None: the names set by an earlier call,
            else the config's ``expert_names`` when it has them, else ``expert_0 .. expert_{E-1}``.

    Returns:
        The same model, patched in place (weights shared). Applying again only updates
        ``backend`` and ``expert_names`` where given; :func:`remove_flexmoe` undoes it.

    Raises:
        ValueError: an unsupported model type (the message lists the supported ones), a model
            with no MoE block, ``expert_names`` of the wrong length or with repeats, an
            unknown ``backend``, or a model whose blocks are already patched through another
            module (a patched parent or submodule: patch one level only; the message says
            which and what to call).
    """
    from ..ops.backends import BACKENDS

    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS) + ['auto']}, got {backend!r}")
    blocks, norm = _moe_blocks(model)
    _refuse_nested(model, blocks, "apply_flexmoe")
    num_experts, top_k = blocks[0].gate.weight.shape[0], blocks[0].gate.top_k
    state = model.__dict__.get("_flexmoe_state")
    if state is not None and expert_names is None:
        names = state.expert_names  # a repeat call keeps the names it had
    else:
        names = _expert_names(model.config, num_experts, expert_names)
    if backend is None:
        backend = getattr(blocks[0], "_flexmoe_backend", None) if state is not None else None
        backend = backend or "auto"
    for block in blocks:
        expert_weights(block.experts)  # the layout check, before anything is patched
    if state is None:
        _drop_guards(model)
        state = OptOutState(names, top_k)
        state.owner = type(model).__name__
        model._flexmoe_state = state
        model._flexmoe_inner, model._flexmoe_previous = {}, {}
        _install(model, "forward", _model_forward)
        if hasattr(model, "generate"):
            _install(model, "generate", _model_generate)
        for inner in _inner_models(model, blocks):
            inner.__dict__["_flexmoe_owner"] = state.owner
            inner.__dict__["_flexmoe_inner_previous"] = inner.__dict__.get("forward")
            _bind(inner, "forward", _guard_inner_forward)
    state.expert_names = names
    for block in blocks:
        block._flexmoe_state, block._flexmoe_backend, block._flexmoe_norm_topk = state, backend, norm
        block.__dict__["forward"] = types.MethodType(_block_forward, block)
        block.gate.__dict__["forward"] = types.MethodType(_gate_forward, block.gate)
    return model


def remove_flexmoe(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_flexmoe`: the blocks are transformers' again (weights untouched) and
    ``forward`` / ``generate`` run transformers' methods, behind a thin guard that raises
    ``RuntimeError`` when called with ``allowed_experts`` (not None): the unpatched model
    cannot honour an opt-out, and transformers would swallow the keyword. A model that is
    not patched is returned unchanged.

    Raises ``ValueError`` for a module whose MoE blocks are patched through its parent (call
    remove_flexmoe on the parent, named in the message).
    """
    state = model.__dict__.get("_flexmoe_state")
    if state is None:
        if any(isinstance(getattr(m, "_flexmoe_state", None), OptOutState) for m in model.modules()):
            _refuse_nested(model, [m for m in model.modules() if "_flexmoe_state" in m.__dict__], "remove_flexmoe")
        return model
    for module in model.modules():
        if module.__dict__.get("_flexmoe_state") is state and hasattr(module, "gate"):
            for m, attrs in ((module, ("forward", "_flexmoe_state", "_flexmoe_backend", "_flexmoe_norm_topk")),
                             (module.gate, ("forward",))):
                for a in attrs:
                    m.__dict__.pop(a, None)
        if module is not model and "_flexmoe_owner" in module.__dict__:
            previous = module.__dict__.pop("_flexmoe_inner_previous", None)
            module.__dict__.pop("_flexmoe_owner")
            module.__dict__.pop("forward", None)
            if previous is not None:
                module.__dict__["forward"] = previous
    _unwrap_checkpointing(model)
    previous = dict(model._flexmoe_previous)
    for name, method in previous.items():
        model.__dict__.pop(name, None)
        if method is not None:
            model.__dict__[name] = method
    for a in ("_flexmoe_state", "_flexmoe_inner", "_flexmoe_previous"):
        model.__dict__.pop(a, None)
    _install_guards(model, previous)
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
        raise ValueError(
            f"model ({type(model).__name__}) is not patched by apply_flexmoe (never, or remove_flexmoe undid it), "
            f"so it cannot honour allowed_experts={allowed!r}: call "
            f"flexmoe_kernels.integrations.transformers.apply_flexmoe(model) first")
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
