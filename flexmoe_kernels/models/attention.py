"""Attention pieces of FlexOlmo: RMSNorm, RoPE, a KV cache and QK-normed GQA attention.

Legend: B batch, S new positions, L_k key positions (past + new), H query heads,
G key/value heads, Dh head dim, D hidden.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` or, when the
``flash_attn`` package is importable and the tensors are CUDA fp16/bf16, through
``flash_attn.flash_attn_func`` (imported lazily; never required). Padding masks always use SDPA.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .config import FlexOlmoConfig

__all__ = ["RMSNorm", "RotaryEmbedding", "KVCache", "FlexOlmoAttention", "flash_attn_status", "apply_rotary"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: ``(w * (x * rsqrt(mean(x^2) + eps)))`` computed in float32, cast back."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(in_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Default RoPE (rotate-half convention, as Hugging Face): cos/sin (B, S, Dh) for positions (B, S)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # float32 always; kept outside the buffers so model.to(bfloat16) cannot round it.
        self._inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        self._cache: dict = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = self._inv_freq.to(device)
        return self._cache[key]

    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids_BS[..., None].float() * self.inv_freq(position_ids_BS.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(x_BHSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, S, Dh) by cos/sin (B, S, Dh)."""
    cos, sin = cos_BSD[:, None], sin_BSD[:, None]
    return x_BHSD * cos + _rotate_half(x_BHSD) * sin


class KVCache:
    """Per-layer key/value cache: a list of ``(k, v)`` of shape (B, G, L_past, Dh), post-RoPE.

    ``update(layer, k_new, v_new)`` appends and returns the full ``(k, v)``. All layers of one
    forward see the same past length (``get_seq_length()``, read before the forward).
    """

    def __init__(self, num_layers: int):
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers

    def get_seq_length(self) -> int:
        kv = self.layers[0]
        return 0 if kv is None else kv[0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old = self.layers[layer_idx]
        if old is not None:
            k = torch.cat([old[0], k], dim=2)
            v = torch.cat([old[1], v], dim=2)
        self.layers[layer_idx] = (k, v)
        return k, v

    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep/reorder batch rows (e.g. drop finished sequences)."""
        self.layers = [None if kv is None else (kv[0][index_B], kv[1][index_B]) for kv in self.layers]

    def __len__(self) -> int:
        return len(self.layers)


@functools.lru_cache(maxsize=1)
def _import_flash_attn():
    try:
        from flash_attn import flash_attn_func  # noqa: PLC0415 (optional dependency)
    except Exception as exc:  # ImportError, or a broken build raising at import
        return None, f"flash_attn is not importable: {exc}"
    return flash_attn_func, "available"


def flash_attn_status(q: Optional[torch.Tensor] = None) -> tuple[bool, str]:
    """(usable, reason): flash-attn importable and, when ``q`` is given, q is CUDA fp16/bf16."""
    fn, why = _import_flash_attn()
    if fn is None:
        return False, why
    if q is not None and (not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16)):
        return False, f"flash_attn needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}"
    return True, "available"


def _sdpa_mask(
    key_valid_BL: Optional[torch.Tensor], S: int, past: int, device: torch.device
) -> torch.Tensor:
    """(B or 1, 1, S, L_k) bool: causal with ``past`` earlier keys, AND key validity.

    Each query may always see its own position, so rows of padding queries are never empty
    (their outputs are finite garbage that later positions never attend to).
    """
    L = past + S
    q_pos = torch.arange(S, device=device)[:, None] + past
    k_pos = torch.arange(L, device=device)[None, :]
    allowed_SL = k_pos <= q_pos
    if key_valid_BL is None:
        return allowed_SL[None, None]
    m = allowed_SL[None] & key_valid_BL[:, None, :]
    m = m | (k_pos == q_pos)[None]
    return m[:, None]


class FlexOlmoAttention(nn.Module):
    """QK-normed GQA self-attention: RMSNorm over the whole q and k projections, then RoPE.

    Parameter names match Hugging Face (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
    ``q_norm`` (H*Dh), ``k_norm`` (G*Dh)); no biases.
    """

    def __init__(self, config: FlexOlmoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.attn_implementation = config.attn_implementation
        D, H, G, Dh = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, G * Dh, bias=False)
        self.v_proj = nn.Linear(D, G * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.q_norm = RMSNorm(H * Dh, config.rms_norm_eps)
        self.k_norm = RMSNorm(G * Dh, config.rms_norm_eps)

    def _use_flash(self, q: torch.Tensor, key_valid_BL: Optional[torch.Tensor]) -> bool:
        impl = self.attn_implementation
        if impl == "sdpa":
            return False
        ok, why = flash_attn_status(q)
        if impl == "flash_attn" and not ok:
            raise RuntimeError(
                f"attn_implementation='flash_attn' but it cannot run: {why}. "
                "Install flash-attn on a CUDA machine or use attn_implementation='sdpa'/'auto'."
            )
        # flash_attn_func has no padding mask: padded batches go through SDPA.
        return ok and key_valid_BL is None

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        key_valid_BL: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D).

        ``key_valid_BL``: optional (B, L_k) bool, False at padding keys (L_k = past + S).
        ``cache``: optional :class:`KVCache`; the new keys/values are appended to it.
        """
        B, S, _ = x_BSD.shape
        H, G, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x_BSD)).view(B, S, H, Dh).transpose(1, 2)
        k = self.k_norm(self.k_proj(x_BSD)).view(B, S, G, Dh).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, G, Dh).transpose(1, 2)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = 0 if cache.layers[self.layer_idx] is None else cache.layers[self.layer_idx][0].shape[2]
            k, v = cache.update(self.layer_idx, k, v)

        if self._use_flash(q, key_valid_BL):
            flash_attn_func = _import_flash_attn()[0]
            # (B, S, H, Dh) views; causal=True aligns the mask bottom-right, i.e. after the past.
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                softmax_scale=self.scaling, causal=True)
            o_BSHD = o
        else:
            gqa = {"enable_gqa": True} if G != H else {}
            if key_valid_BL is None and past == 0:
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=S > 1, scale=self.scaling, **gqa
                )
            elif key_valid_BL is None and S == 1:
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling, **gqa)
            else:
                mask = _sdpa_mask(key_valid_BL, S, past, q.device)
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=self.scaling, **gqa
                )
            o_BSHD = o.transpose(1, 2)
        return self.o_proj(o_BSHD.reshape(B, S, H * Dh))

