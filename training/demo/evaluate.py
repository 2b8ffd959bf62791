"""Held-out evaluation for the demo: per-domain loss / perplexity, opt-out, top-k, BTM ensembles.

Legend: W windows, S window length (tokens), M ensemble members.

All models are compared on the *same* token windows of each domain's held-out documents: the
documents are tokenised, joined with the end-of-document token and cut into non-overlapping
windows of S tokens; the loss of a window is the mean next-token cross-entropy over its S - 1
predicted positions, and a domain's loss is the token-weighted mean over its windows.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["make_windows", "target_logprobs", "domain_loss", "ensemble_logprobs", "summarise"]


def make_windows(docs_tokens: Sequence[Sequence[int]], seq_len: int, max_tokens: int,
                 eos_token_id: Optional[int]) -> torch.Tensor:
    """Concatenate documents (each followed by ``eos_token_id`` when given) and cut (W, S) windows.

    At most ``max_tokens`` tokens are used (whole windows only); the incomplete tail is dropped.
    Raises ``ValueError`` when not even one window can be made.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    flat: List[int] = []
    for t in docs_tokens:
        flat.extend(t)
        if eos_token_id is not None:
            flat.append(eos_token_id)
        if len(flat) >= max_tokens:
            break
    n = min(len(flat), max_tokens) // seq_len
    if n == 0:
        raise ValueError(f"held-out text has {len(flat)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def target_logprobs(model, windows_WS: torch.Tensor, *, allowed_experts=None, batch_size: int = 8) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..S-1 of every window: (W, S-1) float32 on the CPU."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, windows_WS.shape[0], batch_size):
        x = windows_WS[s:s + batch_size].to(device)
        logits = model(x, allowed_experts=allowed_experts).logits[:, :-1].float()
        lp = F.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None])[..., 0]
        out.append(lp.cpu())
    return torch.cat(out, 0)


def ensemble_logprobs(member_logprobs_MWS: torch.Tensor, weighting: str = "prior") -> torch.Tensor:
    """Mix M models' next-token distributions (BTM output ensemble); returns (W, S-1) log-probs.

    ``weighting="uniform"``: p = mean_m p_m. ``weighting="prior"``: at position t each member
    is weighted by its likelihood of the window's prefix x_<t (a posterior under a uniform
    prior: w_m,t ∝ prod_{s<t} p_m(x_s | x_<s)), which is what BTM does when the domain of a
    text is unknown. Only the target tokens' probabilities are needed: the mixture's
    probability of x_t is sum_m w_m,t p_m(x_t).
    """
    if member_logprobs_MWS.ndim != 3:
        raise ValueError(f"member_logprobs_MWS must be (M, W, S-1), got {tuple(member_logprobs_MWS.shape)}")
    M = member_logprobs_MWS.shape[0]
    lp = member_logprobs_MWS.double()
    if weighting == "uniform":
        logw = torch.full_like(lp, -math.log(M))
    elif weighting == "prior":
        prefix = torch.cumsum(lp, dim=-1) - lp  # sum over s < t
        logw = torch.log_softmax(prefix, dim=0)
    else:
        raise ValueError(f"weighting must be 'uniform' or 'prior', got {weighting!r}")
    return torch.logsumexp(logw + lp, dim=0).float()


def summarise(logprobs_WS: torch.Tensor) -> Dict[str, float]:
    """{"loss": mean NLL (nats/token), "ppl": exp(loss), "tokens": count}."""
    n = logprobs_WS.numel()
    loss = float(-logprobs_WS.double().sum() / max(1, n))
    return {"loss": loss, "ppl": float(math.exp(min(loss, 50.0))), "tokens": int(n)}


def domain_loss(model, windows_WS: torch.Tensor, *, allowed_experts=None, batch_size: int = 8) -> Dict[str, float]:
    """Held-out loss of ``model`` on one domain's windows (see :func:`summarise`)."""
    return summarise(target_logprobs(model, windows_WS, allowed_experts=allowed_experts, batch_size=batch_size))
