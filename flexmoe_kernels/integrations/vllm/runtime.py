"""Worker side of per-request opt-out in vLLM: the allow-mask state, its logits processor and
the MoE custom op that reads it.

How a request's allowed set reaches the router (docs/SERVING.md has the whole picture):

1. The front end (:mod:`.frontend`) validates ``extra_args["allowed_experts"]`` and replaces it
   with the canonical sorted index set (and salts the KV cache with it).
2. In the worker, vLLM calls :class:`AllowedExpertsLogitsProcessor.update_state` before every
   forward, after the persistent batch was compacted and reordered; it keeps one row of the
   ``(max_num_seqs + 1, E)`` bool **row mask** per batch row (True = allowed; free rows and the
   extra last row are all True).
3. Inside the model, each MoE layer calls the opaque custom op ``torch.ops.vllm.flexmoe_moe``
   (opaque to torch.compile). It maps the forward's tokens to batch rows with the attention
   metadata's ``query_start_loc`` (row i owns tokens ``qsl[i]:qsl[i+1]``; padding tokens past
   ``qsl[-1]`` map to the all-True row), gathers the ``(T, E)`` per-token mask and runs
   :func:`flexmoe_kernels.flexmoe_forward` with it: logit -inf before the softmax, FlexOlmo's
   ``min(b, 0)`` expert bias (docs/SEMANTICS.md §2.2-§2.4).

The token-to-row map is computed on the device (``searchsorted``, no host sync) from tensors
that the model runner keeps in persistent buffers, so the same op can be captured in a CUDA
graph and replayed; on CPU (no graphs) the op skips the mask when no row is restricted.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from .allowed import FIELD, decode_canonical

logger = logging.getLogger("flexmoe_kernels.vllm")

__all__ = ["MaskState", "mask_state", "init_mask_state", "AllowedExpertsLogitsProcessor", "flexmoe_moe",
           "register_custom_op"]


class MaskState:
    """The per-row allow-mask of the current batch (one per worker process)."""

    def __init__(self, num_experts: int, max_rows: int, device: torch.device):
        self.num_experts = num_experts
        self.max_rows = max_rows
        self.device = torch.device(device)
        # the last row is always all-True: padding tokens and tokens of no request map to it
        self.rows_cpu = torch.ones(max_rows + 1, num_experts, dtype=torch.bool)
        self.rows = self.rows_cpu if self.device.type == "cpu" else self.rows_cpu.to(self.device)
        self.sets: dict[int, tuple[int, ...]] = {}  # batch row -> allowed indices (restricted rows only)
        self.step = 0
        self.tracked = False  # set by the logits processor that keeps the rows up to date
        self._cache: Optional[tuple] = None

    def set_row(self, row: int, allowed: Optional[tuple[int, ...]]) -> None:
        if allowed is None:
            self.sets.pop(row, None)
            self.rows_cpu[row] = True
        else:
            self.sets[row] = allowed
            self.rows_cpu[row] = False
            self.rows_cpu[row, list(allowed)] = True

    def publish(self) -> None:
        """Make the rows visible to the next forward (a copy into the device buffer on GPU)."""
        self.step += 1
        if self.rows is not self.rows_cpu:
            self.rows.copy_(self.rows_cpu, non_blocking=True)

    def token_mask(self, num_tokens: int, device: torch.device) -> Optional[torch.Tensor]:
        """The (num_tokens, E) bool mask of this forward, or None (every expert, every token)."""
        graphs = device.type != "cpu"  # on GPU: never branch on the batch (CUDA graph replay)
        if not graphs and not self.sets:
            return None
        # CPU: computed once per forward and shared by the layers. GPU: recomputed in every layer
        # (a few tiny kernels), so that no tensor outlives the piece of a CUDA graph it was made in
        key = (self.step, num_tokens)
        if not graphs and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        qsl = _query_start_loc()
        if qsl is None:  # profiling / dummy runs: no requests
            return None
        qsl = qsl.to(device=self.rows.device)
        num_rows = qsl.numel() - 1
        if num_rows > self.max_rows:
            raise RuntimeError(f"flexmoe: a batch of {num_rows} rows exceeds max_num_seqs={self.max_rows}")
        tok = torch.arange(num_tokens, device=qsl.device, dtype=qsl.dtype)
        row = torch.searchsorted(qsl[1:], tok, right=True)  # (T,) in [0, num_rows]
        # tokens past qsl[-1] (padding) get row num_rows; send them to the all-True last row
        row = torch.where(tok < qsl[-1], row, torch.full_like(row, self.max_rows))
        mask = self.rows.index_select(0, row.long())
        if not graphs:
            self._cache = (key, mask)
        return mask


_STATE: Optional[MaskState] = None


def mask_state() -> Optional[MaskState]:
    return _STATE


def init_mask_state(num_experts: int, max_rows: int, device) -> MaskState:
    """Create (or return the matching) per-process mask state."""
    global _STATE
    if _STATE is None or (_STATE.num_experts, _STATE.max_rows) != (num_experts, max_rows):
        _STATE = MaskState(num_experts, max_rows, device)
    return _STATE


def _query_start_loc() -> Optional[torch.Tensor]:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if md is None:
        return None
    if isinstance(md, list):
        raise NotImplementedError("flexmoe opt-out does not support micro-batching (DBO); disable it")
    for value in md.values():
        qsl = getattr(value, "query_start_loc", None)
        if qsl is not None:
            return qsl
    return None


# ------------------------------------------------------------------ logits processor
def _model_experts(vllm_config) -> Optional[int]:
    hf = vllm_config.model_config.hf_config
    if getattr(hf, "model_type", None) != "flex_olmo":
        return None
    return int(getattr(hf, "num_experts", 0) or getattr(hf, "num_local_experts", 0))


try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # pragma: no cover - only imported with vLLM installed
    raise


class AllowedExpertsLogitsProcessor(LogitsProcessor):
    """Leaves the logits alone; its ``update_state`` keeps the per-row allow-mask that the
    model's MoE layers read (vLLM calls it before every forward). Loaded for every model
    through the ``vllm.logits_processors`` entry point; a no-op for models other than FlexOlmo
    (the front end refuses ``allowed_experts`` for them)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        # The full check (names, ranges, top-k) needs the model config: the front end does it
        # (flexmoe_kernels.integrations.vllm.frontend), before this is called.
        return None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        E = _model_experts(vllm_config)
        self.state = None
        if E:
            self.state = init_mask_state(E, vllm_config.scheduler_config.max_num_seqs, device)
            self.state.tracked = True

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def _allowed_of(self, params) -> Optional[tuple[int, ...]]:
        extra = getattr(params, "extra_args", None) or {}
        value = extra.get(FIELD)
        try:
            return decode_canonical(value, self.state.num_experts)
        except ValueError as e:
            # Never raise in the worker (it would kill the engine). A value that did not come
            # through the front end fails closed: the row allows no expert (garbage output,
            # but no opted-out expert is used).
            logger.error("flexmoe: %s; the request gets no expert", e)
            return ()

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        st = self.state
        if st is None:
            return
        if batch_update:  # in BatchUpdate's documented order: removed, added, moved
            for index in batch_update.removed:
                st.set_row(index, None)
            for index, params, _prompt, _out in batch_update.added:
                st.set_row(index, self._allowed_of(params))
            for a, b, direction in batch_update.moved:
                sa, sb = st.sets.get(a), st.sets.get(b)
                st.set_row(b, sa)
                if direction == MoveDirectionality.SWAP:
                    st.set_row(a, sb)
                else:
                    st.set_row(a, None)
        st.publish()


