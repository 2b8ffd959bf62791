"""Turning user-facing ``allowed_experts`` into allow-masks.

``allowed_experts`` may be:
  * None: every expert allowed;
  * a sequence of expert names (str) and/or indices: the same set for every token. An index
    is any integer (Python ``int``, numpy integer scalar, 0-dim integer tensor); bools
    (Python, numpy, bool tensors) and non-integer numbers are refused (``TypeError``);
  * a bool tensor (E,): global; (B, E): one permission set per sequence of a (B, S, D) batch;
    (T, E): one per token of the flattened input.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import torch

from ..ops.args import check_allow_mask_rows, check_mask_device, check_top_k

AllowedExperts = Union[None, Sequence[Union[str, int]], torch.Tensor]

__all__ = ["AllowedExperts", "resolve_allowed_experts", "allowed_expert_indices", "checked_allow_mask"]


def resolve_allowed_experts(
    allowed_experts: AllowedExperts,
    expert_names: Sequence[str],
    lead_shape: Sequence[int],
    device: torch.device,
) -> Optional[torch.Tensor]:
    """Return None, an (E,) or a (T, E) bool mask on ``device`` for an input of shape (*lead_shape, D).

    Raises ``ValueError`` for an unknown name, an index out of range, or a mask of the wrong shape.
    """
    E = len(expert_names)
    if allowed_experts is None:
        return None
    if isinstance(allowed_experts, torch.Tensor):
        m = allowed_experts
        if m.dtype != torch.bool:
            raise TypeError(f"allowed_experts tensor must be bool, got {m.dtype}")
        check_mask_device(m, "allowed_experts", device)
        if m.shape[-1:] != (E,):
            raise ValueError(
                f"allowed_experts must have a last dimension of E={E}, got shape {tuple(m.shape)}"
            )
        m = m.to(device)
        T = 1
        for s in lead_shape:
            T *= s
        if m.ndim == 1:
            return m
        if m.ndim == 2 and len(lead_shape) >= 2 and m.shape[0] == lead_shape[0] and m.shape[0] != T:
            per_seq = T // lead_shape[0]
            return m[:, None, :].expand(lead_shape[0], per_seq, E).reshape(T, E)
        if m.ndim == 2 and m.shape[0] == T:
            return m
        if m.ndim == len(lead_shape) + 1 and tuple(m.shape[:-1]) == tuple(lead_shape):
            return m.reshape(T, E)
        want = f"(E,)=({E},), (B, E)=({lead_shape[0]}, {E}) or (T, E)=({T}, {E})"
        raise ValueError(f"allowed_experts must have shape {want}, got {tuple(m.shape)}")
    return _mask_from_indices(allowed_expert_indices(allowed_experts, expert_names), E, device)


def allowed_expert_indices(allowed_experts: Union[str, int, Sequence[Union[str, int]]],
                           expert_names: Sequence[str]) -> list[int]:
    """The sorted distinct expert indices a name/index list (or one name or index) allows,
    computed on the host. ``ValueError`` for an unknown name or an out-of-range index,
    ``TypeError`` for an entry that is neither."""
    E = len(expert_names)
    if isinstance(allowed_experts, str) or _expert_index(allowed_experts) is not None:
        allowed_experts = [allowed_experts]
    chosen = set()
    for item in allowed_experts:
        if isinstance(item, str):
            if item not in expert_names:
                raise ValueError(
                    f"unknown expert name {item!r} in allowed_experts; known: {list(expert_names)}"
                )
            chosen.add(list(expert_names).index(item))
            continue
        index = _expert_index(item)
        if index is None:
            raise TypeError(
                f"allowed_experts entries must be str or an integer index, got {type(item).__name__}"
            )
        if not 0 <= index < E:
            raise ValueError(f"allowed_experts index {index} is out of range for E={E} experts")
        chosen.add(index)
    return sorted(chosen)


def _mask_from_indices(indices: Sequence[int], num_experts: int, device: torch.device) -> torch.Tensor:
    """(E,) bool mask, True at ``indices`` (sorted), made on ``device`` by filling each run of
    consecutive indices: no host-to-device copy, hence no synchronisation (and capturable in a
    CUDA graph)."""
    m = torch.zeros(num_experts, dtype=torch.bool, device=device)
    start = 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[i - 1] + 1:
            m.narrow(0, indices[start], i - start).fill_(True)
            start = i
    return m


def checked_allow_mask(
    allowed_experts: AllowedExperts,
    expert_names: Sequence[str],
    lead_shape: Sequence[int],
    device: torch.device,
    top_k: int,
    validate: bool = True,
) -> Optional[torch.Tensor]:
    """:func:`resolve_allowed_experts`, then the one check that every row allows >= ``top_k``
    experts (``ValueError`` otherwise); layers given the result need not check again.

    Cost of the check: a name/index list is checked on the host from its entries (no device
    read, no synchronisation); a tensor by
    :func:`~flexmoe_kernels.ops.args.check_allow_mask_rows` (one host sync; none while a CUDA
    graph is captured; under ``torch.compile`` the checked copy it returns, checked when the
    graph runs, is the mask returned here). ``validate=False``: no check (the caller
    guarantees valid rows).
    """
    if allowed_experts is None or isinstance(allowed_experts, torch.Tensor):
        mask = resolve_allowed_experts(allowed_experts, expert_names, lead_shape, device)
        return check_allow_mask_rows(mask, top_k, len(expert_names)) if validate else mask
    indices = allowed_expert_indices(allowed_experts, expert_names)
    if validate:
        check_top_k(top_k, len(expert_names))
        if len(indices) < top_k:
            raise ValueError(f"allowed_experts allows {len(indices)} experts, fewer than top_k={top_k}")
    return _mask_from_indices(indices, len(expert_names), device)


def _expert_index(item: object) -> Optional[int]:
    """``item`` as a Python int when it is an integer (``int``, numpy integer, 0-dim integer
    tensor; anything with ``__index__``), None when it is not. ``TypeError`` for a bool of any
    kind (Python, numpy, 0-dim bool tensor): True / False are never expert indices."""
    if isinstance(item, torch.Tensor):
        if item.dtype == torch.bool and item.ndim == 0:
            raise TypeError("allowed_experts entries must be expert names or indices, got a bool")
        if item.ndim != 0 or item.is_floating_point() or item.is_complex():
            return None
    if isinstance(item, bool) or type(item).__name__ in ("bool", "bool_"):
        raise TypeError("allowed_experts entries must be expert names or indices, got a bool")
    try:
        return operator.index(item)
    except TypeError:
        return None
