"""Layer implementations compared by :mod:`benchmarks.bench_layer`.

Legend: T tokens, D hidden, F expert width, E experts, K top-k, P = T*K routed pairs.

Every provider turns shared random weights into ``fwd(x_TD, allow_mask) -> out`` plus the list
of parameters whose gradients it produces. MoE providers compute the whole layer (router GEMM,
masked softmax-top-k, experts, weighted combine); baselines compute what their name says:

* ``torch`` / ``triton`` / ``cuda``: ours, ``flexmoe_kernels.flexmoe_forward(backend=...)``,
  each only where ``flexmoe_kernels.backend_status`` says it is available.
* ``dense_swiglu``: a dense SwiGLU FFN of width K*F (equal active FLOPs, no router).
* ``cublas_gemm``: one GEMM (T, D) x (D, 3*K*F) of equal FLOPs: the ceiling.
* ``torch_grouped_mm``: the layer written with ``torch.nn.functional.grouped_mm`` (or
  ``torch._grouped_mm``): sort by expert, two grouped GEMMs, fp32 index_add combine.
* ``hf_eager`` / ``hf_grouped_mm``: ``transformers``' ``FlexOlmoSparseMoeBlock`` with
  ``config._experts_implementation`` "eager" (its per-expert loop) or "grouped_mm".
* ``megablocks_dmoe``: MegaBlocks' dMoE (GLU experts, grouped impl) when importable.
* ``liger_fused_moe``: Liger-Kernel's fused Triton MoE (``LigerFusedMoEFunction``: gather +
  grouped GEMM + SwiGLU, down projection, weighted gather-sum) behind our routing, when
  ``liger_kernel`` is importable; the GPU sweep checks it against the reference before timing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .presets import LayerPreset

OURS = ("torch", "triton", "cuda")


@dataclass
class LayerWeights:
    """Shared MoE weights for one preset (fresh random normal, std 0.02; never zeros)."""

    router_ED: torch.nn.Parameter
    gate_up_E2FD: torch.nn.Parameter
    down_EDF: torch.nn.Parameter

    @staticmethod
    def random(p: LayerPreset, device: torch.device, dtype: torch.dtype) -> "LayerWeights":
        def par(*shape):
            return torch.nn.Parameter(torch.randn(*shape, device=device, dtype=dtype) * 0.02)

        return LayerWeights(par(p.E, p.D), par(p.E, 2 * p.F, p.D), par(p.E, p.D, p.F))


@dataclass
class Built:
    """A ready-to-run provider: ``fwd(x_TD, allow_mask) -> out`` and its parameters."""

    fwd: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    params: list = field(default_factory=list)
    flops_fwd: Callable[[int], int] = lambda T: 0  # model FLOPs of one forward at T tokens
    weight_bytes_read: Callable[[int], int] = lambda experts_hit: 0  # fwd weight traffic
    # FLOPs a backward at T tokens re-runs beyond the model count (benchmarks/flops.py): the
    # gate/up GEMM of a backward that recomputes the pre-activation; 0 for autograd providers.
    recompute_bwd: Callable[[int], int] = lambda T: 0


@dataclass
class Provider:
    name: str
    label: str
    kind: str  # "ours" | "baseline"
    supports_mask: bool
    available: Callable[[torch.device], tuple[bool, str]]
    build: Callable[[LayerPreset, LayerWeights, torch.device, torch.dtype], Built]
    # Peer providers checked against the reference before the GPU sweep times them
    # (benchmarks/check.py): device -> fwd(x, router_weight, gate_up, down, K) -> (out, logits).
    check_fwd: Optional[Callable[[torch.device], Callable]] = None


def _moe_flops(p: LayerPreset) -> Callable[[int], int]:
    return lambda T: p.expert_flops(T) + p.router_flops(T)


def _moe_weight_bytes(p: LayerPreset, dtype: torch.dtype) -> Callable[[int], int]:
    elt = torch.empty((), dtype=dtype).element_size()
    return lambda hit: elt * (3 * p.D * p.F * hit + p.E * p.D)


# ----------------------------------------------------------------------------- ours
def _ours(name: str) -> Provider:
    def available(device):
        try:
            import flexmoe_kernels
        except ImportError as exc:  # pragma: no cover - the package is in the repo
            return False, f"cannot import flexmoe_kernels: {exc}"
        return flexmoe_kernels.backend_status(name, device)

    def build(p, w, device, dtype):
        from flexmoe_kernels import flexmoe_forward

        def fwd(x_TD, mask):
            return flexmoe_forward(x_TD, w.router_ED, w.gate_up_E2FD, w.down_EDF, p.K,
                                   allow_mask=mask, backend=name, validate=False)[0]

        def recompute(T):  # the Triton backward recomputes the pre-activation unless it is kept
            if name != "triton":
                return 0
            from .flops import triton_recomputes

            return p.recompute_flops(T) if triton_recomputes(T, p.D, p.F, p.E, p.K, dtype, device) else 0

        return Built(fwd, [w.router_ED, w.gate_up_E2FD, w.down_EDF], _moe_flops(p),
                     _moe_weight_bytes(p, dtype), recompute)

    return Provider(name, f"ours ({name})", "ours", True, available, build)


# ----------------------------------------------------------------------------- dense baselines
def _always(device):
    return True, "plain PyTorch"


def _build_dense_swiglu(p, w, device, dtype):
    width = p.K * p.F
    gate_up = torch.nn.Parameter(torch.randn(2 * width, p.D, device=device, dtype=dtype) * 0.02)
    down = torch.nn.Parameter(torch.randn(p.D, width, device=device, dtype=dtype) * 0.02)
    elt = gate_up.element_size()

    def fwd(x_TD, mask):
        g, u = F.linear(x_TD, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    return Built(fwd, [gate_up, down], lambda T: p.expert_flops(T),
                 lambda hit: elt * 3 * p.D * width)


def _build_gemm(p, w, device, dtype):
    w_DN = torch.nn.Parameter(torch.randn(p.D, 3 * p.K * p.F, device=device, dtype=dtype) * 0.02)
    elt = w_DN.element_size()

    def fwd(x_TD, mask):
        return x_TD @ w_DN

    return Built(fwd, [w_DN], lambda T: p.expert_flops(T), lambda hit: elt * w_DN.numel())


# ----------------------------------------------------------------------------- grouped_mm
def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    if fn is None:
        fn = getattr(torch, "_grouped_mm", None)
    return fn


def _grouped_mm_available(device):
    if _grouped_mm_fn() is None:
        return False, "torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    return True, "torch.nn.functional.grouped_mm" if hasattr(F, "grouped_mm") else "torch._grouped_mm"


def _build_grouped_mm(p, w, device, dtype):
    gmm = _grouped_mm_fn()
    K, E = p.K, p.E

    def fwd(x_TD, mask):
        T, D = x_TD.shape
        logits_TE = F.linear(x_TD, w.router_ED).float()
        if mask is not None:
            logits_TE = logits_TE.masked_fill(~mask, float("-inf"))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, K, dim=-1)
        flat_P = ids_TK.reshape(-1)
        order_P = torch.sort(flat_P, stable=True).indices
        offs_E = torch.cumsum(torch.bincount(flat_P, minlength=E), 0).to(torch.int32)
        token_P = torch.div(order_P, K, rounding_mode="floor")
        x_PD = x_TD.index_select(0, token_P)
        h_P2F = gmm(x_PD, w.gate_up_E2FD.transpose(1, 2), offs=offs_E)
        g_PF, u_PF = h_P2F.chunk(2, dim=-1)
        a_PF = (F.silu(g_PF) * u_PF).contiguous()
        y_PD = gmm(a_PF, w.down_EDF.transpose(1, 2), offs=offs_E)
        y_PD = y_PD.float() * weights_TK.reshape(-1).index_select(0, order_P)[:, None]
        out = torch.zeros(T, D, device=x_TD.device, dtype=torch.float32).index_add(0, token_P, y_PD)
        return out.to(x_TD.dtype)

    return Built(fwd, [w.router_ED, w.gate_up_E2FD, w.down_EDF], _moe_flops(p),
                 _moe_weight_bytes(p, dtype))


# ----------------------------------------------------------------------------- transformers
def _hf_available(impl: str):
    def available(device):
        try:
            from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoSparseMoeBlock  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return False, f"transformers FlexOlmo not importable: {exc}"
        if impl != "eager":
            try:
                from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
            except Exception as exc:  # noqa: BLE001
                return False, f"transformers has no experts implementations: {exc}"
            if impl not in ALL_EXPERTS_FUNCTIONS:
                return False, f"transformers has no experts_implementation {impl!r}"
        return True, f"transformers FlexOlmoSparseMoeBlock, experts_implementation={impl}"

    return available


def _hf_build(impl: str):
    def build(p, w, device, dtype):
        from transformers import FlexOlmoConfig
        from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoSparseMoeBlock

        cfg = FlexOlmoConfig(hidden_size=p.D, intermediate_size=p.F, num_experts=p.E,
                             num_experts_per_tok=p.K, norm_topk_prob=False)
        cfg._experts_implementation = impl
        with torch.device("meta"):
            blk = FlexOlmoSparseMoeBlock(cfg)
        # Share the benchmark's weights (same HF layout), no copy.
        blk.gate.weight = w.router_ED
        blk.experts.gate_up_proj = w.gate_up_E2FD
        blk.experts.down_proj = w.down_EDF
        blk.to(device)

        def fwd(x_TD, mask):
            return blk(x_TD[None])[0]

        return Built(fwd, [w.router_ED, w.gate_up_E2FD, w.down_EDF], _moe_flops(p),
                     _moe_weight_bytes(p, dtype))

    return build


# ----------------------------------------------------------------------------- megablocks
def _mb_available(device):
    try:
        importlib.import_module("megablocks.layers.dmoe")
    except Exception as exc:  # noqa: BLE001
        return False, f"megablocks not importable: {exc}"
    if device.type != "cuda":
        return False, "megablocks needs CUDA"
    return True, "megablocks dMoE (glu, grouped)"


def _mb_build(p, w, device, dtype):
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    args = Arguments(
        hidden_size=p.D, ffn_hidden_size=p.F, moe_num_experts=p.E, moe_top_k=p.K,
        mlp_type="glu", mlp_impl="grouped", activation_fn=F.silu, return_bias=False,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, device=device,
        init_method=lambda t: torch.nn.init.normal_(t, std=0.02),
        output_layer_init_method=lambda t: torch.nn.init.normal_(t, std=0.02),
    )
    layer = dMoE(args).to(device=device, dtype=dtype)

    def fwd(x_TD, mask):
        out = layer(x_TD[:, None, :])
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(x_TD.shape)

    return Built(fwd, list(layer.parameters()), _moe_flops(p), _moe_weight_bytes(p, dtype))


# ----------------------------------------------------------------------------- Liger-Kernel
LIGER_VERSION = "0.8.5"  # the wheel prepare_gpu_session.sh carries (pure Python, 0.9 MB)


def _liger_fn():
    """Liger-Kernel's fused MoE autograd op (``liger_kernel.ops.fused_moe.LigerFusedMoEFunction``).
    Under Triton's interpreter its autotuner cannot benchmark (no driver): there
    ``LIGER_FUSED_MOE_AUTOTUNE=0`` (one config per kernel) must be set before the import."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    return LigerFusedMoEFunction


