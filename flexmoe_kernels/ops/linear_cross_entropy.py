"""Fused linear cross-entropy: the LM head and the token cross-entropy without the (T, V) logits.

Legend: T tokens, D hidden, V vocabulary, C chunk of tokens.

``linear_cross_entropy(h_TD, w_VD, labels_T, ...)`` equals
``F.cross_entropy((h_TD @ w_VD.T).float(), labels_T, ignore_index=-100, reduction="sum") / denom``
(transformers' ``ForCausalLMLoss`` after its shift: logits in the weight's dtype, then fp32), but
processes C tokens at a time: their logits (C, V) in fp32, the log-sum-exp, the loss, and, when
gradients are wanted, the gradients for ``h`` and ``w`` at once (softmax minus one-hot, scaled by
``1 / denom``), as Liger-Kernel's fused linear cross-entropy does. Memory beyond the inputs: one
(C, V) fp32 chunk, ``grad_h`` (T, D) in h's dtype and ``grad_w`` (V, D) in fp32 (only when ``w``
requires grad: a frozen LM head, as in FlexOlmo's coupled training, costs nothing), instead of the
(T, V) logits, their fp32 copy and the fp32 log-softmax (10 bytes x T x V in bf16). The backward
only scales the stored gradients by the incoming one.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["linear_cross_entropy"]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_VD, labels_T, denom, chunk: int, ignore_index: int, want_h: bool, want_w: bool):
        T = h_TD.shape[0]
        grad_h = torch.empty_like(h_TD) if want_h else None
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        inv = 1.0 / denom.to(torch.float32)
        for s in range(0, T, chunk):
            h = h_TD[s:s + chunk]
            y = labels_T[s:s + chunk]
            logits = (h @ w_VD.t()).float()                      # (C, V)
            valid = y != ignore_index
            yc = torch.where(valid, y, torch.zeros_like(y))
            lse = torch.logsumexp(logits, -1)
            tgt = logits.gather(1, yc[:, None])[:, 0]
            total += ((lse - tgt) * valid).sum()
            if want_h or want_w:
                g = logits.sub_(lse[:, None]).exp_()                 # softmax, in place of the logits
                g[torch.arange(g.shape[0], device=g.device), yc] -= 1.0
                g.mul_((valid.to(torch.float32) * inv)[:, None])
                if want_h:
                    grad_h[s:s + chunk] = (g.to(w_VD.dtype) @ w_VD).to(h_TD.dtype)
                if want_w:
                    grad_w.addmm_(g.t(), h.float())
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.want = (want_h, want_w)
        ctx.w_dtype = w_VD.dtype
        return total * inv

    @staticmethod
    def backward(ctx, g_out):
        saved = list(ctx.saved_tensors)
        want_h, want_w = ctx.want
        gh = gw = None
        if want_h:
            grad_h = saved.pop(0)
            gh = grad_h * g_out.to(grad_h.dtype)
        if want_w:
            gw = (saved.pop(0) * g_out).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor,
                         denom: Optional[Union[int, float, torch.Tensor]] = None, chunk_size: int = 1024,
                         ignore_index: int = -100) -> torch.Tensor:
    """Sum over tokens of ``cross_entropy(h @ w.T, labels)`` divided by ``denom`` (default: the
    number of labels that are not ``ignore_index``, i.e. the mean), fused and chunked (see the
    module docstring). ``h_TD`` (T, D), ``w_VD`` (V, D), ``labels_T`` (T,) integer. Returns an
    fp32 scalar; differentiable in ``h`` and ``w``."""
    if h_TD.ndim != 2 or w_VD.ndim != 2 or h_TD.shape[1] != w_VD.shape[1]:
        raise ValueError(f"h_TD must be (T, D) and w_VD (V, D), got {tuple(h_TD.shape)} and {tuple(w_VD.shape)}")
    if labels_T.shape != (h_TD.shape[0],):
        raise ValueError(f"labels_T must be (T,) = ({h_TD.shape[0]},), got {tuple(labels_T.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if denom is None:
        denom = (labels_T != ignore_index).sum()
    denom = torch.as_tensor(denom, device=h_TD.device).clamp(min=1)
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h_TD, w_VD, labels_T, denom, chunk_size, ignore_index,
                                     grad and h_TD.requires_grad, grad and w_VD.requires_grad)
