"""``FlexMoE``: the FlexOlmo mixture-of-experts FFN as an nn.Module.

Legend: D hidden, F expert width, E experts, K top-k.

Parameter names follow Hugging Face's ``FlexOlmoSparseMoeBlock`` so state dicts map 1:1:
``gate.weight`` (E, D) router embeddings, ``experts.gate_up_proj`` (E, 2F, D),
``experts.down_proj`` (E, D, F); plus ``gate.expert_bias`` (E,) when ``expert_bias=True``
(FlexOlmo's optional negative bias, applied as ``min(b, 0)``; expert 0 is the public expert
and keeps its bias at 0 in training).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .._validate import check_positive_int, check_tensor
from ..ops.backends import BACKENDS, resolve_backend
from ..ops.layer import flexmoe_forward
from .allow import AllowedExperts, checked_allow_mask, resolve_allowed_experts

__all__ = ["FlexMoE", "MoERouter", "MoEExperts"]


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device, dtype: torch.dtype, T: Optional[int], D: int, F: int, E: int,
             K: int) -> str:
    """:func:`resolve_backend` for :meth:`FlexMoE.resolved_backend`; run, never traced, by
    torch.compile (its result is a constant of the graph). ``T`` None: no measured choice."""
    problem = None if T is None else dict(T=T, D=D, F=F, E=E, K=K, dtype=dtype)
    return resolve_backend(backend, device, problem)


class MoERouter(nn.Module):
    """Router embeddings (E, D) and the optional per-expert bias (E,)."""

    def __init__(self, hidden_size: int, num_experts: int, expert_bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts)) if expert_bias else None


class MoEExperts(nn.Module):
    """Stacked SwiGLU experts in the Hugging Face layout."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class FlexMoE(nn.Module):
    """FlexOlmo MoE FFN: masked softmax-top-k routing over E SwiGLU experts.

    Args:
        hidden_size: D.
        intermediate_size: F, each expert's FFN width.
        num_experts: E.
        top_k: K experts per token (may be changed later via ``self.top_k``).
        norm_topk_prob: renormalise the K weights (off in FlexOlmo).
        expert_bias: add FlexOlmo's per-expert negative bias ``min(b, 0)`` to the logits.
        backend: "torch", "triton", "cuda" or "auto" (fastest available on the input's device).
        expert_names: E unique names; default ``expert_0 .. expert_{E-1}``.
        init_std: std of the normal initialisation of all weights.

    ``forward(x (..., D), allowed_experts=None, *, validate=True) -> (..., D)``; see :meth:`forward`.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        norm_topk_prob: bool = False,
        expert_bias: bool = False,
        backend: str = "auto",
        expert_names: Optional[Sequence[str]] = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        check_positive_int(hidden_size, "hidden_size")
        check_positive_int(intermediate_size, "intermediate_size")
        check_positive_int(num_experts, "num_experts")
        check_positive_int(top_k, "top_k")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS) + ['auto']}, got {backend!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.backend = backend
        self.gate = MoERouter(hidden_size, num_experts, expert_bias)
        self.experts = MoEExperts(hidden_size, intermediate_size, num_experts)
        names = list(expert_names) if expert_names is not None else [f"expert_{i}" for i in range(num_experts)]
        self._check_names(names, num_experts)
        self.expert_names = names
        # (E,) bool buffer: False = frozen expert (no dW work); not saved in state dicts.
        self.register_buffer("trainable_experts", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self._all_trainable = True  # host-side mirror: forward never reads the buffer on the host
        # (self.backend, device, dtype, T bucket or None) -> concrete backend (resolved_backend)
        self._resolved_backends: dict = {}
        self.reset_parameters(init_std)

    # ------------------------------------------------------------------ basics
    @property
    def num_experts(self) -> int:
        return self.gate.weight.shape[0]

    @staticmethod
    def _check_names(names: Sequence[str], num_experts: int) -> None:
        if len(names) != num_experts:
            raise ValueError(f"expert_names must have {num_experts} entries, got {len(names)}")
        if any(not isinstance(n, str) or not n for n in names):
            raise ValueError(f"expert_names must be non-empty strings, got {list(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"expert_names must be unique, got {list(names)}")

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.experts.gate_up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=std)
        if self.gate.expert_bias is not None:
            self.gate.expert_bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}, "
            f"backend={self.backend!r}, expert_names={self.expert_names}"
        )

    def expert_index(self, name_or_index: str | int) -> int:
        """Index of an expert given its name or index; ``ValueError`` if unknown."""
        if isinstance(name_or_index, bool):
            raise TypeError("expert must be a name or an index, got a bool")
        if isinstance(name_or_index, int):
            if not 0 <= name_or_index < self.num_experts:
                raise ValueError(f"expert index {name_or_index} out of range for {self.num_experts} experts")
            return name_or_index
        if name_or_index not in self.expert_names:
            raise ValueError(f"unknown expert name {name_or_index!r}; known: {self.expert_names}")
        return self.expert_names.index(name_or_index)

    def set_trainable_experts(self, trainable: Sequence[str | int] | torch.Tensor) -> None:
        """Mark which experts get weight gradients (others are frozen: no dW work at all)."""
        if isinstance(trainable, torch.Tensor):
            check_tensor(trainable, "trainable", shape=(self.num_experts,), dtypes=(torch.bool,))
            mask = trainable.clone()
        else:
            mask = torch.zeros(self.num_experts, dtype=torch.bool)
            for item in trainable:
                mask[self.expert_index(item)] = True
        self._all_trainable = bool(mask.all())
        self.trainable_experts = mask.to(self.trainable_experts.device)

    # ------------------------------------------------------------------ forward
    def allow_mask(self, allowed_experts: AllowedExperts, lead_shape: Sequence[int], device) -> Optional[torch.Tensor]:
        """The (E,) or (T, E) bool mask for ``allowed_experts`` (see :mod:`.allow`)."""
        return resolve_allowed_experts(allowed_experts, self.expert_names, lead_shape, device)

    def resolved_backend(self, x_TD: torch.Tensor) -> str:
        """The concrete backend :meth:`forward` runs for the (T, D) input ``x_TD``.

        Resolved (:func:`~flexmoe_kernels.ops.backends.resolve_backend`: availability, and for
        ``"auto"`` the per-device choice) once per (``self.backend``, device, dtype) and, for
        ``"auto"`` on CUDA (a measured choice), per T bucket (T rounded up to a power of two);
        cached on the module, so a forward does no lookup and setting ``self.backend`` takes
        effect at the next call. While ``torch.compile`` traces, a cached choice is a constant
        of the graph and a missing one is resolved once at trace time, outside the traced
        region (nothing is measured then, see :mod:`~flexmoe_kernels.ops.backends`); with a
        dynamic T, "auto" on CUDA takes the static order.
        """
        device, T = x_TD.device, x_TD.shape[0]
        measured = self.backend == "auto" and device.type == "cuda" and not isinstance(T, torch.SymInt)
        bucket = 1 << (max(1, T) - 1).bit_length() if measured else None
        key = (self.backend, device, x_TD.dtype, bucket)
        name = self._resolved_backends.get(key)
        if name is None:
            name = _resolve(self.backend, device, x_TD.dtype, T if measured else None, self.hidden_size,
                            self.intermediate_size, self.num_experts, self.top_k)
            if not torch.compiler.is_compiling():  # a traced store would only force a recompile
                self._resolved_backends[key] = name
        return name

    def forward(
        self,
        x: torch.Tensor,
        allowed_experts: AllowedExperts = None,
        *,
        return_router_logits: bool = False,
        validate: bool = True,
    ):
        """Apply the MoE FFN.

        Args:
            x: (..., D) hidden states, e.g. (B, S, D) or (T, D).
            allowed_experts: None (all), names/indices (global), or a bool tensor of shape
                (E,), (B, E) (per sequence of a (B, S, D) input) or (T, E) (per token).
                Opted-out experts are removed exactly (logit -inf before the softmax) and
                their weights are never read. Every token must allow at least ``top_k``.
            return_router_logits: also return the (T, E) float32 masked logits (z-loss).
            validate: check here, once, that every row allows >= ``top_k`` experts
                (``ValueError`` naming the row): a name/index list on the host from its entries
                (no device sync), a tensor with one host sync (none under CUDA-graph capture;
                deferred to run time under ``torch.compile``). ``False``: no check, for a
                caller that has checked the mask already (the FlexOlmo model checks once per
                forward and passes ``validate=False`` to every layer); an invalid row then
                gives an unspecified result (``docs/SEMANTICS.md`` §2.5).

        Returns:
            (..., D) output, or ``(output, logits_TE)`` when ``return_router_logits``.
        """
        check_tensor(x, "x", floating=True)
        if x.ndim < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape (..., {self.hidden_size}), got {tuple(x.shape)}")
        if x.dtype != self.gate.weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's weights are {self.gate.weight.dtype}")
        lead = tuple(x.shape[:-1])
        x_TD = x.reshape(-1, self.hidden_size)
        mask = checked_allow_mask(allowed_experts, self.expert_names, lead, x.device, self.top_k, validate)
        backend = self.resolved_backend(x_TD)
        trainable = None if self._all_trainable else self.trainable_experts
        out_TD, logits_TE = flexmoe_forward(
            x_TD,
            self.gate.weight,
            self.experts.gate_up_proj,
            self.experts.down_proj,
            self.top_k,
            allow_mask=mask,
            expert_bias=self.gate.expert_bias,
            norm_topk_prob=self.norm_topk_prob,
            trainable_experts=trainable,
            validate=False,  # the rows were checked above (or the caller checked them)
            backend=backend,
        )
        out = out_TD.reshape(*lead, self.hidden_size)
        return (out, logits_TE) if return_router_logits else out

    # ------------------------------------------------------------------ editing experts
    @torch.no_grad()
    def add_expert(
        self,
        name: str,
        *,
        gate_up: Optional[torch.Tensor] = None,
        down: Optional[torch.Tensor] = None,
        router_embedding: Optional[torch.Tensor] = None,
        bias: float = 0.0,
        copy_from: Optional[str | int] = None,
    ) -> int:
        """Append an expert and return its index.

        Weights come from ``gate_up`` (2F, D) / ``down`` (D, F) / ``router_embedding`` (D,), or
        are copied from expert ``copy_from``, or are freshly initialised. The layer's parameters
        are replaced by new tensors: rebuild optimizers afterwards.
        """
        if name in self.expert_names:
            raise ValueError(f"an expert named {name!r} already exists")
        self._check_names(self.expert_names + [name], self.num_experts + 1)
        w = self.gate.weight
        Fw, D = self.intermediate_size, self.hidden_size
        src = self.expert_index(copy_from) if copy_from is not None else None
        if gate_up is None:
            gate_up = self.experts.gate_up_proj[src] if src is not None else torch.randn(2 * Fw, D, device=w.device) * 0.02
        if down is None:
            down = self.experts.down_proj[src] if src is not None else torch.randn(D, Fw, device=w.device) * 0.02
        if router_embedding is None:
            router_embedding = self.gate.weight[src] if src is not None else torch.randn(D, device=w.device) * 0.02
        check_tensor(gate_up, "gate_up", shape=(2 * Fw, D), floating=True)
        check_tensor(down, "down", shape=(D, Fw), floating=True)
        check_tensor(router_embedding, "router_embedding", shape=(D,), floating=True)

        def cat(p: torch.Tensor, row: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(torch.cat([p.data, row.to(p)[None]], 0), requires_grad=p.requires_grad)

        self.gate.weight = cat(self.gate.weight, router_embedding)
        if self.gate.expert_bias is not None:
            self.gate.expert_bias = cat(self.gate.expert_bias, torch.tensor(float(bias)))
        self.experts.gate_up_proj = cat(self.experts.gate_up_proj, gate_up)
        self.experts.down_proj = cat(self.experts.down_proj, down)
        self.trainable_experts = torch.cat([self.trainable_experts, self.trainable_experts.new_ones(1)])
        self.expert_names = self.expert_names + [name]
        return self.num_experts - 1

    @torch.no_grad()
    def remove_expert(self, name_or_index: str | int) -> None:
        """Physically remove an expert (its FFN, router row and bias). Rebuild optimizers afterwards."""
        i = self.expert_index(name_or_index)
        if self.num_experts - 1 < self.top_k:
            raise ValueError(
                f"cannot remove expert {self.expert_names[i]!r}: {self.num_experts - 1} experts would remain, "
                f"fewer than top_k={self.top_k}"
            )
        keep = [j for j in range(self.num_experts) if j != i]

        def sel(p: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(p.data[keep].clone(), requires_grad=p.requires_grad)

        self.gate.weight = sel(self.gate.weight)
        if self.gate.expert_bias is not None:
            self.gate.expert_bias = sel(self.gate.expert_bias)
        self.experts.gate_up_proj = sel(self.experts.gate_up_proj)
        self.experts.down_proj = sel(self.experts.down_proj)
        self.trainable_experts = self.trainable_experts[keep].clone()
        self._all_trainable = bool(self.trainable_experts.all())
        self.expert_names = [self.expert_names[j] for j in keep]

    def rename_expert(self, old: str | int, new: str) -> None:
        i = self.expert_index(old)
        names = list(self.expert_names)
        names[i] = new
        self._check_names(names, self.num_experts)
        self.expert_names = names
