"""Opt-out inference helpers shared by ``flexmoe generate`` and the demo.

Legend: B batch, S sequence length, T = B*S tokens, E experts, K top-k, L layers.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["resolve_allow_list", "expert_usage", "format_usage", "RoutingStats"]


def resolve_allow_list(expert_names: Sequence[str], allow: Optional[Sequence[str]], deny: Optional[Sequence[str]],
                       top_k: int) -> Optional[List[str]]:
    """Names of the allowed experts from ``--allow`` / ``--deny`` lists (None = all allowed).

    ``allow`` / ``deny`` are the accumulated names of every occurrence of the flag (repeats
    are harmless). Raises ``ValueError`` naming the flag for unknown names, for both flags at
    once, and when fewer than ``top_k`` experts would remain (lower the model's top-k with
    ``--top-k``); no name is ever dropped silently.
    """
    names = list(expert_names)
    if allow and deny:
        raise ValueError("give --allow or --deny, not both")
    for flag, lst in (("--allow", allow), ("--deny", deny)):
        for n in lst or []:
            if n not in names:
                raise ValueError(f"{flag}: unknown expert {n!r}; this model's experts are {names}")
    if allow:
        flag, chosen = "--allow", [n for n in names if n in set(allow)]
    elif deny:
        flag, chosen = "--deny", [n for n in names if n not in set(deny)]
    else:
        return None
    if len(chosen) < top_k:
        raise ValueError(
            f"{flag} {','.join(allow or deny)} leaves {len(chosen)} expert(s) ({chosen}) but the model routes each "
            f"token to top_k={top_k}; allow more experts or pass --experts-per-token {max(1, len(chosen))}")
    return chosen


@torch.no_grad()
def expert_usage(router_logits: Sequence[torch.Tensor], top_k: int, expert_names: Sequence[str]) -> Dict[str, dict]:
    """How many (token, layer) routing slots each expert served, from the model's router logits.

    Args:
        router_logits: L tensors (T, E) float32 of masked logits (``-inf`` where opted out), as
            returned by ``model(..., output_router_logits=True).router_logits``.
        top_k: K.
    Returns:
        ``{name: {"slots": int, "share": float, "weight": float}}``: slots = number of
        (token, layer) pairs whose top-k included the expert; share = slots / (T * L * K);
        weight = the expert's summed routing probability / (T * L) (its average share of the
        FFN output).
    """
    E = len(expert_names)
    slots = torch.zeros(E, dtype=torch.long)
    weight = torch.zeros(E, dtype=torch.float64)
    total = 0
    for lg in router_logits:
        lg = lg.float().reshape(-1, E)
        p = torch.softmax(lg, dim=-1)
        w, ids = torch.topk(p, top_k, dim=-1)
        slots += torch.bincount(ids.flatten().cpu(), minlength=E)
        weight.index_add_(0, ids.flatten().cpu(), w.flatten().double().cpu())
        total += lg.shape[0]
    denom_slots = max(1, int(slots.sum()))
    return {n: {"slots": int(slots[i]), "share": float(slots[i]) / denom_slots, "weight": float(weight[i]) / max(1, total)}
            for i, n in enumerate(expert_names)}


def format_usage(usage: Dict[str, dict], allowed: Optional[Sequence[str]], n_tokens: int, n_layers: int) -> str:
    lines = [f"Experts that served this request ({n_tokens} tokens x {n_layers} layers):",
             f"  {'expert':14s} {'allowed':8s} {'slots':>7s} {'share':>7s} {'avg weight':>10s}"]
    for n, u in usage.items():
        ok = allowed is None or n in allowed
        lines.append(f"  {n:14s} {'yes' if ok else 'NO':8s} {u['slots']:7d} {100 * u['share']:6.1f}% {u['weight']:10.3f}")
    return "\n".join(lines)


class RoutingStats:
    """Per-layer routing statistics accumulated over forward passes (the demo's routing table).

    Feed it each forward's ``router_logits`` (L tensors (T, E) float32 masked logits, ``-inf``
    where opted out, the negative bias already added); :meth:`table` returns, per layer, each
    expert's average routing probability (softmax over all allowed experts, before top-k: the
    router's preference, which sums to 1 over the experts) and its top-1 share (the fraction of
    tokens whose highest-probability expert it is, ties to the lower id as the router does).
    """

    def __init__(self, expert_names: Sequence[str]) -> None:
        self.names = list(expert_names)
        self.prob_LE: Optional[torch.Tensor] = None
        self.top1_LE: Optional[torch.Tensor] = None
        self.tokens = 0

    @torch.no_grad()
    def add(self, router_logits: Sequence[torch.Tensor]) -> None:
        """Accumulate one forward's L layers of (T, E) router logits."""
        E = len(self.names)
        probs = [torch.softmax(lg.float().reshape(-1, E), dim=-1).double().cpu() for lg in router_logits]
        if self.prob_LE is None:
            self.prob_LE = torch.zeros(len(probs), E, dtype=torch.float64)
            self.top1_LE = torch.zeros(len(probs), E, dtype=torch.float64)
        for i, p_TE in enumerate(probs):
            self.prob_LE[i] += p_TE.sum(0)
            # torch.argmax returns the first maximum: ties to the lower expert id
            self.top1_LE[i] += torch.bincount(p_TE.argmax(-1), minlength=E).double()
        self.tokens += probs[0].shape[0] if probs else 0

    def table(self) -> dict:
        """``{"experts": names, "tokens": T, "weight": [[L][E]], "top1": [[L][E]]}`` (each row sums to 1)."""
        if self.prob_LE is None:
            return {"experts": self.names, "tokens": 0, "weight": [], "top1": []}
        n = max(1, self.tokens)
        return {"experts": self.names, "tokens": self.tokens,
                "weight": [[round(float(v), 5) for v in row] for row in self.prob_LE / n],
                "top1": [[round(float(v), 5) for v in row] for row in self.top1_LE / n]}
