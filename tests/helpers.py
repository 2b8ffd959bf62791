"""Helpers shared by the op tests (``from helpers import ...``; tests/ is on sys.path).

Legend: T tokens, D hidden, F expert width, E experts, K top-k, P = T*K routed pairs.

* :data:`TOLERANCES` / :func:`tol`: the (atol, rtol) table per dtype;
* :func:`poison_`: fill a buffer with NaN / INT_MAX so unwritten elements fail;
* :func:`make_mask`: the one allow-mask generator (None / "global" / "token" / "sequence");
* :func:`reference_layer` (with :func:`reference_experts`): the one readable per-token
  reference of the layer, in float64, differentiable;
* :func:`make_problem`, :func:`run_layer`, :func:`run_reference64`: random layer inputs,
  forward + backward of one backend, and of the float64 reference;
* :func:`assert_matches_reference`: the one pass rule per dtype for a backend's result
  against the float64 reference;
* :func:`interpreter_unsupported` / :func:`is_interpreter_failure`: the interpreter tier's skip
  where Triton < 3.7 meets NumPy >= 2.4 (conftest turns such failures into skips with the reason).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import flexmoe_kernels as fk

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAD_NAMES = ("x", "router_weight", "expert_bias", "gate_up", "down")

# ----------------------------------------------------------------------------- interpreter tier
# Triton < 3.7's interpreter cannot use a runtime scalar as a ``range`` bound with NumPy >= 2.4
# (the GEMM kernels' k-loops in grouped_gemm_kernels.py / grouped_gemm_bwd_kernels.py; the GPU
# image has Triton 3.6 with NumPy 2.5). Fixed in Triton 3.7.
INTERPRETER_BROKEN_FILES = ("grouped_gemm_kernels.py", "grouped_gemm_bwd_kernels.py")


def _version_tuple(text: str) -> tuple:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def interpreter_unsupported(triton_version: Optional[str] = None, numpy_version: Optional[str] = None) -> Optional[str]:
    """Why Triton's interpreter cannot run our grouped GEMM kernels with these versions (default:
    the installed ones), or None when it can."""
    try:
        import numpy
        import triton
    except ImportError:
        return None
    tv, nv = triton_version or triton.__version__, numpy_version or numpy.__version__
    if _version_tuple(tv) < (3, 7) and _version_tuple(nv) >= (2, 4):
        return (f"Triton {tv}'s interpreter fails on {INTERPRETER_BROKEN_FILES[0]} with NumPy {nv} (a runtime "
                "scalar as a range bound; fixed in Triton 3.7): the interpreter tier needs Triton >= 3.7 or "
                "NumPy < 2.4; the compiled GPU tier covers these kernels")
    return None


def is_interpreter_failure(exc: BaseException) -> bool:
    """True when ``exc`` was raised while Triton's interpreter ran one of
    :data:`INTERPRETER_BROKEN_FILES` (an ``InterpreterError``, or a traceback through them)."""
    import traceback

    if type(exc).__name__ == "InterpreterError":
        return True
    seen = exc
    while seen is not None:
        if any(f.filename.endswith(INTERPRETER_BROKEN_FILES) for f in traceback.extract_tb(seen.__traceback__)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# ----------------------------------------------------------------------------- tolerances
# (atol, rtol) per dtype. assert_matches_reference uses it for float32 / float64 results;
# 16-bit results are judged against torch's own error instead (see there).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    """``{"atol": ..., "rtol": ...}`` for ``torch.testing.assert_close`` from the table."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a buffer with NaN (floats) or a huge sentinel (ints) so unwritten elements fail."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