def _liger_available(device):
    import os

    try:
        fn = _liger_fn()
    except Exception as exc:  # noqa: BLE001
        return False, f"liger_kernel not importable: {type(exc).__name__}: {exc}"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "Liger's Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)"
    from importlib.metadata import version

    return True, f"liger_kernel {version('liger-kernel')} {fn.__module__}.{fn.__name__}"


def liger_layer(K: int, fn=None):
    """Our layer with Liger's fused MoE as the expert stage: ``fwd(x, router_weight, gate_up,
    down, K-ignored, allow_mask=None) -> (out, logits)``. Routing as ours (logits ``x @ R.T`` in
    x's dtype, opted-out experts -inf, float32 softmax, top-k, the K probabilities as weights, in
    float32); experts and combine are ``LigerFusedMoEFunction(x, gate_up (E, 2F, D), down
    (E, D, F), ids int32, weights)`` (the same HF weight layout; its backward keeps the
    pre-activation: no recompute)."""
    fn = fn or _liger_fn()

    def fwd(x_TD, router_ED, gate_up_E2FD, down_EDF, k=K, allow_mask=None):
        from flexmoe_kernels import router_logits

        logits = router_logits(x_TD, router_ED).float()
        if allow_mask is not None:
            logits = logits.masked_fill(~allow_mask, float("-inf"))
        weights_TK, ids_TK = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
        out = fn.apply(x_TD, gate_up_E2FD, down_EDF, ids_TK.to(torch.int32), weights_TK)
        return out, logits

    return fwd


