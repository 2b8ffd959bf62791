"""FlexOlmo decoder blocks and the loop over them, with optional activation checkpointing.

Legend: B batch, S sequence, D hidden, E experts, T = B*S tokens.

Each block is post-norm (FlexOlmo / OLMo-2 "reordered norm")::

    h   = x + post_attention_layernorm(self_attn(x))
    out = h + post_feedforward_layernorm(mlp(h))        # mlp is a flexmoe_kernels.FlexMoE

Activation checkpointing (:func:`run_layers` with ``checkpointing=True``) keeps only each
block's input and recomputes the block in the backward pass, with
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. The non-reentrant form is the
one that fits FlexOlmo's coupled training: the block input there does not require grad (the
embeddings are frozen), and the reentrant form would then return no gradient for the block's
parameters at all; it also works with ZeRO-3's parameter hooks (a recomputed block gathers its
parameters again like any forward) and needs no DeepSpeed in the model library. The
recomputation receives the very same arguments as the first forward: the allow-mask the model
resolved once (the same tensor object), the RoPE tables and the key-padding mask. It is applied
only when autograd records (training with gradients) and no KV cache is used.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..modules import FlexMoE
from .attention import FlexOlmoAttention, RMSNorm
from .config import FlexOlmoConfig

__all__ = ["FlexOlmoDecoderLayer", "run_layers"]


class FlexOlmoDecoderLayer(nn.Module):
    """Post-norm block: attention and a :class:`FlexMoE` FFN, each followed by its RMSNorm."""

    def __init__(self, config: FlexOlmoConfig, layer_idx: int):
        super().__init__()
        self.self_attn = FlexOlmoAttention(config, layer_idx)
        self.mlp = FlexMoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            norm_topk_prob=config.norm_topk_prob,
            expert_bias=config.expert_bias,
            backend=config.moe_backend,
            expert_names=config.expert_names,
            init_std=config.initializer_range,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_BSD, cos_sin, key_valid_BL=None, cache=None, allow_mask=None):
        h = x_BSD + self.post_attention_layernorm(self.self_attn(x_BSD, cos_sin, key_valid_BL, cache))
        # allow_mask was checked once by the model (FlexOlmoModel.forward): no per-layer check
        moe_out, logits_TE = self.mlp(h, allow_mask, return_router_logits=True, validate=False)
        return h + self.post_feedforward_layernorm(moe_out), logits_TE


def run_layers(layers, h_BSD: torch.Tensor, cos_sin, key_valid_BL: Optional[torch.Tensor], cache,
               allow_mask, *, checkpointing: bool = False) -> tuple[torch.Tensor, list]:
    """Run ``h_BSD`` through every block; returns ``(hidden (B, S, D), [router logits (T, E) per layer])``.

    ``checkpointing``: recompute each block in the backward pass instead of keeping its
    activations (only while autograd records and without a KV cache; otherwise ignored). The
    result and the gradients equal the run without it.
    """
    recompute = checkpointing and cache is None and torch.is_grad_enabled()
    logits = []
    for layer in layers:
        if recompute:
            h_BSD, logits_TE = checkpoint(layer, h_BSD, cos_sin, key_valid_BL, None, allow_mask, use_reentrant=False)
        else:
            h_BSD, logits_TE = layer(h_BSD, cos_sin, key_valid_BL, cache, allow_mask)
        logits.append(logits_TE)
    return h_BSD, logits
