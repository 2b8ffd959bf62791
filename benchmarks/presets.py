"""Named shapes: MoE layer presets, token counts and end-to-end model sizes.

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerPreset:
    """One MoE layer shape (SwiGLU experts, HF layout gate_up (E, 2F, D), down (E, D, F))."""

    name: str
    D: int
    F: int
    E: int
    K: int
    note: str = ""

    def expert_flops(self, T: int) -> int:
        """Active expert FLOPs of one forward: T*K*(2*D*2F + 2*F*D) = 6*T*K*D*F
        (:func:`benchmarks.flops.expert_fwd`)."""
        from .flops import expert_fwd

        return expert_fwd(T, self.D, self.F, self.K)

    def router_flops(self, T: int) -> int:
        """Router GEMM FLOPs of one forward: 2*T*D*E (:func:`benchmarks.flops.router_fwd`)."""
        from .flops import router_fwd

        return router_fwd(T, self.D, self.E)

    def recompute_flops(self, T: int) -> int:
        """The gate/up GEMM a backward re-runs without the kept pre-activation: 4*T*K*D*F
        (:func:`benchmarks.flops.recompute_bwd`)."""
        from .flops import recompute_bwd

        return recompute_bwd(T, self.D, self.F, self.K)


LAYER_PRESETS: dict[str, LayerPreset] = {
    p.name: p
    for p in [
        LayerPreset("flexolmo-7x7b", 4096, 11008, 7, 5, "released FlexOlmo-7x7B (OLMo-2 7B experts)"),
        LayerPreset("flexolmo-8x7b", 4096, 11008, 8, 4, "paper's 8x7B (37B total, 20B active)"),
        LayerPreset("olmoe-1b-7b", 2048, 1024, 64, 8, "OLMoE-1B-7B"),
        LayerPreset("mixtral-8x7b", 4096, 14336, 8, 2, "Mixtral-8x7B"),
        LayerPreset("fine-grained", 2048, 768, 128, 8, "128 experts top-8 (Liger/SonicMoE comparison shape)"),
        # Tiny shape for the CPU smoke mode (dims multiples of 16 so grouped_mm accepts them).
        LayerPreset("smoke", 64, 32, 8, 2, "tiny CPU smoke shape: numbers mean nothing"),
    ]
}

FULL_PRESETS = ["flexolmo-7x7b", "flexolmo-8x7b", "olmoe-1b-7b", "mixtral-8x7b", "fine-grained"]

# Token counts: decode batches and training micro-batches (tokens per layer call).
TOKENS_DECODE = [1, 16, 64, 256]
TOKENS_TRAIN = [4096, 16384, 65536]
TOKENS_FULL = TOKENS_DECODE + TOKENS_TRAIN
TOKENS_SMOKE = [1, 37]

# Allow-mask variants for the opt-out sweeps (see bench_layer.make_mask).
MASKS_FULL = ["none", "token_all", "token_mixed", "global:0.25", "global:0.5"]
MASKS_SMOKE = ["none", "token_all", "token_mixed", "global:0.25"]


@dataclass(frozen=True)
class E2EPreset:
    """End-to-end model size: backbone + per-expert FFN width F; dense baseline uses K*F."""

    name: str
    vocab: int
    D: int
    L: int
    heads: int
    kv_heads: int
    F: int  # per-expert width
    seq: int
    batch: int  # micro-batch (sequences)
    E_std: int  # experts of the standard MoE baseline
    K: int  # top-k of every MoE (FlexOlmo coupled training: 2 of 2)
    steps: int
    warmup: int


E2E_PRESETS: dict[str, E2EPreset] = {
    p.name: p
    for p in [
        E2EPreset("e2e-smoke", 256, 64, 2, 4, 4, 64, 32, 2, 4, 2, steps=2, warmup=1),
        E2EPreset("e2e-small", 50304, 1024, 8, 16, 16, 2816, 2048, 8, 8, 2, steps=10, warmup=3),
        E2EPreset("e2e-1b", 100352, 2048, 16, 16, 16, 8192, 2048, 4, 8, 2, steps=10, warmup=3),
    ]
}

E2E_MODELS = ["dense", "moe", "moe2_full", "flexolmo_coupled"]
