"""``FlexOlmoConfig``: the model's hyper-parameters, mirroring Hugging Face's ``flex_olmo`` config.json.

Field names are Hugging Face's so a ``config.json`` written by ``transformers`` reads here and
one written here reads in ``transformers`` (``model_type: "flex_olmo"``). Our additions:
``expert_names`` (E names), ``expert_bias`` (FlexOlmo's optional negative router bias),
``moe_backend``, ``attn_implementation`` and ``extra`` (free metadata that round-trips).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from .._validate import check_positive_int

__all__ = ["FlexOlmoConfig", "ATTN_IMPLEMENTATIONS", "CheckpointError", "read_json_object"]

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attn")



class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a file that is not valid JSON / safetensors (names the
    file and why) or tensors that do not match the model (names the tensors). Defined here so
    that ``config.json`` errors can raise it; re-exported by :mod:`.checkpoint`."""


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object (dict) stored in the file ``path``.

    Raises :class:`CheckpointError` (one line, naming the file) when it is not UTF-8, not valid
    JSON (with the line and column) or not a JSON object; ``OSError`` when it cannot be read.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


# Hugging Face fields we write for compatibility but whose only supported value is fixed.
_FIXED_HF_FIELDS = {
    "hidden_act": "silu",
    "attention_bias": False,
}
# Hugging Face fields we write with their defaults and otherwise ignore on reading.
_PASSIVE_HF_FIELDS = {
    "attention_dropout": 0.0,
    "use_cache": True,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.01,
}
# Keys of our own that would clash with Hugging Face's config handling are stored prefixed.
_OURS_PREFIXED = {"attn_implementation": "flexmoe_attn_implementation", "moe_backend": "flexmoe_moe_backend"}


