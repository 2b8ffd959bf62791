"""OLMo-core FlexOlmo checkpoints <-> our Hugging Face layout: the key and layout mapping, in one place.

The official FlexOlmo code trains on OLMo-core (``ai2-olmo-core``): a ``TransformerConfig`` with
``moe_reordered_norm`` blocks (post-norm, QK-norm over the whole projection) and, for the
owners' experts, FlexOlmo's router ``MoELinearRouterWithExpertBias`` whose learned
``expert_bias`` (E-1, 1) adds ``min(b, 0)`` to the logits of experts 1..E-1 before the softmax.
OLMo-core's own HF export maps only ``router.weight`` and drops that bias; this module keeps it.
Nothing here needs ``olmo_core``: a checkpoint is a state dict (unsharded ``model.pt`` read with
``torch.load(weights_only=True)`` or ``model.safetensors``, or a torch distributed checkpoint
(DCP) directory whose tensors are stored under ``model.`` as OLMo-core's
``save_model_and_optim_state`` writes them; its ``.metadata`` pickle is read through an
allow-list that also maps OLMo-core's own ``_StorageInfo`` class to torch's). Files are untrusted:
a DCP's storage entries must stay inside its directory and fit their files, and the zip CRCs that
``torch.load`` skips are checked (``model.pt`` and each DCP tensor slice), so a damaged file is
named rather than read silently (:func:`read_olmo_core`, in
:mod:`flexmoe_kernels.models.olmo_core_files` with the other file handling).

Legend: L layers (i), E experts, D hidden, F expert width, V vocabulary, H / Hkv query / key-value
heads of width hd. Left: OLMo-core; right: ours (:mod:`flexmoe_kernels.models.checkpoint`).

==========================================================  ===========  ==========================================================  ============  ================================
OLMo-core key                                               shape        our key                                                     shape         transform
==========================================================  ===========  ==========================================================  ============  ================================
``embeddings.weight``                                       (V, D)       ``model.embed_tokens.weight``                               (V, D)        same
``blocks.{i}.attention.w_q.weight``                         (H*hd, D)    ``model.layers.{i}.self_attn.q_proj.weight``                (H*hd, D)     same
``blocks.{i}.attention.w_k.weight`` / ``w_v.weight``        (Hkv*hd, D)  ``...self_attn.k_proj.weight`` / ``v_proj.weight``          (Hkv*hd, D)   same
``blocks.{i}.attention.w_out.weight``                       (D, H*hd)    ``...self_attn.o_proj.weight``                              (D, H*hd)     same
``blocks.{i}.attention.q_norm.weight`` / ``k_norm.weight``  (H*hd,) ...  ``...self_attn.q_norm.weight`` / ``k_norm.weight``          (H*hd,) ...   same
``blocks.{i}.attention_norm.weight``                        (D,)         ``...post_attention_layernorm.weight``                      (D,)          same
``blocks.{i}.feed_forward_norm.weight``                     (D,)         ``...post_feedforward_layernorm.weight``                    (D,)          same
``blocks.{i}.feed_forward_moe.router.weight``               (E*D,)       ``...mlp.gate.weight``                                      (E, D)        ``view(E, D)``
``blocks.{i}.feed_forward_moe.router.expert_bias``          (E-1, 1)     ``...mlp.gate.expert_bias``                                 (E,)          ``cat([0], b[:, 0])``
``blocks.{i}.feed_forward_moe.experts.mlp.w1`` (mlp)        (E*D, F)     ``...mlp.experts.gate_up_proj[:, :F]``                      (E, F, D)     ``view(E, D, F).transpose(1, 2)``
``blocks.{i}.feed_forward_moe.experts.mlp.w3`` (mlp)        (E*D, F)     ``...mlp.experts.gate_up_proj[:, F:]``                      (E, F, D)     ``view(E, D, F).transpose(1, 2)``
``blocks.{i}.feed_forward_moe.experts.mlp.w1`` / ``w3``     (E*F, D)     ``...gate_up_proj[:, :F]`` / ``[:, F:]`` (dropless)         (E, F, D)     ``view(E, F, D)``
``blocks.{i}.feed_forward_moe.experts.mlp.w2`` (both)       (E*F, D)     ``...mlp.experts.down_proj``                                (E, D, F)     ``view(E, F, D).transpose(1, 2)``
``lm_head.norm.weight``                                     (D,)         ``model.norm.weight``                                       (D,)          same
``lm_head.w_out.weight`` (= embeddings when tied)           (V, D)       ``lm_head.weight`` (not stored when tied)                   (V, D)        same
==========================================================  ===========  ==========================================================  ============  ================================

Expert layouts: ``mlp`` is OLMo-core's ``MoEMLP`` (``MoEType.default``, what FlexOlmo's
``olmoe_nx7b`` configs use; OLMo-core's HF converter assumes it), ``dropless`` its
``DroplessMoEMLP`` (``MoEType.dropless``). Reading, ``auto`` tells them apart by the shape of
``w1``; when D == F both fit and the layout must be named. OLMo-core has no bias for the public
expert 0: our ``expert_bias[0]`` must be 0 to go to OLMo-core (the training recipe keeps it 0).
Every transform is a view, a transpose or a concatenation, so both directions are exact and the
round trips ours -> OLMo-core -> ours and OLMo-core -> ours -> OLMo-core are bit-identical.
Keys we do not know (a shared expert, the DeepSeek-style ``router.score_bias``, a dense
``feed_forward``) are refused by name. A tied OLMo-core model stores both ``embeddings.weight``
and ``lm_head.w_out.weight``; a head equal to the embedding is read as tied when the config says so.

The config is not in the state dict: :func:`config_from_olmo_core` builds ours from the tensor
shapes plus OLMo-core's trainer ``config.json`` (its ``model`` section: heads, RoPE theta, norm
eps, top-k) or ours (``flexmoe_config.json``, written beside every OLMo-core checkpoint we write).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .config import CheckpointError, FlexOlmoConfig
from .olmo_core_files import read_olmo_core, write_olmo_core  # noqa: F401  (the files; re-exported)

__all__ = ["EXPERT_LAYOUTS", "OUR_CONFIG_FILE", "OlmoCoreDims", "olmo_core_to_hf", "hf_to_olmo_core",
           "config_from_olmo_core", "olmo_core_model_config", "read_olmo_core", "write_olmo_core"]

EXPERT_LAYOUTS = ("mlp", "dropless")
OUR_CONFIG_FILE = "flexmoe_config.json"
_SAME = {  # one-to-one keys, OLMo-core -> ours; {i} is the layer
    "embeddings.weight": "model.embed_tokens.weight",
    "lm_head.norm.weight": "model.norm.weight",
    "lm_head.w_out.weight": "lm_head.weight",
    "blocks.{i}.attention.w_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attention.w_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attention.w_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attention.w_out.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blocks.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blocks.{i}.attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.feed_forward_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
_MOE = "blocks.{i}.feed_forward_moe."
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class OlmoCoreDims:
    """The sizes a state dict fixes: L, V, D, F, E, q / kv projection widths, bias, layout; ``tied``:
    no LM head stored; ``head_is_embedding``: a stored head equal to the embedding (OLMo-core stores
    both keys of a tied model; the config decides whether it is tied)."""

    num_layers: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_experts: int
    q_width: int
    kv_width: int
    tied: bool
    head_is_embedding: bool
    expert_bias: bool
    layout: str


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{what}: missing tensor {key!r}")
    return sd[key]


def _shape(t: torch.Tensor, want: tuple, key: str, what: str) -> None:
    if tuple(t.shape) != tuple(want):
        raise CheckpointError(f"{what}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(want)}")


def _rank(t: torch.Tensor, n: int, key: str, what: str, dims: str) -> torch.Tensor:
    if t.dim() != n:
        raise CheckpointError(f"{what}: tensor {key!r} has shape {tuple(t.shape)}, expected a {n}-D {dims} tensor")
    return t


def _floating(sd: Mapping[str, torch.Tensor], what: str) -> None:
    """``CheckpointError`` naming the first tensor of ``sd`` that is not floating-point, and its dtype."""
    nonfloat = [(k, v.dtype) for k, v in sd.items() if not v.is_floating_point()]
    if nonfloat:
        k, dt = nonfloat[0]
        more = f" (+{len(nonfloat) - 1} more)" if len(nonfloat) > 1 else ""
        raise CheckpointError(f"{what}: tensor {k!r} has dtype {dt}{more}; model weights must be floating-point")


def _dims(sd: Mapping[str, torch.Tensor], layout: str, what: str) -> OlmoCoreDims:
    """Sizes from layer 0 and the embedding; ``layout`` 'auto' resolved from ``w1``'s shape."""
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))})
    if not layers:
        raise CheckpointError(f"{what}: no 'blocks.{{i}}.' tensors (not an OLMo-core transformer state dict; "
                              f"first keys: {sorted(sd)[:5]})")
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{what}: block indices are not 0..{len(layers) - 1}: {layers[:10]}")
    V, D = _rank(_need(sd, "embeddings.weight", what), 2, "embeddings.weight", what, "(vocab, hidden)").shape
    if V < 1 or D < 1:
        raise CheckpointError(f"{what}: tensor 'embeddings.weight' has shape {(V, D)}, an empty (vocab, hidden)")
    p = _MOE.format(i=0)
    if f"{p}router.weight" not in sd:
        raise CheckpointError(f"{what}: missing tensor {p + 'router.weight'!r} (only FlexOlmo / MoE checkpoints "
                              "are supported, not dense ones)")
    E, rem = divmod(sd[f"{p}router.weight"].numel(), D)
    w1, w2 = _need(sd, f"{p}experts.mlp.w1", what), _need(sd, f"{p}experts.mlp.w2", what)
    if rem or E < 1 or w2.dim() != 2 or w2.shape[0] % E:
        raise CheckpointError(f"{what}: {p}router.weight {tuple(sd[p + 'router.weight'].shape)} and "
                              f"{p}experts.mlp.w2 {tuple(w2.shape)} do not fit hidden size {D}")
    F = w2.shape[0] // E
    fits = {"mlp": (E * D, F), "dropless": (E * F, D)}
    if layout == "auto":
        match = [name for name, shp in fits.items() if tuple(w1.shape) == shp]
        if len(match) != 1:
            raise CheckpointError(f"{what}: cannot tell the expert layout from {p}experts.mlp.w1 {tuple(w1.shape)} "
                                  f"(D={D}, F={F}, E={E}): name it (mlp = MoEMLP (E*D, F), dropless = "
                                  "DroplessMoEMLP (E*F, D))")
        layout = match[0]
    elif layout not in fits:
        raise ValueError(f"expert layout must be one of {('auto',) + EXPERT_LAYOUTS}, got {layout!r}")
    q, kv = (_rank(_need(sd, k, what), 2, k, what, "(out, hidden)")
             for k in ("blocks.0.attention.w_q.weight", "blocks.0.attention.w_k.weight"))
    return OlmoCoreDims(
        num_layers=len(layers), vocab_size=V, hidden_size=D, intermediate_size=F, num_experts=E,
        q_width=q.shape[0], kv_width=kv.shape[0],
        tied="lm_head.w_out.weight" not in sd,
        head_is_embedding="lm_head.w_out.weight" in sd and torch.equal(sd["lm_head.w_out.weight"], sd["embeddings.weight"]),
        expert_bias=f"{p}router.expert_bias" in sd, layout=layout)