# ------------------------------------------------------------------ the MoE op
_BACKENDS: dict = {}


def _backend(device: torch.device) -> str:
    """``FLEXMOE_VLLM_MOE_BACKEND`` if set; else "triton" on CUDA when it runs (graph-safe: no
    host sync), else "torch" (the reference; on CPU the only choice)."""
    name = os.environ.get("FLEXMOE_VLLM_MOE_BACKEND")
    if name:
        return name
    if device.type not in _BACKENDS:
        choice = "torch"
        if device.type == "cuda":
            from flexmoe_kernels.ops.backends import backend_status

            choice = "triton" if backend_status("triton", device)[0] else "torch"
        _BACKENDS[device.type] = choice
    return _BACKENDS[device.type]


def flexmoe_moe(x_TD: torch.Tensor, router_ED: torch.Tensor, bias_E: Optional[torch.Tensor],
                gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, top_k: int,
                norm_topk_prob: bool) -> torch.Tensor:
    """One FlexOlmo MoE layer on the forward's tokens with the current per-token allow-mask."""
    from flexmoe_kernels.ops.layer import flexmoe_forward

    st = _STATE
    mask = None if st is None else st.token_mask(x_TD.shape[0], x_TD.device)
    out, _ = flexmoe_forward(x_TD, router_ED, gate_up_E2FD, down_EDF, top_k, allow_mask=mask,
                             expert_bias=bias_E, norm_topk_prob=norm_topk_prob, validate=False,
                             backend=_backend(x_TD.device))
    return out


def _flexmoe_moe_fake(x_TD, router_ED, bias_E, gate_up_E2FD, down_EDF, top_k, norm_topk_prob):
    return torch.empty_like(x_TD)


_REGISTERED = False


def register_custom_op() -> None:
    """Register ``torch.ops.vllm.flexmoe_moe`` (once per process)."""
    global _REGISTERED
    if _REGISTERED or hasattr(torch.ops.vllm, "flexmoe_moe"):
        _REGISTERED = True
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("flexmoe_moe", flexmoe_moe, mutates_args=[], fake_impl=_flexmoe_moe_fake)
    _REGISTERED = True