@dataclass
class FlexOlmoConfig:
    """Hyper-parameters of a FlexOlmo model (defaults: Hugging Face's FlexOlmo-7x7B sizes).

    Args (Hugging Face names):
        vocab_size: V.
        hidden_size: D.
        intermediate_size: F, each expert's SwiGLU width.
        num_hidden_layers: L.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (GQA); default = ``num_attention_heads``.
        head_dim: per-head width; default ``hidden_size // num_attention_heads``. Must be even (RoPE).
        max_position_embeddings: informational (RoPE has no table to outgrow).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base (``rope_parameters["rope_theta"]`` in config.json); default 500000.
        num_experts: E (1 with ``num_experts_per_tok=1`` is a dense model).
        num_experts_per_tok: K.
        norm_topk_prob: renormalise the K routing weights (off in FlexOlmo).
        tie_word_embeddings: ``lm_head.weight`` is ``model.embed_tokens.weight``.
        pad_token_id, bos_token_id, eos_token_id: special tokens (eos may be a list); None = none.
        initializer_range: std of the normal initialisation.

    Ours:
        expert_names: E unique names, default ``["expert_0", ...]``.
        expert_bias: each layer's router has FlexOlmo's per-expert bias (applied as ``min(b, 0)``).
        moe_backend: FlexMoE backend ("auto", "torch", "triton", "cuda").
        attn_implementation: "auto" (flash-attn when importable on CUDA fp16/bf16, else SDPA),
            "sdpa" or "flash_attn".
        extra: free JSON-serialisable metadata (e.g. ``anchor_sha256``) kept in config.json.
    """

    vocab_size: int = 100352
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    num_experts: int = 7
    num_experts_per_tok: int = 5
    norm_topk_prob: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None
    initializer_range: float = 0.02
    expert_names: Optional[list] = None
    expert_bias: bool = False
    moe_backend: str = "auto"
    attn_implementation: str = "auto"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "num_experts", "num_experts_per_tok"):
            check_positive_int(getattr(self, name), name)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_positive_int(self.num_key_value_heads, "num_key_value_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_positive_int(self.head_dim, "head_dim")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} is larger than num_experts={self.num_experts}"
            )
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be a positive float, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive float, got {self.rope_theta!r}")
        self.rope_theta = float(self.rope_theta)
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size):
                raise ValueError(f"{name} must be None or an int in [0, vocab_size={self.vocab_size}), got {v!r}")
        if self.expert_names is None:
            self.expert_names = [f"expert_{i}" for i in range(self.num_experts)]
        self.expert_names = list(self.expert_names)
        if len(self.expert_names) != self.num_experts:
            raise ValueError(
                f"expert_names must have num_experts={self.num_experts} entries, got {len(self.expert_names)}"
            )
        if any(not isinstance(n, str) or not n for n in self.expert_names) or len(set(self.expert_names)) != len(
            self.expert_names
        ):
            raise ValueError(f"expert_names must be unique non-empty strings, got {self.expert_names}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )
        if not isinstance(self.moe_backend, str):
            raise TypeError(f"moe_backend must be a str, got {type(self.moe_backend).__name__}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")

    # ------------------------------------------------------------------ HF aliases
    @property
    def num_local_experts(self) -> int:
        return self.num_experts

    @property
    def rope_parameters(self) -> dict:
        return {"rope_type": "default", "rope_theta": self.rope_theta}

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (empty when None)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """The config.json content: Hugging Face's fields plus ours (JSON-serialisable)."""
        d: dict[str, Any] = {"architectures": ["FlexOlmoForCausalLM"], "model_type": "flex_olmo"}
        for f in fields(self):
            if f.name == "rope_theta":
                continue
            v = copy.deepcopy(getattr(self, f.name))
            d[_OURS_PREFIXED.get(f.name, f.name)] = v
        d["rope_parameters"] = self.rope_parameters
        d.update(_FIXED_HF_FIELDS)
        d.update(_PASSIVE_HF_FIELDS)
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "FlexOlmoConfig":
        """Build from a config.json dict (ours or Hugging Face's); ``overrides`` win.

        Raises ``ValueError`` for another ``model_type``, an unsupported ``hidden_act``,
        ``attention_bias`` or RoPE type, and ``TypeError`` for unknown override names.
        """
        d = dict(d)
        mt = d.get("model_type", "flex_olmo")
        if mt != "flex_olmo":
            hint = (": an OLMo-2 checkpoint loads with FlexOlmoForCausalLM.from_pretrained(dir), is taken as --public "
                    "by every flexmoe command, and converts with `flexmoe convert --to hf --input DIR --out OUT`"
                    if mt == "olmo2" else "")
            raise ValueError(f"config model_type must be 'flex_olmo', got {mt!r}{hint}")
        for k, want in _FIXED_HF_FIELDS.items():
            if k in d and d[k] != want:
                raise ValueError(f"config {k}={d[k]!r} is not supported (only {want!r})")
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        if rope:
            rtype = rope.get("rope_type", rope.get("type", "default"))
            if rtype != "default":
                raise ValueError(f"config rope_parameters rope_type={rtype!r} is not supported (only 'default')")
            if "rope_theta" in rope:
                d["rope_theta"] = rope["rope_theta"]
        for ours, stored in _OURS_PREFIXED.items():
            if stored in d:
                d[ours] = d[stored]
        if "num_local_experts" in d and "num_experts" not in d:
            d["num_experts"] = d["num_local_experts"]
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown FlexOlmoConfig fields in overrides: {sorted(unknown)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "FlexOlmoConfig":
        """Read a config JSON file (:func:`read_json_object`: ``CheckpointError`` naming the file
        for invalid JSON), then :meth:`from_dict`."""
        return cls.from_dict(read_json_object(path), **overrides)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> "FlexOlmoConfig":
        """Read ``directory/config.json``."""
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in checkpoint directory {str(directory)!r}")
        return cls.from_json_file(path, **overrides)

    def copy(self, **changes: Any) -> "FlexOlmoConfig":
        """A deep copy with ``changes`` applied (validated)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        d.update(changes)
        return type(self)(**d)