def olmo_core_to_hf(sd: Mapping[str, torch.Tensor], *, expert_layout: str = "auto",
                    what: str = "OLMo-core state dict") -> tuple[dict[str, torch.Tensor], OlmoCoreDims]:
    """Our HF state dict (fused experts, ``gate.expert_bias`` kept) from an OLMo-core one.

    ``sd``: OLMo-core model keys (module docstring), tensors as stored (dtype kept).
    ``expert_layout``: 'auto', 'mlp' or 'dropless'. Returns (state dict, sizes). Raises
    :class:`CheckpointError` naming ``what`` and the key for a missing, unknown or mis-shaped tensor.
    """
    dims = _dims(sd, expert_layout, what)
    _floating(sd, what)
    L, E, D, F = dims.num_layers, dims.num_experts, dims.hidden_size, dims.intermediate_size
    out: dict[str, torch.Tensor] = {}
    used = set()
    for src, dst in _SAME.items():
        for i in (range(L) if "{i}" in src else [None]):
            k = src.format(i=i)
            if k == "lm_head.w_out.weight" and dims.tied:
                continue
            out[dst.format(i=i)] = _need(sd, k, what)
            used.add(k)
    for i in range(L):
        p, q = _MOE.format(i=i), f"model.layers.{i}.mlp."
        r = _need(sd, p + "router.weight", what)
        _shape(r, (E * D,), p + "router.weight", what)
        out[q + "gate.weight"] = r.view(E, D)
        w1, w2, w3 = (_need(sd, f"{p}experts.mlp.{w}", what) for w in ("w1", "w2", "w3"))
        _shape(w2, (E * F, D), p + "experts.mlp.w2", what)
        for w, t in (("w1", w1), ("w3", w3)):
            _shape(t, (E * D, F) if dims.layout == "mlp" else (E * F, D), f"{p}experts.mlp.{w}", what)
        if dims.layout == "mlp":
            g, u = (t.view(E, D, F).transpose(1, 2) for t in (w1, w3))
        else:
            g, u = (t.view(E, F, D) for t in (w1, w3))
        out[q + "experts.gate_up_proj"] = torch.cat([g, u], 1).contiguous()
        out[q + "experts.down_proj"] = w2.view(E, F, D).transpose(1, 2).contiguous()
        used.update([p + "router.weight"] + [f"{p}experts.mlp.{w}" for w in ("w1", "w2", "w3")])
        if dims.expert_bias:
            b = _need(sd, p + "router.expert_bias", what)
            _shape(b, (E - 1, 1), p + "router.expert_bias", what)
            out[q + "gate.expert_bias"] = torch.cat([b.new_zeros(1), b[:, 0]])
            used.add(p + "router.expert_bias")
    unknown = sorted(set(sd) - used)
    if unknown:
        raise CheckpointError(f"{what}: unknown tensors (no FlexOlmo equivalent): {unknown[:8]}"
                              f"{f' (+{len(unknown) - 8} more)' if len(unknown) > 8 else ''}")
    return out, dims


