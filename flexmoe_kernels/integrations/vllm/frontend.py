"""Front-end side: validate ``allowed_experts`` at the door and salt the prefix cache with it.

:func:`install` wraps vLLM's ``InputProcessor.process_inputs`` (the one place every request
passes, offline ``LLM`` and the OpenAI server alike, before it reaches the engine):

* ``extra_args["allowed_experts"]`` is parsed against the served model's ``expert_names`` and
  top-k (:func:`.allowed.parse_allowed_experts`); an invalid value raises vLLM's
  ``VLLMValidationError`` (HTTP 400 naming the field and the value; the server keeps serving).
  A model other than FlexOlmo refuses the field.
* the request-local copy of the params gets the canonical set (sorted indices) for the worker;
* the request's ``cache_salt`` is joined with the set (:func:`.allowed.cache_salt`), so KV
  blocks computed under one allowed set are never reused under another, while requests with
  the same set (and the same user salt) still share them. ``validate_params`` of a logits
  processor cannot do this: it sees neither the model config nor the cache salt.
"""
from __future__ import annotations

import functools
from typing import Optional

from .allowed import FIELD, AllowedExpertsError, cache_salt, encode_canonical, parse_allowed_experts

__all__ = ["install", "model_experts"]


def model_experts(hf_config) -> Optional[tuple[list[str], int]]:
    """``(expert_names, top_k)`` of a FlexOlmo config, None for any other model."""
    if getattr(hf_config, "model_type", None) != "flex_olmo":
        return None
    E = int(getattr(hf_config, "num_experts", 0) or getattr(hf_config, "num_local_experts", 0))
    names = getattr(hf_config, "expert_names", None)
    if not (isinstance(names, (list, tuple)) and len(names) == E and all(isinstance(n, str) for n in names)):
        names = _released_names(hf_config, E)
    return list(names), int(hf_config.num_experts_per_tok)


def _released_names(hf_config, E: int) -> list[str]:
    """Ai2's released checkpoints name no experts: the names flexmoe uses for them, else expert_i."""
    try:
        from flexmoe_kernels.models.hub import hub_id_of, released_expert_names

        cfg = hf_config.to_dict()
        names = released_expert_names(hub_id_of(getattr(hf_config, "_name_or_path", "") or "", cfg), cfg)
        if names and len(names) == E:
            return list(names)
    except Exception:  # noqa: BLE001 - naming is best effort; the default names always work
        pass
    return [f"expert_{i}" for i in range(E)]


def _validation_error(message: str, value: object) -> Exception:
    try:
        from vllm.exceptions import VLLMValidationError

        return VLLMValidationError(message, parameter=FIELD, value=value)
    except ImportError:  # pragma: no cover
        return AllowedExpertsError(message, value)


def _wrap(process_inputs):
    @functools.wraps(process_inputs)
    def process_inputs_with_allowed_experts(self, request_id, prompt, params, *args, **kwargs):
        extra = getattr(params, "extra_args", None)
        value = extra.get(FIELD) if isinstance(extra, dict) else None
        indices = None
        if value is not None:
            info = model_experts(self.model_config.hf_config)
            if info is None:
                raise _validation_error(
                    f"{FIELD}: the served model ({self.model_config.model}) is not a FlexOlmo mixture of "
                    f"experts; it has no experts to choose", value)
            impl = str(getattr(self.model_config, "model_impl", "auto"))
            if impl.split(".")[-1].lower() not in ("auto", "vllm"):
                raise _validation_error(
                    f"{FIELD}: the model is served by vLLM's {impl!r} implementation (--model-impl), which has "
                    f"no per-request opt-out; serve it with --model-impl auto (flexmoe's FlexOlmo class)", value)
            names, top_k = info
            try:
                indices = parse_allowed_experts(value, names, top_k)
            except AllowedExpertsError as e:
                raise _validation_error(str(e), value) from None
        request = process_inputs(self, request_id, prompt, params, *args, **kwargs)
        sp = getattr(request, "sampling_params", None)
        if sp is not None and isinstance(sp.extra_args, dict) and FIELD in sp.extra_args:
            new_extra = {k: v for k, v in sp.extra_args.items() if k != FIELD}
            canon = encode_canonical(indices)
            if canon is not None:
                new_extra[FIELD] = canon
            sp.extra_args = new_extra
        if indices is not None:
            request.cache_salt = cache_salt(indices, request.cache_salt)
        return request

    process_inputs_with_allowed_experts._flexmoe_wrapped = True
    return process_inputs_with_allowed_experts


def _refuse_beam_search(to_beam_search_params):
    """vLLM's beam search builds new sampling params per step without ``vllm_xargs``: the allowed
    set would be lost (every expert served). Refuse the combination (HTTP 400)."""
    @functools.wraps(to_beam_search_params)
    def to_beam_search_params_checked(self, *args, **kwargs):
        xargs = getattr(self, "vllm_xargs", None)
        if isinstance(xargs, dict) and xargs.get(FIELD) is not None:
            raise _validation_error(f"{FIELD} cannot be combined with beam search (use_beam_search): vLLM's beam "
                                    f"search drops vllm_xargs", xargs.get(FIELD))
        return to_beam_search_params(self, *args, **kwargs)

    to_beam_search_params_checked._flexmoe_wrapped = True
    return to_beam_search_params_checked


def install() -> None:
    """Wrap ``InputProcessor.process_inputs`` and the OpenAI requests' beam-search conversion
    (idempotent)."""
    from vllm.v1.engine.input_processor import InputProcessor

    if not getattr(InputProcessor.process_inputs, "_flexmoe_wrapped", False):
        InputProcessor.process_inputs = _wrap(InputProcessor.process_inputs)
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    except ImportError:  # another vLLM layout: the server then cannot reach beam search this way
        return
    for cls in (CompletionRequest, ChatCompletionRequest):
        method = getattr(cls, "to_beam_search_params", None)
        if method is not None and not getattr(method, "_flexmoe_wrapped", False):
            cls.to_beam_search_params = _refuse_beam_search(method)
