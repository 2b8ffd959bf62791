"""Import of Hugging Face ``olmo2`` checkpoints (OLMo-2, the public model FlexOlmo starts from) and
the dense "public view" of a multi-expert FlexOlmo checkpoint.

FlexOlmo's architecture is OLMo-2's (post-norm blocks, full-width QK-norm, RoPE, SwiGLU), so an
OLMo-2 model is exactly a dense FlexOlmo model (E = 1, K = 1: the router's softmax over one expert
is 1). The mapping, per layer ``i`` (everything else keeps its name):

======================================================  ============================================
olmo2                                                   flex_olmo (ours)
======================================================  ============================================
``model.layers.i.mlp.gate_proj.weight`` (F, D) and       ``model.layers.i.mlp.experts.gate_up_proj``
``model.layers.i.mlp.up_proj.weight`` (F, D)            (1, 2F, D) = ``cat(gate, up)[None]``
``model.layers.i.mlp.down_proj.weight`` (D, F)          ``model.layers.i.mlp.experts.down_proj`` (1, D, F)
(none)                                                  ``model.layers.i.mlp.gate.weight`` (1, D): zeros
======================================================  ============================================

:class:`Olmo2Source` presents an ``olmo2`` directory under our names, reading one tensor (or one
layer's two FFN halves) per access, so importing a 7B model never holds two copies of it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Optional, Union

import torch

from .checkpoint import LazyStateDict, TensorMapping, lazy_state_dict
from .config import CheckpointError, FlexOlmoConfig, read_json_object

__all__ = ["OLMO2_MODEL_TYPE", "checkpoint_model_type", "is_olmo2_checkpoint", "config_from_olmo2",
           "Olmo2Source", "open_olmo2", "PublicView", "public_view"]

OLMO2_MODEL_TYPE = "olmo2"
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_FLEX_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")
# olmo2 config fields that map 1:1 to ours
_SAME = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
         "pad_token_id", "bos_token_id", "eos_token_id", "initializer_range")


def checkpoint_model_type(directory: Union[str, os.PathLike]) -> Optional[str]:
    """``model_type`` of ``directory/config.json`` (None when there is no config.json or no field)."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        return None
    return read_json_object(path).get("model_type")


def is_olmo2_checkpoint(directory: Union[str, os.PathLike]) -> bool:
    """Whether ``directory`` is a Hugging Face ``olmo2`` checkpoint (its config.json says so)."""
    return os.path.isdir(os.fspath(directory)) and checkpoint_model_type(directory) == OLMO2_MODEL_TYPE


