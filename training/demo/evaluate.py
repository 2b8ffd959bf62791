"""Held-out evaluation for the demo: per-domain loss / perplexity, opt-out, top-k, BTM ensembles.

Legend: W windows, S window length (tokens), M ensemble members, P scoring prefix (tokens).

All models are compared on the *same* token windows of each domain's held-out documents: the
documents are tokenised, joined with the end-of-document token and cut into non-overlapping
windows of S tokens. The demo scores every model on the same token range of each window: the
first P tokens are context only (a BTM ensemble picks and weighs its members on them, see
:func:`prefix_ensemble_logprobs`), the loss is the mean next-token cross-entropy over tokens
P .. S-1 (:func:`scored`), and a domain's loss is the token-weighted mean over its windows.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["make_windows", "target_logprobs", "domain_loss", "ensemble_logprobs", "prefix_ensemble_logprobs",
           "scored", "summarise"]


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
def target_logprobs(model, windows_WS: torch.Tensor, *, allowed_experts=None, batch_size: int = 8,
                    routing=None) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..S-1 of every window: (W, S-1) float32 on the CPU.

    ``routing``: an optional :class:`~flexmoe_training.demo.inference.RoutingStats` that gets
    every forward's router logits (an MoE model only).
    """
    device = next(model.parameters()).device
    out = []
    kw = {"output_router_logits": True} if routing is not None else {}
    for s in range(0, windows_WS.shape[0], batch_size):
        x = windows_WS[s:s + batch_size].to(device)
        res = model(x, allowed_experts=allowed_experts, **kw)
        if routing is not None:
            routing.add(res.router_logits)
        logits = res.logits[:, :-1].float()
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


def scored(logprobs_WS1: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """The scored part of :func:`target_logprobs`' (W, S-1) output: tokens ``prefix_len`` .. S-1 of
    each window, (W, S - prefix_len). ``prefix_len`` 1 keeps every predicted token."""
    S1 = logprobs_WS1.shape[-1]
    if not 1 <= prefix_len <= S1:
        raise ValueError(f"prefix_len must be in [1, {S1}] (window length {S1 + 1}), got {prefix_len}")
    return logprobs_WS1[..., prefix_len - 1:]


def prefix_ensemble_logprobs(member_logprobs_MWS: torch.Tensor, prefix_len: int, top: int = 2):
    """BTM output ensemble as the paper runs it: the ``top`` members most likely on a fixed prefix.

    For each window, the likelihood of its first ``prefix_len`` tokens under member m,
    ``L_m = prod_{t=1}^{P-1} p_m(x_t | x_<t)``, picks the ``top`` most likely members (ties to
    the lower member index) and weighs them ``w_m = L_m / sum_{top} L_m`` (the posterior under a
    uniform prior, restricted to the chosen members); the weights stay fixed for the rest of the
    window, and the mixture ``sum_m w_m p_m(x_t)`` is scored on tokens P .. S-1 (the same range
    :func:`scored` keeps for every other model).

    Args:
        member_logprobs_MWS: (M, W, S-1) log p_m(x_t | x_<t) of :func:`target_logprobs`.
        prefix_len: P, 1 <= P <= S-1 (P = 1: no evidence, the first ``top`` members, equal weights).
        top: members per window (at most M).
    Returns:
        ``(logprobs (W, S-P) float32, weights (M, W) float32)``; each window's weights sum to 1
        and are zero outside its chosen members.
    """
    if member_logprobs_MWS.ndim != 3:
        raise ValueError(f"member_logprobs_MWS must be (M, W, S-1), got {tuple(member_logprobs_MWS.shape)}")
    M = member_logprobs_MWS.shape[0]
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    lp = member_logprobs_MWS.double()
    rest = scored(lp, prefix_len)
    evidence_MW = lp[..., :prefix_len - 1].sum(-1)
    order_MW = torch.sort(evidence_MW, dim=0, descending=True, stable=True).indices
    chosen_MW = torch.zeros_like(evidence_MW, dtype=torch.bool).scatter(0, order_MW[:min(top, M)], True)
    logw_MW = torch.log_softmax(evidence_MW.masked_fill(~chosen_MW, float("-inf")), dim=0)
    mix = torch.logsumexp(logw_MW[..., None] + rest, dim=0)
    return mix.float(), logw_MW.exp().float()


def summarise(logprobs_WS: torch.Tensor) -> Dict[str, float]:
    """{"loss": mean NLL (nats/token), "ppl": exp(loss), "tokens": count}."""
    n = logprobs_WS.numel()
    loss = float(-logprobs_WS.double().sum() / max(1, n))
    return {"loss": loss, "ppl": float(math.exp(min(loss, 50.0))), "tokens": int(n)}


def domain_loss(model, windows_WS: torch.Tensor, *, allowed_experts=None, batch_size: int = 8) -> Dict[str, float]:
    """Held-out loss of ``model`` on one domain's windows (see :func:`summarise`)."""
    return summarise(target_logprobs(model, windows_WS, allowed_experts=allowed_experts, batch_size=batch_size))
