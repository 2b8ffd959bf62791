"""Layer benchmark: fwd, bwd, fwd+bwd and peak memory of one MoE layer per provider.

Legend: T tokens, D hidden, F expert width, E experts, K top-k.

FLOPs per call (:mod:`benchmarks.flops`, the one place they are computed): ``flops`` = model
FLOPs, forward of a MoE layer = ``6*T*K*D*F`` (expert GEMMs: gate_up 2*T*K*D*2F plus down
2*T*K*F*D) ``+ 2*T*D*E`` (router); the dense baselines (width K*F, and the equal-FLOPs GEMM)
count ``6*T*K*D*F``. Backward = 2x forward (dX and dW GEMMs), fwd+bwd = 3x.
``tflops = flops / time`` and ``mfu = tflops / peak`` (CUDA, known peak) use model FLOPs;
``flops_executed`` / ``tflops_executed`` add what the implementation re-runs (our Triton
backward's gate/up recompute, ``4*T*K*D*F``, unless ``up.keep_preact``). Element-wise work
(softmax, SiLU, combine) is not counted. Masked rows keep the same FLOPs (every token still
uses K experts).

Bytes (``bytes`` / ``gbps``, forward rows only): the minimum HBM traffic of one forward,
``elt * (3*D*F*experts_hit + E*D + 2*T*D)`` for MoE providers (weights of the experts that
received tokens, router, x read once, out written once); dense providers count their own
weights. Meaningful for decode (memory-bound) shapes. MegaBlocks has its own router weights;
its ``experts_hit`` is the expected ``min(E, T*K)``.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from . import harness
from .flops import MODE_FACTOR, layer_flops
from .presets import LAYER_PRESETS, LayerPreset
from .providers import OURS, PROVIDERS, LayerWeights

MODES = ["fwd", "bwd", "fwd_bwd", "memory"]
MASK_MODES = ("fwd", "fwd_bwd")  # masked variants are timed in these modes only
GEMM_FACTOR = MODE_FACTOR  # forward FLOP passes per call (benchmarks/flops.py)


def parse_mask(variant: str) -> tuple[str, float]:
    """'none' | 'token_all' | 'token_mixed' | 'global:FRACTION' -> (kind, fraction)."""
    if variant in ("none", "token_all", "token_mixed"):
        return variant, 0.0
    if variant.startswith("global:"):
        try:
            frac = float(variant.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--masks entry {variant!r}: expected global:FRACTION, e.g. global:0.25") from None
        if not 0.0 < frac < 1.0:
            raise ValueError(f"--masks entry {variant!r}: FRACTION must be in (0, 1)")
        return "global", frac
    raise ValueError(
        f"--masks entry {variant!r} is not one of none, token_all, token_mixed, global:FRACTION"
    )


def mask_applicable(variant: str, p: LayerPreset) -> bool:
    """False when the preset cannot express the variant (E == K leaves nothing to mask)."""
    kind, frac = parse_mask(variant)
    if kind == "global":
        return min(round(frac * p.E), p.E - p.K) >= 1
    if kind == "token_mixed":
        return p.E - p.K >= 1
    return True


def make_mask(variant: str, T: int, p: LayerPreset, device: torch.device) -> Optional[torch.Tensor]:
    """A fresh random allow-mask for ``variant`` (False = opted out; every row allows >= K).

    * ``none``: no mask.  * ``token_all``: a (T, E) all-True mask (pure masking overhead).
    * ``token_mixed``: (T, E), each token drawn from 4 permission profiles (all experts, and
      three profiles each opting out a random ~E/4 of experts 1..E-1): mixed users in one batch.
    * ``global:f``: (E,), round(f*E) random experts among 1..E-1 opted out (expert 0, the
      public expert, always allowed), capped so that K stay allowed.
    """
    kind, frac = parse_mask(variant)
    E, K = p.E, p.K
    if kind == "none":
        return None
    if kind == "token_all":
        return torch.ones(T, E, dtype=torch.bool, device=device)
    if kind == "global":
        n = min(round(frac * E), E - K)
        mask = torch.ones(E, dtype=torch.bool)
        mask[1 + torch.randperm(E - 1)[:n]] = False
        return mask.to(device)
    n = max(1, min(E - K, round(E / 4)))
    profiles = torch.ones(4, E, dtype=torch.bool)
    for i in range(1, 4):
        profiles[i, 1 + torch.randperm(E - 1)[:n]] = False
    which = torch.randint(0, 4, (T,))
    return profiles[which].to(device)


@dataclass
class LayerJob:
    preset: str
    T: int
    provider: str
    mask: str
    mode: str


def plan_jobs(presets, tokens, providers, masks, modes) -> list[LayerJob]:
    """All (preset, T, provider, mask, mode) measurements; mask variants only for providers
    that take an allow-mask and only in ``MASK_MODES``."""
    jobs = []
    for name in presets:
        p = LAYER_PRESETS[name]
        for T in tokens:
            for prov in providers:
                pr = PROVIDERS[prov]
                for m in masks:
                    if m != "none" and not pr.supports_mask:
                        continue
                    if not mask_applicable(m, p):
                        continue
                    for mode in modes:
                        if m != "none" and mode not in MASK_MODES:
                            continue
                        jobs.append(LayerJob(name, T, prov, m, mode))
    return jobs


class _Case:
    """Inputs for one (preset, T, provider, mask): rotated random buffer sets."""

    def __init__(self, built, p, T, mask, device, dtype, n_sets):
        self.built = built
        self.xs = [torch.randn(T, p.D, device=device, dtype=dtype).requires_grad_() for _ in range(n_sets)]
        self.masks = [make_mask(mask, T, p, device) for _ in range(n_sets)]
        with torch.no_grad():
            probe = built.fwd(self.xs[0], self.masks[0])
        self.gs = [torch.randn_like(probe) for _ in range(n_sets)]
        self.out_bytes = probe.numel() * probe.element_size()
        self.i = 0

    def next(self) -> int:
        self.i = (self.i + 1) % len(self.xs)
        return self.i


MOE_BASELINES = ("torch_grouped_mm", "hf_eager", "hf_grouped_mm", "megablocks_dmoe", "liger_fused_moe")


def _experts_hit(p: LayerPreset, router_ED: torch.Tensor, x_TD: torch.Tensor, mask) -> int:
    """Experts that receive >= 1 token under the reference routing (their weights are read)."""
    from flexmoe_kernels import route_hidden

    with torch.no_grad():
        plan = route_hidden(x_TD.detach(), router_ED.detach(), p.K, allow_mask=mask)
    return int((plan.counts_E > 0).sum())


def run_layer(jobs: list[LayerJob], device: torch.device, dtype: torch.dtype, rec: harness.Recorder,
              timing: harness.TimingConfig, show_progress: bool = True,
              l2_bytes: int = harness.DEFAULT_L2_BYTES, peak: Optional[float] = None) -> None:
    """Run ``jobs`` (grouped so weights are built once per preset), appending rows to ``rec``.
    ``peak``: dense peak FLOP/s for ``mfu`` (default :func:`harness.peak_flops`; None on CPU)."""
    if peak is None:
        peak = harness.peak_flops(device)
    weights: dict[str, LayerWeights] = {}
    built: dict[tuple[str, str], object] = {}
    status: dict[str, tuple[bool, str]] = {}
    case_key = None
    case = None
    elt = torch.empty((), dtype=dtype).element_size()

    for job in harness.progress(jobs, len(jobs), "layer", show_progress):
        p = LAYER_PRESETS[job.preset]
        base = dict(bench="layer", preset=p.name, provider=job.provider,
                    label=PROVIDERS[job.provider].label, kind=PROVIDERS[job.provider].kind,
                    mode=job.mode, mask=job.mask, T=job.T, D=p.D, F=p.F, E=p.E, K=p.K,
                    dtype=str(dtype).replace("torch.", ""))
        if job.provider not in status:
            status[job.provider] = PROVIDERS[job.provider].available(device)
        ok, why = status[job.provider]
        if not ok:
            rec.add(**base, status="skipped", note=why)
            continue
        try:
            if job.preset not in weights:
                weights.clear()
                built.clear()
                case = case_key = None
                harness.free_memory(device)
                weights[job.preset] = LayerWeights.random(p, device, dtype)
            w = weights[job.preset]
            bkey = (job.preset, job.provider)
            if bkey not in built:
                built[bkey] = PROVIDERS[job.provider].build(p, w, device, dtype)
            b = built[bkey]
            key = (job.preset, job.T, job.provider, job.mask)
            if key != case_key:
                case = None
                harness.free_memory(device)
                n_sets = harness.num_buffer_sets(2 * job.T * p.D * elt, l2_bytes)
                case = _Case(b, p, job.T, job.mask, device, dtype, n_sets)
                n_sets = min(n_sets, harness.num_buffer_sets(2 * case.out_bytes, l2_bytes))
                del case.xs[n_sets:], case.masks[n_sets:], case.gs[n_sets:]
                case_key = key
            row = _measure(job, p, b, case, device, timing)
            fl = layer_flops(job.mode, b.flops_fwd(job.T), b.recompute_bwd(job.T))
            if row.get("ms"):
                row["tflops"] = fl.model / (row["ms"] * 1e-3) / 1e12
                row["tflops_executed"] = fl.executed / (row["ms"] * 1e-3) / 1e12
                row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
            row["flops"] = fl.model
            row["flops_executed"] = fl.executed
            if job.mode == "fwd":
                if job.provider == "megablocks_dmoe":  # its own router weights: expected count
                    hit = min(p.E, job.T * p.K)
                elif PROVIDERS[job.provider].kind == "ours" or job.provider in MOE_BASELINES:
                    hit = _experts_hit(p, w.router_ED, case.xs[0], case.masks[0])
                else:
                    hit = 0
                nbytes = b.weight_bytes_read(hit) + elt * job.T * p.D + case.out_bytes
                row["bytes"] = nbytes
                row["gbps"] = nbytes / (row["ms"] * 1e-3) / 1e9
                row["experts_hit"] = hit
            row["n_buffers"] = len(case.xs)
            rec.add(**base, **row)
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not stop the run
            rec.log(traceback.format_exc())
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if harness.is_oom(exc):
                msg = "out of memory: " + msg
                case = case_key = None
            rec.add(**base, status="error", note=msg)
            for bb in built.values():  # a failed backward may leave weight gradients behind
                for t in bb.params:
                    t.grad = None
            harness.free_memory(device)


def _activation_bytes(p: LayerPreset, T: int, elt: int) -> int:
    """Rough bytes a MoE layer saves for backward: gathered x, gate/up, activation (per pair)."""
    return T * p.K * (p.D + 3 * p.F) * elt


def _measure(job: LayerJob, p: LayerPreset, b, case: _Case, device, timing) -> dict:
    xs, masks, gs = case.xs, case.masks, case.gs
    params = [t for t in b.params if t.requires_grad]
    if job.mode == "fwd":
        def fn():
            i = case.next()
            with torch.no_grad():
                return b.fwd(xs[i], masks[i])

        t = harness.bench(fn, device, timing)
    elif job.mode in ("fwd_bwd", "memory"):
        def fn():
            i = case.next()
            b.fwd(xs[i], masks[i]).backward(gs[i])

        if job.mode == "memory":
            if device.type != "cuda":
                return dict(status="skipped", note="peak memory is measured on CUDA only")
            fn()  # warm-up: compilation / autotuning buffers must not count
            for q in params + xs:
                q.grad = None
            peak = harness.peak_memory_mb(fn, device)
            for q in params + xs:
                q.grad = None
            note = "peak MiB allocated during one fwd+bwd beyond inputs and weights"
            if peak is None:
                return dict(status="skipped", note="peak memory is measured on CUDA only")
            return dict(peak_mem_mb=peak, note=note)
        t = harness.bench(fn, device, timing, grad_to_none=params + xs)
    elif job.mode == "bwd":
        # Each retained graph holds the layer's activations: keep two only when they are small.
        n = min(len(xs), 2 if _activation_bytes(p, len(xs[0]), xs[0].element_size()) < 4 * 2**30 else 1)
        outs = [b.fwd(xs[i], masks[i]) for i in range(n)]
        state = {"i": 0}

        def fn():
            state["i"] = (state["i"] + 1) % n
            outs[state["i"]].backward(gs[state["i"]], retain_graph=True)

        t = harness.bench(fn, device, timing, grad_to_none=params + xs)
        del outs
    else:
        raise ValueError(f"mode must be one of {MODES}, got {job.mode!r}")
    for q in params + xs:
        q.grad = None
    return dict(ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, n_calls=t.n)


def ours_available(device: torch.device) -> list[str]:
    return [n for n in OURS if PROVIDERS[n].available(device)[0]]
