"""Which experts a patched transformers model may use right now: :class:`OptOutState`.

Legend: B sequences, S positions, T = B*S tokens, E experts, K top-k.

One state per patched model, shared by its patched MoE blocks. Three things set it:

* the patched top-level ``forward(..., allowed_experts=...)`` (for that call);
* the patched ``generate(..., allowed_experts=...)`` (for the whole generation, per sequence);
* :func:`flexmoe_kernels.integrations.transformers.allowed_experts` (a ``with`` block).

Each block asks :meth:`OptOutState.mask_for` for the (E,) or (T, E) allow-mask of its input
shape (B, S); the mask is resolved and checked once per call and shape (the first block) and
reused by the others, which run the layer with ``validate=False``. The check costs one host
sync for a tensor, none for a name/index list (checked on the host from its entries, the mask
made on the device without a copy), none under CUDA-graph capture; ``generate`` checks its
spec once for the whole generation. A per-sequence (B, E) mask of ``generate`` also applies to the decode steps
(S = 1) and to the batch expanded by ``num_return_sequences`` / beams (B' = n*B, each
sequence's copies keep its row).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from ..modules.allow import AllowedExperts, allowed_expert_indices, resolve_allowed_experts
from ..ops.reference.routing import expand_sequence_mask

__all__ = ["OptOutState"]


class OptOutState:
    """The opt-out of one patched model.

    Attributes:
        expert_names: the E names ``allowed_experts`` may use (indices work too).
        owner: the class name of the model :func:`apply_flexmoe` patched (for messages).
        top_k: K; every token must keep at least K allowed experts.
        default: the spec outside any call (set by the context manager and ``generate``).
        active: the spec of the current call (the default between calls).
        per_sequence: ``active`` is a per-sequence spec from ``generate`` (None, (E,) or (B, E)).
        last_train: :meth:`snapshot` of the last forward that recorded a graph (training mode),
            for recomputations under a checkpoint wrapper we did not wrap (see :meth:`replaying`).
    """

    def __init__(self, expert_names: Sequence[str], top_k: int):
        self.expert_names = list(expert_names)
        self.top_k = int(top_k)
        self.owner = "the patched model"  # the patched model's class name (for error messages)
        self.default: AllowedExperts = None
        self.default_per_sequence = False
        self.active: AllowedExperts = None
        self.per_sequence = False
        self.last_train: tuple = (None, False, None)  # snapshot() of the last training forward
        self._replaying = 0
        self._cache: Optional[tuple] = None

    @property
    def num_experts(self) -> int:
        """E."""
        return len(self.expert_names)

    def activate(self, spec: AllowedExperts, per_sequence: bool = False) -> None:
        """Make ``spec`` the one the blocks read (forward wrapper: the call's own spec)."""
        self.active, self.per_sequence, self._cache = spec, per_sequence, None

    def activate_default(self) -> None:
        """Make the default spec (context manager / generate) the active one."""
        self.activate(self.default, self.default_per_sequence)

    @contextlib.contextmanager
    def scoped_default(self, spec: AllowedExperts, per_sequence: bool = False) -> Iterator[None]:
        """Within the block, ``spec`` is the default (and active) spec; restored after."""
        saved = (self.default, self.default_per_sequence, self.active, self.per_sequence)
        self.default, self.default_per_sequence = spec, per_sequence
        self.activate(spec, per_sequence)
        try:
            yield
        finally:
            self.default, self.default_per_sequence = saved[0], saved[1]
            self.activate(saved[2], saved[3])

    def snapshot(self) -> tuple:
        """``(active spec, per_sequence, checked mask cache)``: what the blocks read now. The
        cache (the mask the call's first block built and checked) comes along, so a
        recomputation in backward neither rebuilds nor re-checks it (no host sync per layer)."""
        return self.active, self.per_sequence, self._cache

    @property
    def replaying(self) -> bool:
        """True inside :meth:`replaying_snapshot` (a checkpointed call or its recomputation)."""
        return self._replaying > 0

    @contextlib.contextmanager
    def replaying_snapshot(self, snapshot: tuple) -> Iterator[None]:
        """Within the block the blocks read ``snapshot`` (from :meth:`snapshot`), whatever the
        default is now: an activation-checkpointed call's recomputation in backward routes by
        the mask of its own forward. Restored after."""
        saved = self.snapshot()
        changed = snapshot[0] is not saved[0] or snapshot[1] != saved[1]
        if changed:  # (unchanged, in the forward itself: the call's checked mask stays cached)
            self.activate(snapshot[0], snapshot[1])
            self._cache = snapshot[2]
        self._replaying += 1
        try:
            yield
        finally:
            self._replaying -= 1
            if changed:
                self.activate(saved[0], saved[1])
                self._cache = saved[2]

    def per_sequence_mask(self, spec: AllowedExperts, batch: Optional[int]) -> AllowedExperts:
        """``spec`` in the form ``generate`` keeps for a whole generation, checked here once:
        None, the sorted expert indices of a name/index list (checked on the host, no sync), or
        an (E,) or (B, E) bool tensor (one host sync). A per-token mask cannot extend to new
        tokens and is refused (``ValueError`` naming ``allowed_experts``), as is a row with
        fewer than K allowed experts."""
        if spec is None:
            return None
        E = self.num_experts
        if isinstance(spec, torch.Tensor):
            if spec.dtype != torch.bool:
                raise TypeError(f"allowed_experts tensor must be bool, got {spec.dtype}")
            ok = spec.ndim == 1 and spec.shape[0] == E or spec.ndim == 2 and spec.shape[1] == E and (
                batch is None or spec.shape[0] == batch)
            if not ok:
                raise ValueError(
                    f"allowed_experts for generate must have shape (E,)=({E},) or (B, E)=({batch}, {E}) "
                    f"(per-token masks cannot extend to new tokens), got {tuple(spec.shape)}"
                )
            self._check_rows(spec)
            return spec
        return self._checked_indices(spec)

    def mask_for(self, batch: int, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
        """The allow-mask for a block input of shape (B, S, D): None, (E,) or (T, E) bool on
        ``device``, rows checked (>= K allowed, else ``ValueError`` naming ``allowed_experts``)
        once per call: by the first block, or by :meth:`per_sequence_mask` for a generation."""
        spec = self.active
        if spec is None:
            return None
        key = (batch, seq_len, device)
        if self._cache is not None and self._cache[0] is spec and self._cache[1] == key:
            return self._cache[2]
        if not isinstance(spec, torch.Tensor):  # names / indices: checked on the host, no sync
            mask = resolve_allowed_experts(self._checked_indices(spec), self.expert_names, (1,), device)
        elif self.per_sequence and spec.ndim == 2:  # checked by per_sequence_mask
            mask = self._expand_sequences(spec, batch, seq_len).to(device)
        else:
            mask = resolve_allowed_experts(spec, self.expert_names, (batch, seq_len), device)
            if not self.per_sequence:  # a generation's spec was checked by per_sequence_mask
                self._check_rows(mask)
        self._cache = (spec, key, mask)
        return mask

    def _expand_sequences(self, mask_BE: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        """(B, E) per-sequence mask -> (B'*S, E) for an input of B' = n*B sequences of S."""
        rows = mask_BE.shape[0]
        if batch % rows:
            raise ValueError(
                f"allowed_experts has {rows} rows (one per sequence) but the model got a batch of {batch}"
            )
        return expand_sequence_mask(mask_BE.repeat_interleave(batch // rows, 0), seq_len)

    def _checked_indices(self, spec: AllowedExperts) -> list[int]:
        """The expert indices of a name/index list, checked on the host (no device read)."""
        indices = allowed_expert_indices(spec, self.expert_names)
        self._raise_if_too_few(len(indices))
        return indices

    def _check_rows(self, mask: torch.Tensor) -> None:
        """``ValueError`` naming ``allowed_experts`` if a row of the tensor mask allows fewer
        than K experts: a host read (one sync), skipped while a CUDA graph is captured and
        while torch.compile traces (where the layer checks at run time)."""
        if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        self._raise_if_too_few(int(mask.sum(-1).min()) if mask.numel() else self.top_k)

    def _raise_if_too_few(self, fewest: int) -> None:
        if fewest < self.top_k:
            raise ValueError(
                f"allowed_experts allows {fewest} experts for some token, fewer than "
                f"num_experts_per_tok={self.top_k}"
            )