def _liger_build(p, w, device, dtype):
    layer = liger_layer(p.K)

    def fwd(x_TD, mask):
        return layer(x_TD, w.router_ED, w.gate_up_E2FD, w.down_EDF, p.K, mask)[0]

    return Built(fwd, [w.router_ED, w.gate_up_E2FD, w.down_EDF], _moe_flops(p), _moe_weight_bytes(p, dtype))


def _liger_check_fwd(device):
    layer = liger_layer(0)
    return lambda x, r, gu, dn, k: layer(x, r, gu, dn, k)


# ----------------------------------------------------------------------------- registry
PROVIDERS: dict[str, Provider] = {
    pr.name: pr
    for pr in [
        _ours("torch"),
        _ours("triton"),
        _ours("cuda"),
        Provider("dense_swiglu", "dense SwiGLU (width K*F)", "baseline", False, _always, _build_dense_swiglu),
        Provider("cublas_gemm", "dense GEMM of equal FLOPs (cuBLAS)", "baseline", False, _always, _build_gemm),
        Provider("torch_grouped_mm", "torch grouped_mm MoE", "baseline", True, _grouped_mm_available,
                 _build_grouped_mm),
        Provider("hf_eager", "transformers FlexOlmo (eager loop)", "baseline", False, _hf_available("eager"),
                 _hf_build("eager")),
        Provider("hf_grouped_mm", "transformers FlexOlmo (grouped_mm)", "baseline", False,
                 _hf_available("grouped_mm"), _hf_build("grouped_mm")),
        Provider("megablocks_dmoe", "MegaBlocks dMoE", "baseline", False, _mb_available, _mb_build),
        Provider("liger_fused_moe", "Liger-Kernel fused MoE (our routing)", "baseline", True, _liger_available,
                 _liger_build, check_fwd=_liger_check_fwd),
    ]
}