def hf_to_olmo_core(sd: Mapping[str, torch.Tensor], config: FlexOlmoConfig, *, expert_layout: str = "mlp",
                    what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """OLMo-core model keys from our HF state dict ``sd`` (fused experts) for ``config``.

    ``expert_layout``: 'mlp' (MoEMLP, FlexOlmo's) or 'dropless'. The bias becomes FlexOlmo's
    ``router.expert_bias`` (E-1, 1) when ``config.expert_bias``. Raises :class:`CheckpointError`
    naming ``what`` and the key when a tensor is missing, unknown or mis-shaped, or when
    ``expert_bias[0]`` (the public expert's, which OLMo-core cannot store) is not 0.
    """
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    _floating(sd, what)
    L, E, D, F = config.num_hidden_layers, config.num_experts, config.hidden_size, config.intermediate_size
    back = {v: k for k, v in _SAME.items()}
    out: dict[str, torch.Tensor] = {}
    used = set()
    for dst, src in back.items():
        for i in (range(L) if "{i}" in src else [None]):
            k = dst.format(i=i)
            if k == "lm_head.weight" and config.tie_word_embeddings:
                k = "model.embed_tokens.weight"  # OLMo-core's tied model stores both keys
            out[src.format(i=i)] = _need(sd, k, what)
            used.add(k)
    for i in range(L):
        p, q = _MOE.format(i=i), f"model.layers.{i}.mlp."
        gate, gu, down = (_need(sd, q + k, what) for k in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"))
        _shape(gate, (E, D), q + "gate.weight", what)
        _shape(gu, (E, 2 * F, D), q + "experts.gate_up_proj", what)
        _shape(down, (E, D, F), q + "experts.down_proj", what)
        out[p + "router.weight"] = gate.reshape(E * D)
        g, u = gu[:, :F], gu[:, F:]
        if expert_layout == "mlp":
            w1, w3 = (t.transpose(1, 2).reshape(E * D, F) for t in (g, u))
        else:
            w1, w3 = (t.reshape(E * F, D) for t in (g, u))
        out[p + "experts.mlp.w1"], out[p + "experts.mlp.w3"] = w1.contiguous(), w3.contiguous()
        out[p + "experts.mlp.w2"] = down.transpose(1, 2).reshape(E * F, D).contiguous()
        used.update(q + k for k in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"))
        if config.expert_bias:
            b = _need(sd, q + "gate.expert_bias", what)
            _shape(b, (E,), q + "gate.expert_bias", what)
            if float(b[0]) != 0.0:
                raise CheckpointError(f"{what}: {q}gate.expert_bias[0] (the public expert's) is {float(b[0])}; "
                                      "OLMo-core's FlexOlmo router has no bias for expert 0, so it must be 0")
            out[p + "router.expert_bias"] = b[1:].reshape(E - 1, 1).clone()
            used.add(q + "gate.expert_bias")
    unknown = sorted(set(sd) - used - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if unknown:
        raise CheckpointError(f"{what}: unknown tensors for this config: {unknown[:8]}")
    return out


def olmo_core_model_config(trainer_config: Mapping[str, Any], what: str = "OLMo-core config.json") -> dict[str, Any]:
    """Our config fields found in OLMo-core's ``config.json`` (the trainer's, with a ``model``
    section, or a bare ``TransformerConfig`` dict): heads, kv heads, RoPE theta, norm eps, top-k
    and tied embeddings (the sizes come from the tensors). Absent fields are left out (older OLMo-core names the attention ``attention``,
    newer ``sequence_mixer``). :class:`CheckpointError` naming ``what``, the field and its value
    when a section is not a JSON object or a field has the wrong type (counts: positive ints;
    theta, eps: positive numbers; tie_word_embeddings: a bool)."""
    def bad(where: str, value: Any, want: str) -> CheckpointError:
        shown = repr(value)
        return CheckpointError(f"{what}: {where} is {shown if len(shown) <= 60 else shown[:57] + '...'}, "
                               f"expected {want}")

    def section(d: Mapping, key: str, where: str) -> Mapping:
        v = d.get(key)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise bad(where + key, v, "a JSON object")
        return v

    if not isinstance(trainer_config, Mapping):
        raise bad("the file", trainer_config, "a JSON object")
    m, top = (section(trainer_config, "model", ""), "model.") if "model" in trainer_config else (trainer_config, "")
    block = section(m, "block", top)
    mixer = "sequence_mixer" if block.get("sequence_mixer") else "attention"
    attn = section(block, mixer, f"{top}block.")
    a, b = f"{top}block.{mixer}.", f"{top}block."
    fields = {  # ours: (where in their file, value, kind)
        "num_attention_heads": (a + "n_heads", attn.get("n_heads"), "count"),
        "num_key_value_heads": (a + "n_kv_heads", attn.get("n_kv_heads"), "count"),
        "rope_theta": (a + "rope.theta", section(attn, "rope", a).get("theta"), "positive"),
        "rms_norm_eps": (b + "layer_norm.eps", section(block, "layer_norm", b).get("eps"), "positive"),
        "num_experts_per_tok": (b + "feed_forward_moe.router.top_k", section(
            section(block, "feed_forward_moe", b), "router", b + "feed_forward_moe.").get("top_k"), "count"),
        "tie_word_embeddings": (top + "tie_word_embeddings", m.get("tie_word_embeddings"), "bool"),
    }
    found = {}
    for ours, (where, v, kind) in fields.items():
        if v is None:
            continue
        if kind == "bool" and not isinstance(v, bool):
            raise bad(where, v, "true or false")
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if kind == "count" and not (number and float(v).is_integer() and v >= 1):
            raise bad(where, v, "a positive integer")
        if kind == "positive" and not (number and 0 < v < float("inf")):
            raise bad(where, v, "a positive number")
        found[ours] = int(v) if kind == "count" else v
    return found


def config_from_olmo_core(dims: OlmoCoreDims, base: Optional[FlexOlmoConfig] = None,
                          olmo_core_fields: Optional[Mapping[str, Any]] = None, *,
                          what: str = "OLMo-core checkpoint") -> FlexOlmoConfig:
    """Our config: ``base`` (or defaults) updated with ``olmo_core_fields`` and the sizes ``dims``.

    Raises :class:`CheckpointError` naming ``what`` when no head count is known or the q / kv
    projection widths do not fit the heads.
    """
    d = base.to_dict() if base is not None else {}
    over = dict(olmo_core_fields or {})
    heads = over.get("num_attention_heads") or d.get("num_attention_heads")
    if not heads:
        raise CheckpointError(f"{what}: the number of attention heads is not in the checkpoint; give a config "
                              f"(ours, or OLMo-core's config.json beside the checkpoint)")
    head_dim = d.get("head_dim") if "num_attention_heads" not in over else None
    head_dim = head_dim or dims.hidden_size // heads
    if heads * head_dim != dims.q_width or dims.kv_width % head_dim:
        raise CheckpointError(f"{what}: q / k projections of width {dims.q_width} / {dims.kv_width} do not fit "
                              f"{heads} heads of width {head_dim}")
    if base is None or base.num_experts != dims.num_experts:
        d.pop("expert_names", None)
    over.update(num_attention_heads=heads, vocab_size=dims.vocab_size, hidden_size=dims.hidden_size,
                intermediate_size=dims.intermediate_size, num_hidden_layers=dims.num_layers,
                num_experts=dims.num_experts, head_dim=head_dim, num_key_value_heads=dims.kv_width // head_dim,
                tie_word_embeddings=dims.tied or (dims.head_is_embedding and bool(
                    over.get("tie_word_embeddings", d.get("tie_word_embeddings")))), expert_bias=dims.expert_bias)
    over["num_experts_per_tok"] = min(over.get("num_experts_per_tok", d.get("num_experts_per_tok", dims.num_experts)),
                                      dims.num_experts)
    return FlexOlmoConfig.from_dict(d, **over)


# ---------------------------------------------------------------------------- files