# ----------------------------------------------------------------------------- the pass rule
def assert_matches_reference(
    got: torch.Tensor,
    ref64: torch.Tensor,
    got_dtype: torch.dtype,
    what: str,
    torch_low: Optional[torch.Tensor] = None,
    *,
    ulp_slack: bool = True,
) -> None:
    """The one pass rule for a backend's result ``got`` of a computation run in ``got_dtype``
    against the float64 reference ``ref64``:

    * float32 / float64: ``assert_close`` with the :data:`TOLERANCES` entry of ``got_dtype``
      (non-finite values must match exactly, e.g. the -inf of masked logits);
    * float16 / bfloat16: no worse than twice torch's own error in that dtype,
      ``max|got - ref64| <= 2 * max|torch_low - ref64| + 1e-5 (+ one ulp)``, where
      ``torch_low`` is the "torch" backend's result of the same computation in ``got_dtype``.
      The tolerance table does not fit here: the torch path rounds its intermediates (the
      SwiGLU activations, the weight / router gradients summed over tokens) through 16 bits
      and differs from an equally good kernel by more than the table. At tiny shapes the
      maximum error is a single rounding event, so ``ulp_slack`` adds one ulp (of ``got``'s
      storage dtype) of the largest reference value; a real bug is O(value), not O(ulp).
    """
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref64.shape)}"
    ref64 = ref64.to(got.device)
    torch_low = None if torch_low is None else torch_low.to(got.device)
    if got_dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got.double(), ref64.double(), **tol(got_dtype), msg=lambda m: f"{what}: {m}")
        return
    if torch_low is None:
        raise ValueError(f"{what}: a {got_dtype} result needs torch_low (torch's own result in that dtype)")
    assert bool(torch.isfinite(got).all()), f"{what}: not finite"
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    err_torch = (torch_low.double() - ref64).abs().max().item() if got.numel() else 0.0
    slack = torch.finfo(got.dtype).eps * ref64.abs().max().item() if ulp_slack and got.numel() else 0.0
    assert err <= 2 * err_torch + 1e-5 + slack, (
        f"{what}: error {err:.3g} vs torch's own {err_torch:.3g} (float64 reference, slack {slack:.2g})"
    )


