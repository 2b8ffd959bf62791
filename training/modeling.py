"""Building, freezing, exporting and merging FlexOlmo models for the training recipe.

Legend: L layers, D hidden, F expert width, E experts, V vocabulary.

Key names are Hugging Face's (see ``docs/DESIGN.md``, model contract). Per layer ``i`` the MoE
tensors are ``model.layers.{i}.mlp.gate.weight`` (E, D), ``...mlp.gate.expert_bias`` (E,),
``...mlp.experts.gate_up_proj`` (E, 2F, D) and ``...mlp.experts.down_proj`` (E, D, F); every
other tensor is *shared* (embeddings, attention incl. q/k norms, norms, LM head).

Freezing a leading slice of a stacked tensor (the public expert 0 of a coupled model) uses a
parametrization: the tensor becomes ``cat([head, tail])`` where ``head`` is a frozen parameter
and only ``tail`` is trainable, so the frozen rows get neither gradients nor optimizer state;
:meth:`FlexMoE.set_trainable_experts` additionally skips the public expert's dW GEMMs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from flexmoe_kernels.models import FlexOlmoConfig, FlexOlmoForCausalLM, tensors_sha256
from flexmoe_kernels.models.checkpoint import LazyStateDict, TensorMapping, lazy_state_dict
from flexmoe_kernels.modules import FlexMoE

__all__ = [
    "ModelSpecError",
    "FrozenTensorMismatch",
    "PRESET_DIR",
    "load_model_config",
    "model_from_state_dict",
    "load_checkpoint",
    "is_moe_key",
    "shared_keys",
    "anchor_sha256",
    "coupled_state_dict",
    "freeze_all_but",
    "split_leading_rows_",
    "export_state_dict",
    "export_items",
    "trainable_param_to_hf",
    "check_owner_against_public",
    "merge_state_dicts",
    "count_params",
    "LazyTensors",
    "hf_shapes",
    "check_fits",
    "fresh_source",
    "param_value",
    "build_model",
    "open_checkpoint",
    "coupled_source",
]

PRESET_DIR = Path(__file__).resolve().parent / "configs"
_MOE_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate\.weight|gate\.expert_bias|experts\.gate_up_proj|experts\.down_proj)$")
MOE_FIELDS = ("gate.weight", "gate.expert_bias", "experts.gate_up_proj", "experts.down_proj")
# Architecture fields that must agree between a public model and its owners.
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings")


class ModelSpecError(ValueError):
    """A model config / checkpoint is missing, malformed or incompatible."""


class FrozenTensorMismatch(RuntimeError):
    """A tensor that must equal the public model's bit for bit does not."""


# ---------------------------------------------------------------------------- configs
def load_model_config(spec: str, **overrides) -> FlexOlmoConfig:
    """A dense config from a preset name (``training/configs/model_<name>.json``) or a JSON file.

    ``overrides`` (e.g. ``vocab_size`` from the data) replace fields; the result is dense
    (``num_experts=1, num_experts_per_tok=1``) unless the overrides say otherwise.
    """
    path = Path(spec)
    if not path.is_file():
        preset = PRESET_DIR / f"model_{spec}.json"
        if not preset.is_file():
            names = sorted(p.stem[len("model_"):] for p in PRESET_DIR.glob("model_*.json"))
            raise ModelSpecError(f"--model-config {spec!r} is neither a JSON file nor a preset (presets: {names})")
        path = preset
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"model config {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(d, dict):
        raise ModelSpecError(f"model config {str(path)!r} must hold a JSON object")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    d.setdefault("num_experts", 1)
    d.setdefault("num_experts_per_tok", 1)
    d.update(overrides)
    try:
        return FlexOlmoConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(f"model config {str(path)!r}: {exc}") from exc


def model_from_state_dict(config: FlexOlmoConfig, sd: Mapping[str, torch.Tensor], dtype=None) -> FlexOlmoForCausalLM:
    """A model built on the meta device and assigned from ``sd`` (HF names; tied head optional)."""
    model = _meta_model(config)
    check_fits(config, {k: v.shape for k, v in sd.items()})
    sd = dict(sd)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model


