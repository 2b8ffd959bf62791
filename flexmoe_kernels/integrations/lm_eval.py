"""lm-evaluation-harness model type ``"flexmoe"``: any opt-out configuration of an MoE checkpoint.

``FlexMoELM`` is lm-eval's stock Hugging Face model class (``HFLM``, registered as ``"hf"``)
with our transformers integration applied (:func:`flexmoe_kernels.integrations.transformers.apply_flexmoe`):
every sparse MoE block runs our layer (``moe_backend``, default ``"auto"``: the fastest
available backend for the device) and every forward and ``generate`` lm-eval makes runs inside
:func:`~flexmoe_kernels.integrations.transformers.allowed_experts`, so an opted-out expert's
router logit is ``-inf`` before the softmax: the scores equal those of the checkpoint rebuilt
without that expert. Model types: those :data:`SUPPORTED_MODEL_TYPES` lists (FlexOlmo, ours
or transformers' ``flex_olmo``, OLMoE, Qwen3-MoE, Mixtral), local directories or Hub ids.

``model_args`` (lm-eval splits them on commas, so lists use ``|``)::

    pretrained=DIR_OR_HUB_ID,allowed_experts=public|code,top_k=2,moe_backend=auto,expert_names=a|b|c|d

* ``allowed_experts``: names or indices joined by ``|`` (``public|code``, ``0|2``); absent: every
  expert. Each token then routes among these experts only.
* ``top_k``: experts per token; default the checkpoint's. A set smaller than the top-k is an
  error that says to pass ``top_k`` (``flexmoe eval`` lowers it by itself and says so).
* ``expert_names``: E names joined by ``|``; default the config's ``expert_names``, Ai2's names
  for its released checkpoints (:data:`flexmoe_kernels.models.RELEASED_EXPERT_NAMES`), else
  ``expert_0 ..``.
* ``moe_backend``: ``auto``, ``torch``, ``triton``, ``cuda``.
* everything else: ``HFLM``'s own (``dtype``, ``revision``, ``max_length``, ...).

lm-eval's ``lm_eval`` command does not import this module; run it through ``flexmoe eval`` or
``python -m flexmoe_kernels.integrations.lm_eval <lm_eval arguments>`` (lm-eval's command line
with ``--model flexmoe`` registered), or import it before ``lm_eval.simple_evaluate``.

Engines (``engine=auto|transformers|ours``): ``transformers`` loads the checkpoint with
transformers and patches it (every supported family); ``ours`` loads a FlexOlmo checkpoint with
our :class:`flexmoe_kernels.FlexOlmoForCausalLM` behind a thin adapter, and is what ``auto``
picks for a checkpoint with the router expert bias (``expert_bias: true``: ``flexmoe demo`` and
OLMo-core conversions), which transformers' ``flex_olmo`` does not implement (it would drop it
silently). ``ours`` generates without lm-eval's early stop (lm-eval cuts the text at its stop
sequences afterwards: same result, slower) and reads a bare ``tokenizer.json`` (``flexmoe
prepare-data``'s) when the checkpoint has no transformers tokenizer files.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence, Union

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .transformers import SUPPORTED_MODEL_TYPES, allowed_experts, apply_flexmoe, is_patched, remove_flexmoe

__all__ = ["MODEL_NAME", "SEPARATOR", "CheckpointInfo", "FlexMoELM", "inspect_checkpoint", "parse_expert_list", "main"]

MODEL_NAME = "flexmoe"
SEPARATOR = "|"


class CheckpointInfo(dict):
    """What :func:`inspect_checkpoint` read from a checkpoint's config (a dict: ``model_type``,
    ``expert_names``, ``num_experts``, ``top_k``, ``pretrained``, ``revision``, ``commit``)."""


def _split(value: Any) -> list:
    """``"a|b"`` / ``"a,b"`` / ``["a", "b"]`` / ``3`` -> a list of names or ints (indices)."""
    if value is None:
        return []
    if isinstance(value, (int, str)):
        items = [value] if isinstance(value, int) else [s.strip() for s in re.split(r"[|,]", value) if s.strip()]
    else:
        items = list(value)
    out = []
    for item in items:
        if isinstance(item, str) and re.fullmatch(r"\d+", item):
            item = int(item)
        out.append(item)
    return out


def parse_expert_list(value: Any, names: Sequence[str], argument: str = "allowed_experts") -> list[str]:
    """The expert names ``value`` selects: names or indices joined by ``|`` (or a list of them).

    A value that equals a name is that name (even when it is all digits); other digits are an
    index. Raises ``ValueError`` naming ``argument`` for an unknown name or an index out of
    range (the message lists the valid names), an empty selection, or repeats."""
    names = list(names)
    raw = [value] if isinstance(value, str) and value in names else _split(value)
    out: list[str] = []
    for item in raw:
        if isinstance(item, int) and str(item) not in names:
            if not 0 <= item < len(names):
                raise ValueError(f"{argument}: expert index {item} is out of range: the model has {len(names)} "
                                 f"experts, 0..{len(names) - 1} = {', '.join(names)}")
            item = names[item]
        item = str(item)
        if item not in names:
            raise ValueError(f"{argument}: unknown expert {item!r}; the model's experts are: {', '.join(names)}")
        if item in out:
            raise ValueError(f"{argument}: expert {item!r} is named twice")
        out.append(item)
    if not out:
        raise ValueError(f"{argument}: no expert given; the model's experts are: {', '.join(names)}")
    return out


def _commit_of(path: str) -> Optional[str]:
    """The Hub commit of a snapshot directory (``.../snapshots/<sha>``), else None."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) >= 2 and parts[-2] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return None