def config_from_olmo2(d: dict, what: str = "olmo2 config", **overrides) -> FlexOlmoConfig:
    """Our dense config (E = 1, K = 1, expert ``public``) from an ``olmo2`` config.json dict.

    ``ValueError`` naming ``what`` and the field for what FlexOlmo cannot represent (attention
    biases, another activation, a RoPE scaling other than default)."""
    mt = d.get("model_type")
    if mt != OLMO2_MODEL_TYPE:
        raise ValueError(f"{what}: model_type must be 'olmo2', got {mt!r}")
    if d.get("attention_bias", False):
        raise ValueError(f"{what}: attention_bias=True is not supported (FlexOlmo has no attention biases)")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{what}: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype != "default":
        raise ValueError(f"{what}: rope_type={rtype!r} is not supported (only 'default')")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))  # Olmo2Config's default theta
    kw = {k: d[k] for k in _SAME if k in d and d[k] is not None}
    kw.setdefault("rms_norm_eps", 1e-5)  # Olmo2Config's default (ours is 1e-6)
    kw.setdefault("max_position_embeddings", 2048)
    eos = kw.get("eos_token_id")
    V = kw.get("vocab_size", 0)
    if isinstance(eos, int) and not 0 <= eos < V:
        kw.pop("eos_token_id")  # transformers' own default (50279) can lie outside a small vocabulary
    for name in ("pad_token_id", "bos_token_id"):
        v = kw.get(name)
        if isinstance(v, int) and not 0 <= v < V:
            kw.pop(name)
    kw.update(rope_theta=float(theta), num_experts=1, num_experts_per_tok=1, expert_names=["public"],
              expert_bias=False, extra={"imported_from": "olmo2"})
    kw.update(overrides)
    try:
        return FlexOlmoConfig(**kw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: {exc}") from exc


class Olmo2Source(TensorMapping):
    """An ``olmo2`` checkpoint directory as a lazy mapping under our (flex_olmo) tensor names.

    ``src[name]`` reads only what ``name`` needs (the FFN's gate and up halves for
    ``gate_up_proj``); nothing is cached. :meth:`shape` / :meth:`dtype` read file headers only,
    as :class:`~flexmoe_kernels.models.checkpoint.LazyStateDict`. A tied head is left out.
    """

    def __init__(self, directory: Union[str, os.PathLike], config: FlexOlmoConfig):
        self.directory = os.fspath(directory)
        self.config = config
        skip = ["lm_head.weight"] if config.tie_word_embeddings else []
        self._raw: LazyStateDict = lazy_state_dict(self.directory, None, skip=skip)
        keys = []
        layers = set()
        for k in self._raw:
            m = _DENSE_MLP.match(k)
            if m is None:
                keys.append(k)
            else:
                layers.add(int(m.group(1)))
        for i in sorted(layers):
            for w in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
                keys.append(f"model.layers.{i}.mlp.{w}")
            for w in ("gate_proj", "up_proj", "down_proj"):
                if f"model.layers.{i}.mlp.{w}.weight" not in self._raw:
                    raise CheckpointError(f"{self.directory}: olmo2 checkpoint is missing "
                                          f"'model.layers.{i}.mlp.{w}.weight'")
        self._set_keys(keys)

    def _mlp(self, i: int, w: str) -> str:
        return f"model.layers.{i}.mlp.{w}.weight"

    def __getitem__(self, key: str) -> torch.Tensor:
        self._known(key)
        m = _FLEX_MLP.match(key)
        if m is None:
            return self._raw[key]
        i, field = int(m.group(1)), m.group(2)
        if field == "gate.weight":
            return torch.zeros(1, self.config.hidden_size, dtype=self._raw.dtype(self._mlp(i, "down_proj")))
        if field == "experts.gate_up_proj":
            return torch.cat([self._raw[self._mlp(i, "gate_proj")], self._raw[self._mlp(i, "up_proj")]], 0)[None]
        return self._raw[self._mlp(i, "down_proj")][None]

    def shape(self, key: str) -> tuple[int, ...]:
        self._known(key)
        m = _FLEX_MLP.match(key)
        if m is None:
            return self._raw.shape(key)
        i, field = int(m.group(1)), m.group(2)
        if field == "gate.weight":
            return (1, self.config.hidden_size)
        if field == "experts.gate_up_proj":
            g, u = self._raw.shape(self._mlp(i, "gate_proj")), self._raw.shape(self._mlp(i, "up_proj"))
            return (1, g[0] + u[0], g[1])
        return (1, *self._raw.shape(self._mlp(i, "down_proj")))

    def dtype(self, key: str) -> torch.dtype:
        self._known(key)
        m = _FLEX_MLP.match(key)
        if m is None:
            return self._raw.dtype(key)
        return self._raw.dtype(self._mlp(int(m.group(1)), "down_proj"))


def open_olmo2(directory: Union[str, os.PathLike], what: str = "olmo2 checkpoint") -> tuple[FlexOlmoConfig, Olmo2Source]:
    """(our dense config, lazy source under our names) of an ``olmo2`` checkpoint directory."""
    d = os.fspath(directory)
    cfg = config_from_olmo2(read_json_object(os.path.join(d, "config.json")), f"{what} {d!r}")
    return cfg, Olmo2Source(d, cfg)


class PublicView(TensorMapping):
    """The dense public model inside a multi-expert FlexOlmo checkpoint: every shared tensor, and
    expert 0's rows of the MoE tensors (its FFN and router row; no expert bias). Lazy like its
    source (``sd[name]`` reads the full tensor and keeps row 0)."""

    def __init__(self, sd: Mapping[str, torch.Tensor]):
        self._sd = sd
        self._set_keys(k for k in sd if not k.endswith("mlp.gate.expert_bias"))

    def __getitem__(self, key: str) -> torch.Tensor:
        self._known(key)
        v = self._sd[key]
        return v[:1].clone() if _FLEX_MLP.match(key) else v

    def shape(self, key: str) -> tuple[int, ...]:
        s = tuple(self._sd.shape(key)) if hasattr(self._sd, "shape") else tuple(self._sd[key].shape)
        return (1, *s[1:]) if _FLEX_MLP.match(key) else s

    def dtype(self, key: str) -> torch.dtype:
        return self._sd.dtype(key) if hasattr(self._sd, "dtype") else self._sd[key].dtype


def public_view(config: FlexOlmoConfig, sd: Mapping[str, torch.Tensor]) -> tuple[FlexOlmoConfig, Mapping]:
    """(dense config, :class:`PublicView`) of a FlexOlmo model whose expert 0 is the public model
    (FlexOlmo's layout: the released FlexOlmo-7x7B and every ``flexmoe merge`` output). A dense
    model is returned as it is."""
    if config.num_experts == 1:
        return config, sd
    cfg = config.copy(num_experts=1, num_experts_per_tok=1, expert_bias=False,
                      expert_names=[config.expert_names[0]], norm_topk_prob=False,
                      extra={k: v for k, v in config.extra.items() if k not in ("merged_from", "role")})
    return cfg, PublicView(sd)