def open_checkpoint(directory: str | os.PathLike, what: str = "--public") -> tuple[FlexOlmoConfig, LazyStateDict]:
    """(config, lazy HF state dict) of a checkpoint dir: names and shapes are checked against the
    config from the file headers; tensors are read one at a time on access (single file or
    shards). A Hugging Face ``olmo2`` directory (OLMo-2, FlexOlmo's public model) reads as our
    dense model (:mod:`flexmoe_kernels.models.olmo2`: converted tensor by tensor on access).
    Errors (``ModelSpecError``) name ``what`` and the path."""
    from flexmoe_kernels.models.olmo2 import checkpoint_model_type, open_olmo2

    d = Path(directory)
    if not d.is_dir():
        raise ModelSpecError(f"{what} {str(d)!r}: checkpoint directory does not exist")
    if not (d / "config.json").is_file():
        raise ModelSpecError(f"{what} {str(d)!r}: no config.json (not a FlexOlmo checkpoint directory)")
    try:
        if checkpoint_model_type(d) == "olmo2":  # OLMo-2: converted on access, one tensor at a time
            config, sd = open_olmo2(d, what)
        else:
            config = FlexOlmoConfig.from_pretrained(d)
            # a tied head some writers store anyway is left out (as load_checkpoint always did)
            sd = lazy_state_dict(d, config.num_experts, skip=["lm_head.weight"] if config.tie_word_embeddings else [])
        shapes = {k: sd.shape(k) for k in sd}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelSpecError(f"{what} {str(d)!r}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
    try:
        check_fits(config, shapes)
    except ModelSpecError as exc:
        raise ModelSpecError(f"{what} {str(d)!r}: {exc}") from exc
    return config, sd


def load_checkpoint(directory: str | os.PathLike, what: str = "--public") -> tuple[FlexOlmoConfig, dict]:
    """(config, HF state dict on CPU as stored) of a checkpoint dir; errors name ``what`` and the path."""
    config, lazy = open_checkpoint(directory, what)
    try:
        sd = {k: lazy[k] for k in lazy}
    except Exception as exc:
        raise ModelSpecError(f"{what} {str(directory)!r}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
    return config, sd


# ---------------------------------------------------------------------------- sources and building
class LazyTensors(TensorMapping):
    """A read-only mapping ``name -> tensor`` whose values are computed on access by ``fn(name)``
    (nothing is cached): a model source that holds one tensor at a time."""

    def __init__(self, keys: Iterable[str], fn: Callable[[str], torch.Tensor]):
        self._set_keys(keys)
        self._fn = fn

    def __getitem__(self, key: str) -> torch.Tensor:
        self._known(key)
        return self._fn(key)


def _meta_model(config: FlexOlmoConfig) -> FlexOlmoForCausalLM:
    """The model on the meta device (no memory), with its FlexMoE buffers real (all experts trainable)."""
    with torch.device("meta"):
        model = FlexOlmoForCausalLM(config)
    for m in model.modules():
        if isinstance(m, FlexMoE):
            m.trainable_experts = torch.ones(m.num_experts, dtype=torch.bool)
    return model


def hf_shapes(config: FlexOlmoConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a checkpoint of ``config`` stores (no tied head)."""
    sd = _meta_model(config).state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: tuple(v.shape) for k, v in sd.items()}


def check_fits(config: FlexOlmoConfig, shapes: Mapping[str, Sequence[int]]) -> None:
    """``ModelSpecError`` when the HF names / shapes do not fit ``config`` (a tied head may be given)."""
    want = hf_shapes(config)
    have = {k: tuple(v) for k, v in shapes.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        raise ModelSpecError(f"state dict does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, s in have.items():
        if s != want[k]:
            raise ModelSpecError(f"tensor {k!r} has shape {s}, the config needs {want[k]}")


def fresh_source(config: FlexOlmoConfig, seed: int) -> LazyTensors:
    """A freshly initialised model as a source: each tensor drawn on access from its own generator
    (seeded by ``seed`` and its name), so a tensor's value depends on neither the others nor the
    world size or ZeRO stage. The distributions of :meth:`FlexOlmoForCausalLM.reset_parameters`:
    normal(0, initializer_range), norms 1, expert biases 0, the padding embedding row 0."""
    shapes = hf_shapes(config)
    std = config.initializer_range

    def value(key: str) -> torch.Tensor:
        shape = shapes[key]
        if key.endswith("norm.weight"):
            return torch.ones(shape)
        if key.endswith("expert_bias"):
            return torch.zeros(shape)
        digest = hashlib.sha256(f"{int(seed)}/{key}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        t = torch.randn(shape, generator=g) * std
        if key == "model.embed_tokens.weight" and config.pad_token_id is not None and 0 <= config.pad_token_id < shape[0]:
            t[config.pad_token_id] = 0
        return t

    return LazyTensors(shapes, value)


def param_value(source: Mapping[str, torch.Tensor], name: str, shape: Sequence[int]) -> torch.Tensor:
    """The value of parameter ``name`` (as in ``named_parameters`` of a possibly parametrized
    model) from the HF ``source``: the tensor itself, or the frozen head / trainable tail rows of a
    split tensor (:func:`split_leading_rows_`). Reads one HF tensor."""
    hf, row = trainable_param_to_hf(name)
    full = source[hf]
    n = tuple(shape)[0] if len(shape) else 0
    v = full if hf == name else (full[:n] if row == 0 else full[full.shape[0] - n:])
    if tuple(v.shape) != tuple(shape):
        raise ModelSpecError(f"tensor {hf!r} has shape {tuple(full.shape)}, parameter {name!r} needs {tuple(shape)}")
    return v


def build_model(config: FlexOlmoConfig, source: Mapping[str, torch.Tensor],
                prepare: Optional[Callable[[nn.Module], object]] = None, *, device="cpu",
                dtype: torch.dtype = torch.float32,
                partition: Optional[Callable[[nn.Parameter], None]] = None) -> FlexOlmoForCausalLM:
    """The model of ``config`` with values from ``source`` (HF names, e.g. a lazy checkpoint),
    materialised one parameter at a time.

    The model is built on the meta device, ``prepare(model)`` runs there (freezing and splitting
    tensors costs no memory), then every parameter is created from ``source`` (one HF tensor
    read at a time, cast to ``dtype``, on ``device``) and handed to ``partition`` (ZeRO-3:
    keep only this rank's slice, see :func:`training.distributed.zero3_partitioner`) before the
    next one: with ``partition`` no rank ever holds more than one full tensor.
    """
    model = _meta_model(config)
    if prepare is not None:
        prepare(model)
    done: dict[int, nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:  # a tied parameter is created once
                name = f"{mod_name}.{pname}" if mod_name else pname
                with torch.no_grad():
                    v = param_value(source, name, p.shape).to(device=device, dtype=dtype).contiguous()
                new = nn.Parameter(v, requires_grad=p.requires_grad)
                if partition is not None:
                    partition(new)
                done[id(p)] = new
            mod._parameters[pname] = done[id(p)]
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left on the meta device: {leftover[:5]}")
    return model


# ---------------------------------------------------------------------------- keys & hashes
def is_moe_key(key: str) -> bool:
    return _MOE_RE.match(key) is not None


def shared_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors every FlexOlmo model built from one public model shares."""
    return sorted(k for k in sd if not is_moe_key(k))


def anchor_sha256(public_sd: Mapping[str, torch.Tensor]) -> str:
    """The anchor hash an owner records: ``tensors_sha256`` of all the public model's tensors."""
    return tensors_sha256(public_sd)


def count_params(config: FlexOlmoConfig) -> dict:
    """Parameter counts: total, active per token (K of E experts), embeddings (input + head)."""
    D, F, L, V, E, K = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                        config.vocab_size, config.num_experts, config.num_experts_per_tok)
    hq, hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attn = D * hq * hd * 2 + D * hkv * hd * 2 + hq * hd + hkv * hd
    norms = 2 * D
    expert = 3 * D * F
    router = E * D + (E if config.expert_bias else 0)
    emb = V * D * (1 if config.tie_word_embeddings else 2)
    total = L * (attn + norms + E * expert + router) + emb + D
    active = L * (attn + norms + K * expert + router) + emb + D
    return {"total": total, "active": active, "embedding": emb, "expert": expert,
            "active_non_embedding": active - emb}


# ---------------------------------------------------------------------------- coupled model
def coupled_source(public_cfg: FlexOlmoConfig, public_sd: Mapping[str, torch.Tensor], name: str,
                   router_embedding_LD: Optional[torch.Tensor] = None, seed: int = 0, bias_init: float = 0.0
                   ) -> tuple[FlexOlmoConfig, LazyTensors]:
    """The 2-expert model of one data owner, built from a dense public model, as a lazy source
    (each tensor computed from the public one on access; ``public_sd`` may itself be lazy).

    Both expert slots are copies of the public FFN; the router in every layer is
    ``[r_public; r_owner]`` with ``r_owner`` = ``router_embedding_LD[i]`` (L, D) or, when None, a
    normal(0, initializer_range) draw from ``seed``; the expert bias is ``[0, bias_init]``
    (FlexOlmo's negative bias starts below zero: it is applied as ``min(b, 0)``, so a bias at or
    above 0 gets no gradient); top-2 of 2.
    """
    if public_cfg.num_experts != 1:
        raise ModelSpecError(f"--public must be a dense model (num_experts=1), got num_experts={public_cfg.num_experts}")
    if not name or name == "public":
        raise ModelSpecError(f"--name must be a non-empty name other than 'public', got {name!r}")
    L, D = public_cfg.num_hidden_layers, public_cfg.hidden_size
    if router_embedding_LD is not None:
        shape = tuple(router_embedding_LD.shape)
        if shape not in ((D,), (L, D)):
            raise ModelSpecError(f"--router-init has shape {shape}, the public model needs ({D},) or ({L}, {D})")
        if router_embedding_LD.ndim == 1:
            router_embedding_LD = router_embedding_LD[None].expand(L, -1)
    else:
        g = torch.Generator().manual_seed(int(seed))
        router_embedding_LD = torch.randn(L, D, generator=g) * public_cfg.initializer_range
    cfg = public_cfg.copy(num_experts=2, num_experts_per_tok=2, expert_bias=True, expert_names=["public", name],
                          norm_topk_prob=False, extra=dict(public_cfg.extra))
    bias_keys = [f"model.layers.{i}.mlp.gate.expert_bias" for i in range(L)]

    def value(k: str) -> torch.Tensor:
        m = _MOE_RE.match(k)
        if m is None:
            return public_sd[k].clone()
        i, field = int(m.group(1)), m.group(2)
        if field == "gate.expert_bias":
            return torch.tensor([0.0, float(bias_init)], dtype=public_sd[f"model.layers.{i}.mlp.gate.weight"].dtype)
        v = public_sd[k]
        if field == "gate.weight":
            return torch.cat([v[:1], router_embedding_LD[i].to(v.dtype)[None]], 0)
        return torch.cat([v[:1], v[:1]], 0)

    keys = [k for k in public_sd if not k.endswith("mlp.gate.expert_bias")] + bias_keys
    return cfg, LazyTensors(keys, value)


def coupled_state_dict(public_cfg: FlexOlmoConfig, public_sd: Mapping[str, torch.Tensor], name: str,
                       router_embedding_LD: Optional[torch.Tensor] = None, seed: int = 0
                       ) -> tuple[FlexOlmoConfig, dict]:
    """:func:`coupled_source` as a dict (every tensor computed)."""
    cfg, src = coupled_source(public_cfg, public_sd, name, router_embedding_LD, seed)
    return cfg, {k: src[k] for k in src}


class _FrozenHead(nn.Module):
    """Parametrization ``tail -> cat([head, tail], 0)`` with a frozen ``head`` parameter."""

    def __init__(self, head: torch.Tensor):
        super().__init__()
        self.head = nn.Parameter(head.detach().clone(), requires_grad=False)

    def forward(self, tail: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.head.to(tail.dtype), tail], 0)

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.head.shape[0]:].detach().clone()


def split_leading_rows_(module: nn.Module, attr: str, n_frozen: int) -> None:
    """Make ``module.attr`` = cat(frozen first ``n_frozen`` rows, trainable rest)."""
    full = getattr(module, attr)
    parametrize.register_parametrization(module, attr, _FrozenHead(full.detach()[:n_frozen]), unsafe=True)
    getattr(module.parametrizations, attr).original.requires_grad_(True)


def freeze_all_but(model: nn.Module, trainable: Iterable[str]) -> None:
    """requires_grad=False for every parameter whose name is not in ``trainable``."""
    keep = set(trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


def freeze_for_expert_training(model: FlexOlmoForCausalLM) -> list[str]:
    """FlexOlmo's coupled training: only the owner's expert FFN, router row and bias train.

    Frozen: embeddings, attention incl. q/k norms, all norms, LM head (requires_grad False), and
    the public expert's rows of the stacked MoE tensors (its FFN, ``r_public``, ``b_public`` = 0):
    those tensors are parametrized as ``cat(frozen head, trainable tail)``, so the public rows get
    no gradient and no optimizer state. The public expert is also marked untrainable in every
    :class:`FlexMoE` (no dW GEMMs for it). Returns the trainable parameter names.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for moe in model.moe_layers():
        for mod, attr in ((moe.gate, "weight"), (moe.gate, "expert_bias"), (moe.experts, "gate_up_proj"),
                          (moe.experts, "down_proj")):
            if getattr(mod, attr, None) is not None:
                split_leading_rows_(mod, attr, 1)
        moe.set_trainable_experts([1])
    return [n for n, p in model.named_parameters() if p.requires_grad]


def freeze_for_router_tuning(model: FlexOlmoForCausalLM) -> list[str]:
    """Router tuning: every router row and the non-public biases train; no expert FFN (no dW)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for moe in model.moe_layers():
        moe.gate.weight.requires_grad_(True)
        if moe.gate.expert_bias is not None:
            split_leading_rows_(moe.gate, "expert_bias", 1)
        moe.set_trainable_experts(torch.zeros(moe.num_experts, dtype=torch.bool))
    return [n for n, p in model.named_parameters() if p.requires_grad]


_PARAM_RE = re.compile(r"^(.*)\.parametrizations\.([^.]+)\.(original|0\.head)$")


def trainable_param_to_hf(name: str) -> tuple[str, int]:
    """(HF key, first row) that parameter ``name`` of a (possibly parametrized) model covers."""
    m = _PARAM_RE.match(name)
    if m is None:
        return name, 0
    if m.group(3) == "original":
        return f"{m.group(1)}.{m.group(2)}", -1  # -1: rows after the frozen head
    return f"{m.group(1)}.{m.group(2)}", 0


def export_items(model: nn.Module, values: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF key, tensor)`` from per-parameter ``(name, value)`` pairs (names as in
    ``named_parameters``), in their order, one at a time: a split tensor becomes
    ``cat(head, original)`` under its HF key once both parts were seen; the tied LM head is
    left out (as Hugging Face stores it). Values are passed on as given (callers pick dtype)."""
    cfg = getattr(model, "config", None)
    tied = cfg is not None and cfg.tie_word_embeddings
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, v in values:
        m = _PARAM_RE.match(name)
        if m is None:
            if not (tied and name == "lm_head.weight"):
                yield name, v
            continue
        key = f"{m.group(1)}.{m.group(2)}"
        got = parts.setdefault(key, {})
        got["tail" if m.group(3) == "original" else "head"] = v
        if len(got) == 2:
            del parts[key]
            yield key, torch.cat([got["head"].to(got["tail"].dtype), got["tail"]], 0)
    if parts:
        raise ModelSpecError(f"split tensors with a missing part: {sorted(parts)}")


def export_state_dict(model: nn.Module, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Assemble the HF state dict from per-parameter ``values`` (name as in ``named_parameters``):
    :func:`export_items` as a dict."""
    return dict(export_items(model, values.items()))


# ---------------------------------------------------------------------------- owners & merge
def _arch_diff(a: FlexOlmoConfig, b: FlexOlmoConfig) -> list[str]:
    return [f"{f}: {getattr(a, f)} vs {getattr(b, f)}" for f in ARCH_FIELDS if getattr(a, f) != getattr(b, f)]


def check_owner_against_public(public_cfg: FlexOlmoConfig, public_sd: Mapping[str, torch.Tensor],
                               owner_cfg: FlexOlmoConfig, owner_sd: Mapping[str, torch.Tensor],
                               owner: str, public_hash: Optional[str] = None) -> str:
    """Check that an owner's coupled checkpoint was trained on this public model; return its name.

    Refuses (``FrozenTensorMismatch`` naming the tensor) when a shared tensor or the public expert's
    rows (FFN, router row, bias 0) differ from the public model's bit for bit, or when the owner
    recorded another anchor hash; ``ModelSpecError`` for a wrong shape of model.
    """
    diff = _arch_diff(public_cfg, owner_cfg)
    if diff:
        raise ModelSpecError(f"owner {owner!r} has another architecture than the public model: {'; '.join(diff)}")
    if owner_cfg.num_experts != 2 or owner_cfg.expert_names[0] != "public":
        raise ModelSpecError(f"owner {owner!r} is not a coupled 2-expert checkpoint (experts {owner_cfg.expert_names})")
    name = owner_cfg.expert_names[1]
    recorded = owner_cfg.extra.get("anchor_sha256")
    public_hash = public_hash or anchor_sha256(public_sd)
    if recorded != public_hash:
        raise FrozenTensorMismatch(
            f"owner {owner!r} (expert {name!r}) was trained from anchor {recorded}, but the public model's "
            f"tensors hash to {public_hash}: it was trained from another public model"
        )
    for k in shared_keys(public_sd):
        a, b = public_sd[k], owner_sd.get(k)
        if b is None:
            raise FrozenTensorMismatch(f"owner {owner!r}: tensor {k!r} is missing")
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            raise FrozenTensorMismatch(f"owner {owner!r}: frozen tensor {k!r} differs from the public model's")
    for i in range(public_cfg.num_hidden_layers):
        for field in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            k = f"model.layers.{i}.mlp.{field}"
            a, b = public_sd[k][:1], owner_sd[k][:1]
            if a.dtype != b.dtype or not torch.equal(a, b):
                raise FrozenTensorMismatch(f"owner {owner!r}: frozen tensor {k!r}[0] (public expert) differs "
                                           "from the public model's")
        kb = f"model.layers.{i}.mlp.gate.expert_bias"
        if kb in owner_sd and float(owner_sd[kb][0]) != 0.0:
            raise FrozenTensorMismatch(f"owner {owner!r}: {kb!r}[0] (public expert bias) is {float(owner_sd[kb][0])}, not 0")
    return name


def merge_state_dicts(public_cfg: FlexOlmoConfig, public_sd: Mapping[str, torch.Tensor],
                      owners: Sequence[tuple[str, FlexOlmoConfig, Mapping[str, torch.Tensor]]],
                      top_k: int = 2) -> tuple[FlexOlmoConfig, dict]:
    """Merge a public model and N coupled owners into one (N+1)-expert model (expert 0 "public").

    ``owners`` is a list of (label for errors, config, state dict). Each is checked with
    :func:`check_owner_against_public` first. The merged router row / bias / FFN of expert j
    are owner j's expert-1 tensors; shared tensors and expert 0 are the public model's.

    The public model may itself be a FlexOlmo MoE (E0 > 1 experts, expert 0 the public one: a
    released FlexOlmo checkpoint or an earlier merge): owners are then checked against its public
    expert and shared tensors (:func:`flexmoe_kernels.models.olmo2.public_view`), and the result
    keeps its E0 experts (rows, names, biases; bias 0 where it has none) and appends the owners.
    """
    from flexmoe_kernels.models.olmo2 import public_view

    if not owners:
        raise ModelSpecError("merge needs at least one --owner")
    view_cfg, view_sd = public_view(public_cfg, public_sd)
    h = anchor_sha256(view_sd)
    E0 = public_cfg.num_experts
    names = list(public_cfg.expert_names) if E0 > 1 else ["public"]
    for label, cfg, sd in owners:
        name = check_owner_against_public(view_cfg, view_sd, cfg, sd, label, public_hash=h)
        if name in names:
            raise ModelSpecError(f"owner {label!r}: expert name {name!r} is used twice (experts so far: {names}); "
                                 "owners need distinct --name")
        names.append(name)
    E = len(names)
    if not 1 <= top_k <= E:
        raise ModelSpecError(f"--top-k must be in [1, {E}], got {top_k}")
    out = {k: public_sd[k] for k in shared_keys(public_sd)}
    for i in range(public_cfg.num_hidden_layers):
        for field in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            k = f"model.layers.{i}.mlp.{field}"
            base = public_sd[k]
            out[k] = torch.cat([base] + [sd[k][1:2].to(base.dtype) for _, _, sd in owners], 0)
        kb = f"model.layers.{i}.mlp.gate.expert_bias"
        dt = public_sd[f"model.layers.{i}.mlp.gate.weight"].dtype
        base_bias = public_sd[kb].to(dt) if kb in public_sd else torch.zeros(E0, dtype=dt)
        out[kb] = torch.cat([base_bias] + [sd[kb][1:2].to(dt) for _, _, sd in owners], 0)
    extra = {k: v for k, v in public_cfg.extra.items() if k not in ("anchor_sha256", "expert_name")}
    merged_from = list(extra.get("merged_from", [])) if E0 > 1 else []
    extra.update({"anchor_sha256": h, "merged_from": merged_from + [label for label, _, _ in owners]})
    cfg = public_cfg.copy(num_experts=E, num_experts_per_tok=top_k, expert_bias=True, expert_names=names, extra=extra)
    return cfg, out