def _hub_commit(pretrained: str, revision: Optional[str]) -> Optional[str]:
    """The commit of the cached Hub snapshot of ``pretrained`` (a Hub id, already downloaded);
    never touches the network. None for a local directory or when it cannot be told."""
    if os.path.isdir(pretrained):
        return None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(pretrained, revision=revision, local_files_only=True, allow_patterns=["config.json"])
    except Exception:  # not a Hub id, not cached, no huggingface_hub
        return None
    return _commit_of(os.fspath(path))


def inspect_checkpoint(pretrained: str, *, revision: Optional[str] = None, expert_names: Any = None,
                       argument: str = "pretrained", trust_remote_code: bool = False) -> CheckpointInfo:
    """Read a checkpoint's config (no weights) and check that we can opt its experts out.

    Raises ``ValueError`` naming ``argument`` when the config cannot be read (no such directory,
    not a Hub id, not cached offline), when its ``model_type`` is not an MoE our transformers
    integration patches (the message lists the supported ones), for a FlexOlmo config with the
    router expert bias, or for ``expert_names`` of the wrong length."""
    import transformers

    from ..models.hub import hub_id_of, released_expert_names

    try:
        config = transformers.AutoConfig.from_pretrained(pretrained, revision=revision,
                                                         trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError / ValueError from the hub client or a broken config.json
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{argument} {pretrained!r}: no model config could be read ({why})") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{argument} {pretrained!r} is a {model_type!r} model, not an MoE whose experts can be opted "
                         f"out; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    engine = "ours" if getattr(config, "expert_bias", False) else "transformers"
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = int(config.num_experts_per_tok)
    if expert_names is not None and expert_names != "":
        names = [str(n) for n in _split(expert_names)]
        if len(names) != num_experts or len(set(names)) != len(names):
            raise ValueError(f"expert_names: {len(names)} names ({SEPARATOR.join(names)}) for a model with "
                             f"{num_experts} experts (give {num_experts} distinct names joined by {SEPARATOR!r})")
    else:
        names = getattr(config, "expert_names", None)
        if not names:
            d = config.to_dict()
            names = released_expert_names(hub_id_of(pretrained, d), d)
        names = list(names) if names else [f"expert_{i}" for i in range(num_experts)]
    return CheckpointInfo(model_type=model_type, expert_names=names, num_experts=int(num_experts), top_k=top_k,
                          engine=engine, expert_bias=bool(getattr(config, "expert_bias", False)),
                          pretrained=str(pretrained), revision=revision,
                          commit=_commit_of(str(pretrained)) if os.path.isdir(str(pretrained)) else None)


def _router_modules(model: torch.nn.Module) -> list:
    """The routers (``gate`` modules with a ``top_k``) of the model's sparse MoE blocks."""
    return [m.gate for m in model.modules()
            if hasattr(m, "experts") and hasattr(getattr(m, "gate", None), "top_k")]


class _OursForLMEval(torch.nn.Module):
    """Our :class:`~flexmoe_kernels.FlexOlmoForCausalLM` as lm-eval's ``HFLM`` calls a
    transformers model: ``config`` (transformers' config of the checkpoint), ``device``,
    ``forward(input_ids).logits``, ``generate(input_ids=, max_length=, attention_mask=, ...)``.
    ``allowed`` (expert names) is passed to every call."""

    def __init__(self, model, config, name_or_path: str):
        super().__init__()
        self.inner = model
        self.config = config
        self.name_or_path = name_or_path
        self.allowed: Optional[list] = None

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def tie_weights(self) -> None:
        self.inner.tie_weights()

    def forward(self, input_ids, attention_mask=None, **_):
        return self.inner(input_ids, allowed_experts=self.allowed, attention_mask=attention_mask)

    @torch.no_grad()
    def generate(self, input_ids, max_length, attention_mask=None, pad_token_id=None, do_sample=False,
                 temperature=None, top_k=None, top_p=None, stopping_criteria=None, use_cache=True, **_):
        # lm-eval cuts the text at its stop sequences itself: generating to max_length is the same result
        sample = bool(do_sample) and (temperature or 1.0) > 0
        return self.inner.generate(input_ids, max_new_tokens=max(int(max_length) - input_ids.shape[1], 1),
                                   do_sample=sample, temperature=float(temperature or 1.0), top_k=top_k if sample else None,
                                   top_p=top_p if sample else None, allowed_experts=self.allowed,
                                   attention_mask=attention_mask, pad_token_id=pad_token_id, use_cache=use_cache)


def _our_tokenizer(local: str, model_config):
    """The checkpoint's tokenizer for lm-eval: transformers' files when present, else a bare
    ``tokenizer.json`` wrapped in ``PreTrainedTokenizerFast`` with the ids of ``tokenizer_meta.json``
    / the config. ``ValueError`` when there is none."""
    import json

    import transformers

    if os.path.isfile(os.path.join(local, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(local)
    path = os.path.join(local, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"pretrained {local!r} has no tokenizer (tokenizer_config.json or tokenizer.json): pass "
                         f"tokenizer=DIR in model_args")
    meta_path = os.path.join(local, "tokenizer_meta.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    vocab = tok.convert_ids_to_tokens
    eos_id = meta.get("eos_token_id", getattr(model_config, "eos_token_id", None))
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    specials = {}
    if meta.get("eos_token") or eos_id is not None:
        specials["eos_token"] = meta.get("eos_token") or vocab(int(eos_id))
    bos_id = getattr(model_config, "bos_token_id", None)
    if isinstance(bos_id, int) and bos_id < len(tok):
        specials["bos_token"] = vocab(bos_id)
    pad_id = meta.get("pad_token_id", getattr(model_config, "pad_token_id", None))
    if isinstance(pad_id, int) and pad_id < len(tok):
        specials["pad_token"] = vocab(pad_id)
    tok.add_special_tokens({k: v for k, v in specials.items() if v is not None})
    return tok


class FlexMoELM(HFLM):
    """lm-eval's ``HFLM`` that honours an opt-out (see the module docstring for ``model_args``).

    :meth:`configure` changes the allowed experts and top-k of a loaded model, so one load serves
    many configurations (``flexmoe eval --opt-out-sweep``)."""

    def __init__(self, pretrained: Union[str, torch.nn.Module] = None, allowed_experts: Any = None,
                 top_k: Optional[int] = None, expert_names: Any = None, moe_backend: Optional[str] = None,
                 engine: str = "auto", **kwargs) -> None:
        if pretrained is None:
            raise ValueError("pretrained: give the checkpoint (model_args pretrained=DIR_OR_HUB_ID)")
        if engine not in ("auto", "transformers", "ours"):
            raise ValueError(f"engine: 'auto', 'transformers' or 'ours', got {engine!r}")
        self._ours: Optional[_OursForLMEval] = None
        if isinstance(pretrained, str):  # every check of the config before any weight is read
            info = inspect_checkpoint(pretrained, revision=kwargs.get("revision"), expert_names=expert_names,
                                      trust_remote_code=bool(kwargs.get("trust_remote_code", False)))
            names = info["expert_names"]
            if allowed_experts is not None:
                allowed = parse_expert_list(allowed_experts, names)
                self._check_k(len(allowed), top_k, info["top_k"], allowed)
            engine = info["engine"] if engine == "auto" else engine
            if engine == "transformers" and info["expert_bias"]:
                raise ValueError(f"engine: {pretrained!r} has a router expert bias, which transformers' flex_olmo does "
                                 f"not implement: use engine=ours (or auto)")
            if engine == "ours" and info["model_type"] != "flex_olmo":
                raise ValueError(f"engine: ours runs FlexOlmo checkpoints only; {pretrained!r} is "
                                 f"{info['model_type']!r}: use engine=transformers (or auto)")
            info["engine"] = engine
            if engine == "ours":
                pretrained, kwargs = self._load_ours(pretrained, names, moe_backend, kwargs)
        else:
            info = CheckpointInfo(model_type=getattr(pretrained.config, "model_type", None), pretrained=None,
                                  revision=None, commit=None, engine="transformers")
            names = None if expert_names is None else [str(n) for n in _split(expert_names)]
        super().__init__(pretrained=pretrained, **kwargs)
        self._moe_backend = moe_backend
        if self._ours is not None:
            self.expert_names = list(self._ours.inner.expert_names)
            self.checkpoint_top_k = int(self._ours.inner.config.num_experts_per_tok)
        else:
            model = self._model
            if names is None and is_patched(model):
                names = list(model._flexmoe_state.expert_names)
            apply_flexmoe(model, backend=moe_backend, expert_names=names)
            self.expert_names = list(model._flexmoe_state.expert_names)
            self.checkpoint_top_k = int(_router_modules(model)[0].top_k)
        info.update(expert_names=self.expert_names, num_experts=len(self.expert_names), top_k=self.checkpoint_top_k)
        if not info.get("commit") and info.get("pretrained"):  # a Hub snapshot's commit
            source = self._ours_source if self._ours is not None else None
            info["commit"] = (_commit_of(source) if source else None) or _hub_commit(
                info["pretrained"], info.get("revision")) or getattr(
                getattr(self._model, "config", None), "_commit_hash", None)
        self.checkpoint_info = info
        self.engine = info["engine"]
        self.allowed: list[str] = list(self.expert_names)
        self.top_k = self.checkpoint_top_k
        self._tensors_sha256: Optional[str] = None
        self.configure(allowed_experts, top_k)

    def _load_ours(self, pretrained: str, names, moe_backend, kwargs):
        """Our model (and its tokenizer) for ``engine=ours``: ``(adapter, HFLM kwargs)``."""
        import transformers

        from ..models import FlexOlmoForCausalLM
        from ..models.hub import resolve_checkpoint

        kwargs = dict(kwargs)
        revision = kwargs.pop("revision", None)
        local = resolve_checkpoint(pretrained, revision=revision, argument="pretrained")
        dtype = kwargs.pop("dtype", "auto")
        dtype = None if dtype in (None, "auto") else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        overrides = {"expert_names": list(names)}
        if moe_backend:
            overrides["moe_backend"] = moe_backend
        model = FlexOlmoForCausalLM.from_pretrained(local, dtype=dtype, device=device, **overrides).eval()
        config = transformers.AutoConfig.from_pretrained(local)
        tok = kwargs.pop("tokenizer", None) or _our_tokenizer(local, config)
        self._ours = _OursForLMEval(model, config, pretrained)
        self._ours_source = local
        for k in ("parallelize", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file"):
            if kwargs.get(k):
                raise ValueError(f"{k}: not available with engine=ours")
        return self._ours, dict(kwargs, tokenizer=tok)

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _check_k(n: int, top_k: Optional[int], model_k: int, allowed: Sequence[str]) -> None:
        k = model_k if top_k is None else int(top_k)
        if not 1 <= k:
            raise ValueError(f"top_k: must be at least 1, got {k}")
        if n < k:
            how = ("lower top_k" if top_k is not None else f"pass top_k={n} (or fewer) with it; the checkpoint's "
                   f"top-k is {model_k}")
            raise ValueError(f"allowed_experts: {SEPARATOR.join(allowed)} allows {n} expert{'s' if n != 1 else ''}, "
                             f"fewer than top-k {k} experts per token: allow at least {k} experts or {how}")

    def configure(self, allowed: Any = None, top_k: Optional[int] = None, lower_top_k: bool = False) -> dict:
        """Evaluate from now on with ``allowed`` experts (names / indices / ``"a|b"``; None: every
        expert) and ``top_k`` experts per token (None: the checkpoint's, lowered to the set's size
        when ``lower_top_k``). Returns ``{"allowed_experts", "top_k", "top_k_lowered_from"}``.
        ``ValueError`` (naming the argument) for unknown experts or a set smaller than the top-k."""
        names = list(self.expert_names) if allowed is None else parse_expert_list(allowed, self.expert_names)
        lowered = None
        if top_k is None and lower_top_k and len(names) < self.checkpoint_top_k:
            top_k, lowered = len(names), self.checkpoint_top_k
        self._check_k(len(names), top_k, self.checkpoint_top_k, names)
        k = self.checkpoint_top_k if top_k is None else int(top_k)
        if k > len(self.expert_names):
            raise ValueError(f"top_k: {k} is more than the model's {len(self.expert_names)} experts")
        self._set_top_k(k)
        self.allowed = names
        if self._ours is not None:
            self._ours.allowed = list(names)
        return {"allowed_experts": list(names), "top_k": k, "top_k_lowered_from": lowered}

    def _set_top_k(self, k: int) -> None:
        """Route ``k`` experts per token. transformers engine: every router's ``top_k`` and the
        config's ``num_experts_per_tok`` (re-applying our patch so that its opt-out check uses ``k``)."""
        if k == self.top_k:
            return
        if self._ours is not None:
            self._ours.inner.set_top_k(k)
            self.top_k = k
            return
        model = self._model
        remove_flexmoe(model)
        for router in _router_modules(model):
            router.top_k = k
        for m in model.modules():  # families that keep the k on the block too
            if hasattr(m, "experts") and isinstance(getattr(m, "top_k", None), int):
                m.top_k = k
        model.config.num_experts_per_tok = k
        apply_flexmoe(model, backend=self._moe_backend, expert_names=self.expert_names)
        self.top_k = k

    # ------------------------------------------------------------------ lm-eval's model calls
    #: True: no per-request progress bars of lm-eval's (``flexmoe eval`` draws its own bar)
    quiet = False

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self.quiet)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or self.quiet)

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self._ours is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with allowed_experts(self._model, list(self.allowed)):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self._ours is not None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        with allowed_experts(self._model, list(self.allowed)):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ------------------------------------------------------------------ provenance
    def tensors_sha256(self) -> str:
        """sha256 of the evaluated weights (:func:`flexmoe_kernels.models.tensors_sha256`), once."""
        if self._tensors_sha256 is None:
            from ..models.checkpoint import tensors_sha256

            module = self._ours.inner if self._ours is not None else self._model
            self._tensors_sha256 = tensors_sha256({k: v.detach().cpu() for k, v in module.state_dict().items()})
        return self._tensors_sha256

    def get_model_info(self) -> dict:
        """lm-eval's model info without a network call for a local checkpoint, plus ours."""
        info = self.checkpoint_info
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or (
            info.get("pretrained") and os.path.isdir(str(info["pretrained"])))
        if offline or not isinstance(self.pretrained, str):
            base = {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(self._model.dtype), "model_revision": getattr(self, "revision", None),
                    "model_sha": info.get("commit") or ""}
        else:
            base = super().get_model_info()
        base.update(flexmoe_allowed_experts=list(self.allowed), flexmoe_top_k=self.top_k,
                    flexmoe_expert_names=list(self.expert_names), flexmoe_engine=self.engine)
        return base


if __name__ != "__main__":  # run as a script, the module registers itself when main() imports it
    register_model(MODEL_NAME)(FlexMoELM)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """lm-eval's command line with ``--model flexmoe`` registered
    (``python -m flexmoe_kernels.integrations.lm_eval --model flexmoe --model_args ... --tasks ...``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from flexmoe_kernels.integrations.lm_eval import main as _main  # the importable module: registers "flexmoe"

    _main()