# ----------------------------------------------------------------------------- masks
def make_mask(
    kind: Optional[str],
    T: int,
    E: int,
    K: int,
    *,
    device: torch.device | str = DEVICE,
    generator: Optional[torch.Generator] = None,
    opted_out: Sequence[int] = (),
) -> Optional[torch.Tensor]:
    """A random allow-mask in which every token allows >= K experts.

    kind: None (no mask; a global mask if ``opted_out`` is given); "global": (E,) with
    ``max(K, E-2)`` experts on; "token": (T, E) with ~60% on per row; "sequence": (T, E) made
    of up to 3 sequences of consecutive tokens (one random row each, as
    :func:`flexmoe_kernels.expand_sequence_mask` gives). ``opted_out``: experts that are off
    for every token (they must leave >= K experts). Rows are topped up to K allowed experts
    with random ones (never from ``opted_out``).
    """
    off = torch.zeros(E, dtype=torch.bool)
    off[list(opted_out)] = True
    if E - int(off.sum()) < K:
        raise ValueError(f"opted_out={list(opted_out)} leaves fewer than K={K} of E={E} experts")
    if kind is None and not len(opted_out):
        return None
    if kind in (None, "global"):
        n_on = E if kind is None else max(K, E - 2)
        rows = torch.zeros(1, E, dtype=torch.bool)
        rows[0, torch.randperm(E, generator=generator)[:n_on]] = True
    elif kind == "token":
        rows = torch.rand(T, E, generator=generator) < 0.6
    elif kind == "sequence":
        rows = torch.rand(min(3, max(T, 1)), E, generator=generator) < 0.6  # one row per sequence
    else:
        raise ValueError(f"kind must be None, 'global', 'token' or 'sequence', got {kind!r}")
    rows = rows & ~off
    for r in range(rows.shape[0]):  # top up rows that allow fewer than K experts
        need = K - int(rows[r].sum())
        if need > 0:
            cand = (~rows[r] & ~off).nonzero().flatten()
            rows[r, cand[torch.randperm(len(cand), generator=generator)[:need]]] = True
    if kind == "sequence":  # consecutive tokens share their sequence's row
        seq_len = -(-T // rows.shape[0])
        rows = rows.repeat_interleave(seq_len, 0)[:T]
    m = rows[0] if kind in (None, "global") else rows
    return m.to(device)


# ----------------------------------------------------------------------------- the reference
def reference_experts(
    x_TD: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    trainable_experts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * down_e @ (silu(gate_e @ x_t) * (up_e @ x_t))``, ``e = ids[t,k]``,
    one token and slot at a time, in float64 (differentiable). Only the chosen experts'
    weights are read; frozen experts (``trainable_experts[e] == False``) are detached."""
    T, K = ids_TK.shape
    Fw = down_EDF.shape[2]
    x64, gu, dn, w = x_TD.double(), gate_up_E2FD.double(), down_EDF.double(), weights_TK.double()
    rows = []
    for t in range(T):
        row = torch.zeros(x_TD.shape[1], dtype=torch.float64, device=x_TD.device)
        for k in range(K):
            e = int(ids_TK[t, k])
            W1, W2 = gu[e], dn[e]
            if trainable_experts is not None and not bool(trainable_experts[e]):
                W1, W2 = W1.detach(), W2.detach()
            h = F.silu(W1[:Fw] @ x64[t]) * (W1[Fw:] @ x64[t])
            row = row + w[t, k] * (W2 @ h)
        rows.append(row)
    return torch.stack(rows) if rows else x64.new_zeros(0, x_TD.shape[1])


def reference_layer(
    x_TD: torch.Tensor, router_weight_ED: torch.Tensor, gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor,
    top_k: int, *, allow_mask: Optional[torch.Tensor] = None, expert_bias: Optional[torch.Tensor] = None,
    norm_topk_prob: bool = False, trainable_experts: Optional[torch.Tensor] = None,
    route_logits: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable FlexOlmo MoE layer, one token at a time, in float64 (differentiable):
    ``(out_TD, logits_TE)``.

    For token t: z_e = x_t . R_e + min(b_e, 0) for the allowed experts only (opted-out
    experts' router rows, biases and FFN weights are never read); softmax over the allowed
    experts; the K largest (exact ties to the lower expert id) with their probabilities as
    weights (renormalised iff ``norm_topk_prob``); out_t = sum_k w_k * expert_k(x_t).
    ``logits_TE`` holds z, -inf where disallowed.

    ``route_logits``: optional (T, E) logits as a backend computes them (``x @ R.T`` in x's
    dtype, + ``min(b, 0)`` in float32); their values are used straight-through (the gradient
    is the float64 one), so no top-k choice flips between a low-precision run and this.
    """
    T, _ = x_TD.shape
    E = gate_up_E2FD.shape[0]
    x64, R = x_TD.double(), router_weight_ED.double()
    b = expert_bias.double() if expert_bias is not None else None
    allow = None if allow_mask is None else allow_mask.expand(T, E).cpu()
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=x_TD.device)
    ids, weights, logit_rows = [], [], []
    for t in range(T):
        allowed = [e for e in range(E) if allow is None or bool(allow[t, e])]
        z = {}
        for e in allowed:
            v = x64[t] @ R[e]
            if b is not None:
                v = v + b[e].clamp(max=0)
            if route_logits is not None:
                v = v + (route_logits[t, e].double() - v).detach()
            z[e] = v
        probs = dict(zip(allowed, torch.softmax(torch.stack([z[e] for e in allowed]), 0)))
        chosen = sorted(allowed, key=lambda e: (-float(z[e].detach()), e))[:top_k]
        w = [probs[e] for e in chosen]
        if norm_topk_prob:
            total = sum(w)
            w = [v / total for v in w]
        ids.append(chosen)
        weights.append(torch.stack(w))
        logit_rows.append(torch.stack([z.get(e, neg_inf) for e in range(E)]))
    if T == 0:
        return x64.new_zeros(0, x_TD.shape[1]), x64.new_zeros(0, E)
    out = reference_experts(x64, torch.tensor(ids), torch.stack(weights), gate_up_E2FD, down_EDF,
                            trainable_experts)
    return out, torch.stack(logit_rows)


def backend_logits(p: dict) -> torch.Tensor:
    """(T, E) float32 logits as every backend computes them: ``x @ R.T`` in x's dtype, then
    ``+ min(b, 0)`` in float32 (opted-out columns are not meaningful)."""
    z = fk.router_logits(p["x"], p["router_weight"]).float()
    if p.get("expert_bias") is not None:
        z = z + p["expert_bias"].float().clamp(max=0)
    return z


# ----------------------------------------------------------------------------- problems and runs
def make_problem(T, D, F, E, K, dtype, *, mask=None, bias=False, opted_out=(), device=DEVICE):
    """Fresh random layer inputs scaled so every output and gradient is O(1), with router
    logits (as the backends compute them) free of exact ties inside a row, so top-k is
    unambiguous. Returns a dict with x, router_weight, gate_up, down, expert_bias (or None),
    allow_mask (:func:`make_mask` of ``mask`` with ``opted_out``), top_k."""
    x = torch.randn(T, D, dtype=torch.float64)
    R = torch.randn(E, D, dtype=torch.float64) * (2.0 / D**0.5)
    b = (-torch.rand(E, dtype=torch.float64) * 2).to(dtype).to(device) if bias else None
    if bias:
        b[0] = 0.0  # the public expert's bias: 0 still gets the clamp's gradient
    for _ in range(100):
        z = fk.router_logits(x.to(dtype), R.to(dtype)).float()
        if b is not None:
            z = z + b.float().cpu().clamp(max=0)
        dup = torch.tensor([len(set(r.tolist())) < E for r in z], dtype=torch.bool)
        if not dup.any():
            break
        x[dup] = torch.randn(int(dup.sum()), D, dtype=torch.float64)
    else:
        raise RuntimeError("could not draw tie-free router logits")
    gu = torch.randn(E, 2 * F, D, dtype=torch.float64) / D**0.5
    dn = torch.randn(E, D, F, dtype=torch.float64) / F**0.5
    t = [v.to(dtype).to(device) for v in (x, R, gu, dn)]
    return dict(x=t[0], router_weight=t[1], gate_up=t[2], down=t[3], expert_bias=b,
                allow_mask=make_mask(mask, T, E, K, device=device, opted_out=opted_out), top_k=K)


def _loss(out, z, dout, dz):
    """<out, dout> + <z, dz> over the finite logits (a z-loss-like gradient into the logits)."""
    zf = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    return (out.to(dout.dtype) * dout).sum() + (zf.to(dz.dtype) * dz).sum()


def run_layer(p, backend, dout, dz, *, trainable=None, norm=False, forward=None, **kw):
    """Forward + backward of one backend via :func:`flexmoe_kernels.flexmoe_forward` (or
    ``forward``, a function with its signature, e.g. its ``torch.compile``);
    returns ``(out, logits, {name: grad})``. ``kw``: e.g. ``deterministic``, ``validate``."""
    leaves = {n: p[n].detach().clone().requires_grad_() for n in GRAD_NAMES if p.get(n) is not None}
    out, z = (forward or fk.flexmoe_forward)(
        leaves["x"], leaves["router_weight"], leaves["gate_up"], leaves["down"], p["top_k"],
        allow_mask=p["allow_mask"], expert_bias=leaves.get("expert_bias"), norm_topk_prob=norm,
        trainable_experts=trainable, backend=backend, **kw,
    )
    _loss(out, z, dout, dz).backward()
    return out.detach(), z.detach(), {n: v.grad for n, v in leaves.items()}


def run_reference64(p, dout, dz, *, trainable=None, norm=False):
    """Float64 :func:`reference_layer` output, logits and every gradient, routed exactly like
    the backends (their logits straight-through, see there). Computed on the CPU (the
    per-token loop is many tiny ops), returned on the CPU."""
    leaves = {n: p[n].detach().cpu().double().requires_grad_() for n in GRAD_NAMES if p.get(n) is not None}

    def cpu(t):
        return None if t is None else t.cpu()

    out, z = reference_layer(
        leaves["x"], leaves["router_weight"], leaves["gate_up"], leaves["down"], p["top_k"],
        allow_mask=cpu(p["allow_mask"]), expert_bias=leaves.get("expert_bias"), norm_topk_prob=norm,
        trainable_experts=cpu(trainable), route_logits=backend_logits(p).cpu(),
    )
    _loss(out, z, dout.cpu().double(), dz.cpu().double()).backward()
    grads = {n: (v.grad if v.grad is not None else torch.zeros_like(v)) for n, v in leaves.items()}
    return out.detach(), z.detach(), grads


def loss_grads(T: int, D: int, E: int, device=DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float32 gradients ``(dout_TD, dz_TE)`` (the latter z-loss sized)."""
    return torch.randn(T, D, device=device), torch.randn(T, E, device=device) * 0.1



# ----------------------------------------------------------------------------- plan checks
SCHEDULE_FIELDS = ("padded_pairs_Q", "padded_offsets_E1", "tile_expert_E_tiles", "num_tiles")


def check_plan_invariants(plan, T: int, K: int, E: int, allow: Optional[torch.Tensor] = None) -> None:
    """Invariants of a :class:`~flexmoe_kernels.ops.plan.RoutingPlan` checked without a
    reference: int32 ids, distinct experts per token, counts / offsets / the stable grouping
    by expert and its inverse, and (with ``allow``) that no disallowed expert is selected."""
    ids = plan.topk_ids_TK.cpu()
    for name in ("topk_ids_TK", "counts_E", "offsets_E1", "sorted_pairs_P", "inv_sorted_pairs_P"):
        assert getattr(plan, name).dtype == torch.int32, name
    assert ids.shape == (T, K)
    counts, offsets = plan.counts_E.cpu().long(), plan.offsets_E1.cpu().long()
    sorted_p, inv = plan.sorted_pairs_P.cpu().long(), plan.inv_sorted_pairs_P.cpu().long()
    assert int(counts.sum()) == T * K
    assert torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=E))
    assert offsets[0] == 0 and torch.equal(offsets[1:], counts.cumsum(0))
    P = T * K
    assert torch.equal(sorted_p[inv], torch.arange(P)) and torch.equal(inv[sorted_p], torch.arange(P))
    assert torch.equal(torch.sort(sorted_p).values, torch.arange(P))
    ids_sorted = ids.flatten()[sorted_p]
    assert torch.all(ids_sorted[1:] >= ids_sorted[:-1])
    for e in range(E):
        s, t = int(offsets[e]), int(offsets[e + 1])
        assert torch.all(ids_sorted[s:t] == e)
        assert torch.all(sorted_p[s:t][1:] > sorted_p[s:t][:-1])  # stable: increasing pair id
    assert all(len(set(r.tolist())) == K for r in ids)  # distinct experts per token
    if allow is not None:
        allow = allow.cpu()
        a = allow.expand(T, E) if allow.ndim == 1 else allow
        assert torch.all(a.gather(1, ids.long()))
        if allow.ndim == 1:
            assert torch.all(counts[~allow] == 0)


# --------------------------------------------------------------------------- tiny models
def tiny_flexolmo_config(**overrides):
    """A tiny ``FlexOlmoConfig`` (D 32, 2 layers, E 4, K 2, torch backend, SDPA); ``overrides``
    replace fields."""
    from flexmoe_kernels.models import FlexOlmoConfig

    base = dict(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                rope_theta=10000.0, initializer_range=0.2, moe_backend="torch", attn_implementation="sdpa")
    base.update(overrides)
    return FlexOlmoConfig(**base)


def randomize_(model):
    """Non-trivial norms and biases so every weight matters (RMSNorm weights in [0.5, 1.5],
    expert biases ~ N(0, 1)); returns ``model``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("expert_bias"):
                p.normal_(0.0, 1.0)
    return model


def tiny_flexolmo(**overrides):
    """A randomised tiny ``FlexOlmoForCausalLM`` in eval mode (see :func:`tiny_flexolmo_config`)."""
    from flexmoe_kernels.models import FlexOlmoForCausalLM

    return randomize_(FlexOlmoForCausalLM(tiny_flexolmo_config(**overrides))).eval()


# ----------------------------------------------------------------------------- kernel launches
def record_launches(monkeypatch, names: Optional[Sequence[str]] = None) -> list:
    """Record the Triton kernel launches made through ``ops.triton.launch.kernels`` from now on
    (they still run): returns the list that fills with ``(kernel name, grid, kwargs)``, for the
    kernels in ``names`` (every kernel if None). ``launch.interpreting`` (which inspects a
    kernel's type) is answered before the kernels are wrapped."""
    from flexmoe_kernels.ops.triton import launch

    seen, real = [], launch.kernels
    interp = launch.interpreting()
    monkeypatch.setattr(launch, "interpreting", lambda: interp)

    class _Module:
        def __init__(self, mod):
            self.mod = mod

        def __getattr__(self, name):
            kernel = getattr(self.mod, name)
            if names is not None and name not in names:
                return kernel

            class _Recorded:
                def __getitem__(self, grid):
                    def run(*args, **kwargs):
                        seen.append((name, grid, kwargs))
                        return kernel[grid](*args, **kwargs)
                    return run
            return _Recorded()

    monkeypatch.setattr(launch, "kernels", lambda mod: _Module(real(mod)))
    return seen
