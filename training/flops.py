"""Training FLOPs per token: the one formula used by the training commands (``run.json``'s
``flops_per_token`` / ``total_flops``, hence FLOPs-matched baselines) and the end-to-end benchmark.

Legend: L layers, S sequence length, H attention heads, hd head dim, D hidden, F expert width,
E experts, K top-k, V vocabulary.
"""
from __future__ import annotations

from typing import Optional

from .modeling import count_params

__all__ = ["CONVENTIONS", "flops_per_token"]

CONVENTIONS = ("recipe", "palm", "inference")


def _attention_scores(cfg, seq_len: int) -> float:
    """A = 2*L*S*H*hd: FLOPs of one token's attention scores and values (causal count)."""
    return 2.0 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim


def _matmul_params_active(cfg) -> int:
    """Matmul weights one token passes through: q/k/v/o projections, router, the K active experts
    and the LM head (not the embedding table, norms or biases)."""
    D, hd = cfg.hidden_size, cfg.head_dim
    attn = D * cfg.num_attention_heads * hd * 2 + 2 * D * cfg.num_key_value_heads * hd
    moe = cfg.num_experts * D + cfg.num_experts_per_tok * 3 * D * cfg.intermediate_size
    return cfg.num_hidden_layers * (attn + moe) + cfg.vocab_size * D


def flops_per_token(cfg, seq_len: int, trainable_active_mm: Optional[float] = None,
                    convention: str = "recipe") -> float:
    """Training FLOPs (forward + backward) per token of a ``FlexOlmoConfig`` at sequence length ``seq_len``.

    ``convention="recipe"`` (the training commands): forward 2*N_mm + A, input-gradient backward
    2*N_mm + 2A, weight gradients 2*N_trainable, where N_mm is the active parameter count of
    :func:`~flexmoe_training.modeling.count_params` without the input embedding (it includes the
    LM head) and A = 2*L*S*H*hd; ``trainable_active_mm`` is N_trainable (default N_mm: every
    active weight trains, giving 6*N_mm + 3A). Coupled training passes the owner expert's
    3*D*F*L, router tuning 0.

    ``convention="palm"`` (the benchmark's MFU): 6*N_active + 12*L*S*H*hd (PaLM, non-causal
    attention count) with N_active the matmul weights only (see :func:`_matmul_params_active`);
    ``trainable_active_mm`` must be None (the figure is the same for frozen and trainable).

    ``convention="inference"`` (the demo's per-row cost of evaluation / generation): the
    forward only, 2*N_mm + A, with N_mm and A as in "recipe"; ``trainable_active_mm`` must be None.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    attn = _attention_scores(cfg, seq_len)
    if convention != "recipe" and trainable_active_mm is not None:
        raise ValueError("trainable_active_mm is only used with convention='recipe'")
    if convention == "palm":
        return 6.0 * _matmul_params_active(cfg) + 6.0 * attn
    c = count_params(cfg)
    n_mm = c["active"] - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    if convention == "inference":
        return 2.0 * n_mm + attn
    n_tr = n_mm if trainable_active_mm is None else trainable_active_mm
    return 4.0 * n_mm + 3.0 * attn + 2.0 * n_tr
