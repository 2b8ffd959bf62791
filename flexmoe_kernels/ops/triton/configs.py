"""Launch configurations of the Triton grouped expert GEMMs: heuristics, JSON tables, env pin.

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k.

Six GEMM kinds (see :mod:`flexmoe_kernels.ops.triton.grouped_gemm_kernels` and
:mod:`flexmoe_kernels.ops.triton.grouped_gemm_bwd_kernels`):

========  ==========================================================  ===========================
kind      what                                                        BLOCK_M / BLOCK_N / BLOCK_K
========  ==========================================================  ===========================
up        x (gathered) @ gate_up[e].T, SwiGLU epilogue                slots / F / D
down      h @ down[e].T, router weight + top-k combine                slots / D / F
bwd_up    backward: recompute the gate/up pre-activation (not kept)   slots / F / D
bwd_dh    backward: dh = dOut @ down[e], SwiGLU backward epilogue     slots / F / D
bwd_dx    dgate|dup @ gate_up[e], combine over top-k                  slots / D / 2F
dw        per-expert A^T @ B over the expert's slots                  rows of dW / cols / slots
========  ==========================================================  ===========================

The five tile kinds share ``BLOCK_M``: it is the tile height of the routing schedule
(``block_m`` of :func:`flexmoe_kernels.ops.triton.routing.triton_route`).

Variant fields (0/1 in tables and the environment pin; other kinds ignore them):

* ``up.keep_preact``: the forward also writes the gate/up pre-activation ``pre_Q2F`` (Q_max,
  2F) float32 (as the recompute: 16-bit rounding cost gradient accuracy) and the layer keeps
  it for the backward, which then skips the ``bwd_up`` recompute GEMM (1/3 of the forward's
  FLOPs; the recompute writes and reads the same float32 buffer, so keeping it moves no more
  bytes). Memory: ``2 * F * K * 4`` bytes per token per layer (plus at most
  ``E * (block_m - 1)`` padding rows of 2F), e.g. 48 KiB/token at the fine-grained shape
  (F 768, K 8), 430 KiB/token at FlexOlmo-7x7B (F 11008, K 5); docs/DESIGN.md has the table.
  Default off: the layer otherwise keeps nothing of width F (a token's own activation is
  2*D bytes: 4-8 KiB), and memory, not FLOPs, limits FlexOlmo's batch; turn it on where
  memory is free (not measured on a GPU yet).
* ``up.interleave`` / ``bwd_up.interleave``: the up kernel keeps ONE (BLOCK_M, 2*BLOCK_N)
  accumulator over interleaved gate/up rows (one wide ``tl.dot`` per k-step, columns paired
  in the epilogue) instead of two BLOCK_N-wide ones; BLOCK_N stays the F-block width. The
  weights stay in the HF layout (an index map, no copy, no extra memory). Its weight loads are
  pointer loads (cp.async): ``tma`` and ``persistent`` do not apply to it (a TMA version needs
  a rank-4 (E, 2, F, D) descriptor, not built). sm_90a, 128x128x64 w8 s4: n256 wgmma, 254
  registers, no spill (compile report). Default off: not measured on a GPU yet.

* ``tma`` (every kind): read operands through TMA tensor descriptors
  (``tl.make_tensor_descriptor``): the expert weights of up / down / bwd_dx (and the dh
  GEMM's down weight), the slot-ordered operand of dw (see the kernels). The launchers resolve
  it off where a descriptor cannot be used (:func:`.launch.tma_supported`: sm_80, a Triton
  without the API; :func:`.launch.tma_compatible`: a base or leading stride that is not a
  multiple of 16 bytes, no unit-stride dimension), so a table entry is valid everywhere.
  Gathered rows (x / dOut through pair ids) are always pointer loads (cp.async).
* ``persistent`` (tile kinds): launch :func:`.launch.num_programs` programs (the SM count)
  that loop over the used tiles (their count is read on the device: no host sync) instead of
  one program per tile of the worst-case grid.
* ``host_desc`` (with ``tma``; default on): the TMA descriptors of the static operands (the
  expert weights; dW's slot-ordered operand where its BLOCK_K divides the schedule's block_m)
  are made once per launch on the host (``triton.tools.tensor_descriptor.TensorDescriptor``,
  passed as kernel arguments) instead of by every program on the device
  (``tl.make_tensor_descriptor``: ~15 ``tensormap.replace``, a 128-byte copy to global memory
  and a fence each; 43,500 per fine-grained forward layer). Off: each live program makes its
  own after the dead-tile exit (a persistent program once, before its tile loop). The
  launchers fall back to device-side descriptors where Triton lacks the host class.

Resolution order in :func:`get_configs` (cached per problem and environment):

1. a JSON table in ``flexmoe_kernels/ops/triton/tables/`` for the device (by name, or the
   ``device_name=`` argument: no GPU needed), the exact shape key ``D=..,F=..,E=..,K=..,dtype=..``
   and the nearest entry: tables with ``"key": "tokens_per_expert"`` (the shipped one) are
   keyed by the bucket ``m = ceil(T*K/E)`` rounded up to a power of two
   (:func:`tokens_per_expert_bucket`; nearest in log2, ties to the smaller); older tables
   without that key by T (absolute distance; ties to the smaller T) and still load;
2. otherwise :func:`heuristic_configs` (rows per expert, dtype, device type);
3. then the environment variable ``FLEXMOE_TRITON_CONFIG`` overrides fields: comma-separated
   ``FIELD=VALUE`` (every kind) or ``kind.FIELD=VALUE`` (one kind), e.g.
   ``"BLOCK_M=64,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=8,num_stages=4"``,
   ``"dw.BLOCK_N=64,up.num_stages=3"`` or ``"tma=0,persistent=on,up.keep_preact=1"``; the
   integer fields take integers, the flags (keep_preact, interleave, tma, persistent) 0/1,
   true/false or on/off; ``BLOCK_M`` applies to all tile kinds at once (the schedule's).
   The pin is checked when it is parsed: each field's range (:func:`parse_config_string`),
   then the kinds it touched against the kernels' limits (:func:`check_pinned_configs`:
   Triton's 2^20-element tensors; compiled, the device's shared memory and 255 registers per
   thread); errors name the variable, the field, the value and the allowed range.

The shipped H100 table (also H200 / H800 / GH200: the same sm_90 SM and 227 KB of shared
memory) is labelled ``"untuned: heuristic defaults, not measured"``: it was written without a
GPU from the rules of :func:`heuristic_configs` (plus 4 stages for the 128-row TMA tiles,
which the compile report shows fit); re-tune it on the hardware (benchmarks/gpu_sweep.py
writes the best measured variant per shape in the same format) and replace its ``status``.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "ENV_VAR",
    "KINDS",
    "TILE_KINDS",
    "GemmConfig",
    "MoEConfigs",
    "config_dir",
    "default_bwd_dh",
    "device_name",
    "get_configs",
    "heuristic_configs",
    "load_table",
    "lookup_table",
    "parse_config_string",
    "check_pinned_configs",
    "shared_memory_limit",
    "shape_key",
    "tokens_per_expert_bucket",
]

ENV_VAR = "FLEXMOE_TRITON_CONFIG"
KINDS = ("up", "down", "bwd_up", "bwd_dh", "bwd_dx", "dw")
TILE_KINDS = ("up", "down", "bwd_up", "bwd_dh", "bwd_dx")
_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "keep_preact", "interleave",
           "tma", "persistent", "host_desc")
_FLAGS = ("keep_preact", "interleave", "tma", "persistent", "host_desc")  # bool fields (0/1 in tables and the pin)
_BOOL_WORDS = {"true": 1, "on": 1, "false": 0, "off": 0}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class GemmConfig:
    """One kernel launch configuration. Blocks are powers of two >= 16 (``tl.dot``'s minimum),
    ``GROUP_M >= 1``, ``num_warps`` a power of two in [1, 32], ``num_stages >= 1``; the
    variant flags ``keep_preact`` / ``interleave`` (bool, or 0/1) are described in the module
    docstring."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    keep_preact: bool = False
    interleave: bool = False
    tma: bool = False
    persistent: bool = False
    host_desc: bool = True

    def __post_init__(self):
        for f in _FLAGS:
            v = getattr(self, f)
            if v not in (0, 1):  # True / False / 0 / 1
                raise ValueError(f"{f} must be a bool or 0/1, got {v!r}")
            object.__setattr__(self, f, bool(v))
        for f in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{f} must be a power of two >= 16, got {v!r}")
        if not isinstance(self.GROUP_M, int) or self.GROUP_M < 1:
            raise ValueError(f"GROUP_M must be a positive int, got {self.GROUP_M!r}")
        w = self.num_warps
        if not isinstance(w, int) or w < 1 or w > 32 or w & (w - 1):
            raise ValueError(f"num_warps must be a power of two in [1, 32], got {w!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {self.num_stages!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MoEConfigs:
    """The configs of all six kinds; ``block_m`` (= every tile kind's ``BLOCK_M``) is the
    routing schedule's tile height. ``source`` says where they came from (for logs/benchmarks).
    ``bwd_dh`` may be omitted (tables written before that kind existed): it is then
    :func:`default_bwd_dh` of ``bwd_dx``."""

    up: GemmConfig
    down: GemmConfig
    bwd_up: GemmConfig
    bwd_dx: GemmConfig
    dw: GemmConfig
    source: str = "heuristic"
    bwd_dh: Optional[GemmConfig] = None

    def __post_init__(self):
        if self.bwd_dh is None:
            object.__setattr__(self, "bwd_dh", default_bwd_dh(self.bwd_dx))
        bms = {k: getattr(self, k).BLOCK_M for k in TILE_KINDS}
        if len(set(bms.values())) != 1:
            raise ValueError(f"the tile kinds {TILE_KINDS} must share BLOCK_M (the schedule's block_m), got {bms}")

    @property
    def block_m(self) -> int:
        return self.up.BLOCK_M

    def to_dict(self) -> dict:
        return {k: getattr(self, k).to_dict() for k in KINDS}


def default_bwd_dh(bwd_dx: GemmConfig) -> GemmConfig:
    """The dh GEMM's config where none is given: ``bwd_dx``'s (the same tile class: slot rows,
    a wide N, one accumulator, a per-slot epilogue) with BLOCK_N at most 128 (the SwiGLU
    backward epilogue holds the accumulator plus the gate and up tiles in registers)."""
    return replace(bwd_dx, BLOCK_N=min(bwd_dx.BLOCK_N, 128), keep_preact=False, interleave=False)


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _pow2_floor(max(1, n))))


def heuristic_configs(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype, device_type: str = "cuda") -> MoEConfigs:
    """Configs from problem-size rules (Hopper-oriented; never measured on this machine).

    * rows per expert ``m = T*K/E`` picks the tile height: 16 for decode (m <= 16), 32/64 for
      small batches, 128 for training sizes (fewer padding rows vs. tensor-core efficiency);
    * BLOCK_N 128 (up holds 2 fp32 accumulators: 128 wide at most), 128-256 for down and
      bwd_dx; bwd_up (the backward's recompute) is the up GEMM again: the same config; bwd_dh
      is :func:`default_bwd_dh`; BLOCK_K 64 (bf16/fp16: 128-byte rows); fp32 (IEEE, FMA units) uses small
      tiles and 4 warps so that nothing spills;
    * num_stages 3-4 (Hopper shared memory), num_warps 4 for small tiles, 8 for 128-row tiles;
    * GROUP_M 8 (grouped order, L2 reuse of weight blocks), 1 for decode (one tile per expert);
    * 16-bit: ``tma`` on for up / down / bwd_dx (weights through TMA descriptors where the
      device and Triton support them) and, at training sizes, dw (its slot-ordered operand);
      ``persistent`` off (not measured yet).

    ``device_type="cpu"`` (Triton's interpreter) returns small blocks: the interpreter's cost is
    per program and per op, and the tests' shapes are tiny.
    """
    if device_type != "cuda":
        small = GemmConfig(16, 32, 32, GROUP_M=4, num_warps=4, num_stages=1)
        return MoEConfigs(small, small, small, small, GemmConfig(32, 32, 16, 4, 4, 1), source="heuristic:cpu")
    m = max(1, (T * K + E - 1) // E)  # average rows per expert
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units (no tensor cores): small tiles, or registers spill.
        bm = 16 if m <= 16 else (32 if m <= 48 else 64)
        up = GemmConfig(bm, 32, 32, 8, 8, 2)
        down = GemmConfig(bm, 64, 32, 8, 8, 2)
        bwd_up = up
        bwd_dx = GemmConfig(bm, 64, 32, 8, 8, 2)
        dw = GemmConfig(64, 64, 16, 8, 4, 3)
        return MoEConfigs(up, down, bwd_up, bwd_dx, dw, source="heuristic")
    if m <= 16:  # decode: one 16-row tile per expert, long K steps, no grouping needed
        up = down = bwd_dx = GemmConfig(16, 64, 128, 1, 4, 4)
    elif m <= 256:
        bm = 32 if m <= 48 else 64
        up = GemmConfig(bm, 128, 64, 8, 4, 4)
        down = GemmConfig(bm, 128, 64, 8, 4, 4)
        bwd_dx = GemmConfig(bm, 128, 64, 8, 4, 4)
    else:  # training sizes: 128-row tiles, wgmma with 2 warp groups
        up = GemmConfig(128, 128, 64, 8, 8, 3)
        down = GemmConfig(128, 256, 64, 8, 8, 3)
        bwd_dx = GemmConfig(128, 256, 64, 8, 8, 3)
    # Weights through TMA descriptors (the launchers resolve it off on sm_80 / old Triton).
    up, down, bwd_dx = (replace(c, tma=True) for c in (up, down, bwd_dx))
    # dW: output tiles of the (2F, D) / (D, F) gradients, reduction over an expert's m rows; at
    # training sizes the slot-ordered operand through TMA (4 stages: 3 buffers per ring). Its
    # tile is masked in registers (wgmma A from registers): with 4 warps a 128x128 tile then
    # spills (sm_90a: 254 registers + 120 B), so only the 8-warp configs use it.
    dw = GemmConfig(128, 128, _clamp_pow2(m, 16, 64), 8, 8 if m > 256 else 4, 4, tma=m > 256)
    return MoEConfigs(up, down, up, bwd_dx, dw, source="heuristic")


# ------------------------------------------------------------------ environment pin
# Limits a pin is checked against when it is parsed (``FLEXMOE_TRITON_CONFIG``; see
# :func:`parse_config_string` and :func:`check_pinned_configs`):
TRITON_MAX_NUMEL = 1 << 20  # Triton's largest tensor (triton.language.TRITON_MAX_TENSOR_NUMEL)
MIN_BLOCK = 16  # tl.dot's smallest tile side
MAX_BLOCK_M = 1024  # the routing schedule's largest tile height (triton_route's block_m)
MAX_BLOCK = TRITON_MAX_NUMEL // MIN_BLOCK  # every tile has another side >= 16
MAX_STAGES = 8  # the pipeline depths this project supports (tables, sweep, compile tier use 1-4)
MAX_REGISTERS = 255  # registers per thread on every NVIDIA GPU since sm_35
# Shared memory a block can opt into, by compute capability (the pin's operand ring must fit).
_SMEM_BY_CC = {(9, 0): 232448, (8, 0): 166912, (8, 7): 166912, (8, 6): 101376, (8, 9): 101376}
_SMEM_BY_NAME = (("H100", 232448), ("H200", 232448), ("H800", 232448), ("GH200", 232448), ("H20", 232448),
                 ("A100", 166912), ("A800", 166912), ("A30", 166912))
_SMEM_MAX = 232448  # no GPU these kernels target offers more (sm_90: 227 KB)
_FIELD_RULES = {  # field -> (low, high, power of two?, why)
    "BLOCK_N": (MIN_BLOCK, MAX_BLOCK, True, f"{MIN_BLOCK}: tl.dot's smallest tile side; {MAX_BLOCK}: Triton's "
                f"{TRITON_MAX_NUMEL}-element tensor limit over a {MIN_BLOCK}-wide other side"),
    "BLOCK_K": (MIN_BLOCK, MAX_BLOCK, True, f"{MIN_BLOCK}: tl.dot's smallest tile side; {MAX_BLOCK}: Triton's "
                f"{TRITON_MAX_NUMEL}-element tensor limit over a {MIN_BLOCK}-wide other side"),
    "GROUP_M": (1, 1 << 16, False, "tile rows per swizzle group; GROUP_M * column tiles must fit int32"),
    "num_warps": (1, 32, True, "1024 threads per block at most"),
    "num_stages": (1, MAX_STAGES, False, "the pipeline depths this project supports; deeper rings must also "
                   "fit the device's shared memory"),
}


def _field_rule(kind: str, field: str) -> tuple:
    if field == "BLOCK_M":
        if kind == "dw":  # rows of the dW tile: not the routing schedule's
            return _FIELD_RULES["BLOCK_N"]
        return (MIN_BLOCK, MAX_BLOCK_M, True, f"{MIN_BLOCK}: tl.dot's smallest tile side; {MAX_BLOCK_M}: the "
                "routing schedule's largest tile height (triton_route's block_m; every tile kind shares it)")
    return _FIELD_RULES[field]


def _check_field(kind: str, field: str, value: int) -> None:
    """A pinned value against its field's range (:data:`_FIELD_RULES`); ``ValueError`` naming the
    variable, the item, the field and the allowed range."""
    item = f"{field}={value}" if kind == "*" else f"{kind}.{field}={value}"
    if field in _FLAGS:
        if value not in (0, 1):
            raise ValueError(f"{ENV_VAR}: {item}: {field} must be a bool or 0/1 (true/false, on/off)")
        return
    lo, hi, pow2, why = _field_rule(kind, field)
    if not lo <= value <= hi or (pow2 and value & (value - 1)):
        what = "a power of two" if pow2 else "an integer"
        raise ValueError(f"{ENV_VAR}: {item}: {field} must be {what} in [{lo}, {hi}] ({why}), got {value}")


def parse_config_string(text: str) -> dict[str, dict[str, int]]:
    """Parse ``FLEXMOE_TRITON_CONFIG`` text into ``{kind or "*": {field: int}}``.

    Items are ``FIELD=VALUE`` (every kind) or ``kind.FIELD=VALUE``, separated by commas; fields
    are BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages (integers) and the variant
    flags keep_preact, interleave, tma, persistent (0/1, true/false or on/off); kinds are those
    in :data:`KINDS`. Each value is checked against its field's range (``ValueError`` naming the
    variable, the item and the allowed range): BLOCK_M a power of two in [16, 1024] (the routing
    schedule's limit; dW's BLOCK_M, the rows of its tile, like BLOCK_N), BLOCK_N / BLOCK_K powers
    of two in [16, 65536], GROUP_M in [1, 65536], num_warps a power of two in [1, 32], num_stages
    in [1, 8]. The combination (tile sizes, shared memory, registers) is checked by
    :func:`check_pinned_configs` once the pin is applied. Raises ``ValueError`` naming the
    variable and the bad item.
    """
    out: dict[str, dict[str, int]] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(?:(\w+)\.)?(\w+)\s*=\s*(-?\d+|true|false|on|off)", item, re.IGNORECASE)
        if m is None:
            raise ValueError(f"{ENV_VAR}: cannot parse {item!r}; expected FIELD=INT or kind.FIELD=INT")
        kind, field, raw = m.group(1) or "*", m.group(2), m.group(3).lower()
        if raw in _BOOL_WORDS and field not in _FLAGS:
            raise ValueError(f"{ENV_VAR}: {field} takes an integer, got {item!r}")
        value = _BOOL_WORDS[raw] if raw in _BOOL_WORDS else int(raw)
        if kind != "*" and kind not in KINDS:
            raise ValueError(f"{ENV_VAR}: unknown kind {kind!r} in {item!r}; kinds are {KINDS}")
        if field not in _FIELDS:
            raise ValueError(f"{ENV_VAR}: unknown field {field!r} in {item!r}; fields are {_FIELDS}")
        _check_field(kind, field, value)
        out.setdefault(kind, {})[field] = value
    return out


def _tensors(kind: str, c: GemmConfig) -> list[tuple[str, tuple[str, str], int, int]]:
    """(name, (field, field), rows, cols) of the largest tensors of one program of ``kind``:
    the fp32 accumulator and the A / B operand tiles (see the kernels)."""
    wide = kind in ("up", "bwd_up") and c.interleave  # one (BLOCK_M, 2*BLOCK_N) accumulator
    n = 2 * c.BLOCK_N if wide else c.BLOCK_N
    nf = "2*BLOCK_N" if wide else "BLOCK_N"
    return [("the accumulator", ("BLOCK_M", nf), c.BLOCK_M, n), ("the A tile", ("BLOCK_M", "BLOCK_K"), c.BLOCK_M, c.BLOCK_K),
            ("the B tile", ("BLOCK_K", nf), c.BLOCK_K, n)]


def _stage_bytes(kind: str, c: GemmConfig, elt: int) -> int:
    """Shared memory of one pipeline stage: the A tile and the B tile(s) (up / bwd_up: gate and
    up weights, 2 * BLOCK_N columns in all, also interleaved)."""
    nb = 2 if kind in ("up", "bwd_up") else 1
    return (c.BLOCK_M * c.BLOCK_K + nb * c.BLOCK_K * c.BLOCK_N) * elt


def _accumulator_values(kind: str, c: GemmConfig) -> int:
    """fp32 accumulator values of one program (up / bwd_up: gate and up, two BLOCK_N wide or one
    2*BLOCK_N wide)."""
    return c.BLOCK_M * c.BLOCK_N * (2 if kind in ("up", "bwd_up") else 1)


def shared_memory_limit(dev_name: str) -> int:
    """Dynamic shared memory a block can opt into on the CUDA device called ``dev_name`` (from its
    compute capability when that GPU is present, else from the name; unknown: 232448 B, the most
    any GPU these kernels target offers, so the bound stays a necessary one)."""
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if torch.cuda.get_device_name(i) == dev_name:
                    return _SMEM_BY_CC.get(torch.cuda.get_device_capability(i), _SMEM_MAX)
    except Exception:  # noqa: BLE001 - a broken driver: fall back to the name
        pass
    return next((v for sub, v in _SMEM_BY_NAME if sub in dev_name), _SMEM_MAX)


def check_pinned_configs(cfgs: MoEConfigs, over: dict[str, dict[str, int]], dtype: torch.dtype,
                         dev_type: str, dev_name: str) -> None:
    """Check the kinds a ``FLEXMOE_TRITON_CONFIG`` pin touched against the kernels' limits;
    ``ValueError`` naming the variable, the kind, the fields and values, the bound and the
    allowed range. Always: every tensor of a program (accumulator, A and B tiles) has at most
    2^20 elements (Triton's limit). Compiled (``dev_type`` "cuda"; the interpreter has neither
    bound): the operand ring, at least ``num_stages - 1`` buffers of A + B tiles in x's dtype,
    fits the device's shared memory (:func:`shared_memory_limit`; a necessary bound: TMA rings
    keep ``num_stages`` buffers), and the fp32 accumulators alone fit 255 registers per thread.
    Kinds the pin did not touch (a table's or the heuristic's configs) are not checked here."""
    touched = set(KINDS) if over.get("*") else {k for k in KINDS if over.get(k)}
    if any("BLOCK_M" in over.get(k, {}) for k in TILE_KINDS):
        touched |= set(TILE_KINDS)  # one pinned BLOCK_M applies to every tile kind
    elt = torch.empty((), dtype=dtype).element_size()
    for kind in (k for k in KINDS if k in touched):
        c = getattr(cfgs, kind)
        pins = dict(over.get("*", {}), **over.get(kind, {}))
        pinned = ",".join(f"{f}={v}" for f, v in pins.items())
        for name, (fa, fb), rows, cols in _tensors(kind, c):
            if rows * cols > TRITON_MAX_NUMEL:
                va = getattr(c, fa)
                fb_base = fb.replace("2*", "")
                vals = f"{fa}={va}, {fb_base}={getattr(c, fb_base)}"
                if fb != fb_base:
                    vals += f", interleave={int(c.interleave)}"
                hi = TRITON_MAX_NUMEL // va // (2 if fb != fb_base else 1)
                raise ValueError(
                    f"{ENV_VAR}: {kind}: {vals} (pinned: {pinned}): {name} ({fa}, {fb}) has {rows * cols} elements; "
                    f"Triton allows at most {TRITON_MAX_NUMEL} per tensor: allowed {fb_base} <= {hi} at {fa}={va}")
        if dev_type != "cuda":
            continue
        blocks = f"BLOCK_M={c.BLOCK_M}, BLOCK_N={c.BLOCK_N}, BLOCK_K={c.BLOCK_K}"
        per = _stage_bytes(kind, c, elt)
        limit = shared_memory_limit(dev_name)
        need = (c.num_stages - 1) * per
        if need > limit:
            raise ValueError(
                f"{ENV_VAR}: {kind}: {blocks}, num_stages={c.num_stages} ({_DTYPE_NAMES.get(dtype, dtype)}, pinned: "
                f"{pinned}): the operand ring needs at least {need} B of shared memory ({c.num_stages - 1} buffers x "
                f"{per} B of A and B tiles) > {limit} B on {dev_name}: allowed num_stages <= {1 + limit // per} "
                f"at these blocks")
        acc = _accumulator_values(kind, c)
        threads = 32 * c.num_warps
        regs = -(-acc // threads)
        if regs > MAX_REGISTERS:
            w = c.num_warps
            while w < 32 and -(-acc // (32 * w)) > MAX_REGISTERS:
                w *= 2
            fix = (f"num_warps >= {w} at these blocks" if -(-acc // (32 * w)) <= MAX_REGISTERS
                   else "smaller BLOCK_M or BLOCK_N")
            raise ValueError(
                f"{ENV_VAR}: {kind}: BLOCK_M={c.BLOCK_M}, BLOCK_N={c.BLOCK_N}, num_warps={c.num_warps} (pinned: "
                f"{pinned}): the fp32 accumulator{'s' if kind in ('up', 'bwd_up') else ''} alone need {regs} "
                f"registers per thread ({acc} values over {threads} threads), more than the {MAX_REGISTERS} a "
                f"thread has: allowed {fix}")


def _apply_overrides(cfgs: MoEConfigs, over: dict[str, dict[str, int]]) -> MoEConfigs:
    new = {}
    for kind in KINDS:
        fields = dict(over.get("*", {}))
        fields.update(over.get(kind, {}))
        try:
            new[kind] = replace(getattr(cfgs, kind), **fields)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}: {kind}: {exc}") from None
    # The tile kinds share the schedule's BLOCK_M: one pinned value applies to all of them.
    pinned = {k: over[k]["BLOCK_M"] for k in ("*",) + TILE_KINDS if "BLOCK_M" in over.get(k, {})}
    if len(set(pinned.values())) > 1:
        raise ValueError(f"{ENV_VAR}: the tile kinds {TILE_KINDS} share BLOCK_M; got {pinned}")
    if pinned:
        bm = next(iter(pinned.values()))
        for k in TILE_KINDS:
            new[k] = replace(new[k], BLOCK_M=bm)
    return MoEConfigs(**new, source=cfgs.source + f"+{ENV_VAR}")


# ------------------------------------------------------------------ JSON tables
def config_dir() -> Path:
    """Directory of the shipped JSON tables (``flexmoe_kernels/ops/triton/tables``)."""
    return Path(__file__).resolve().parent / "tables"


def shape_key(D: int, F: int, E: int, K: int, dtype: torch.dtype) -> str:
    """Table key of a layer shape, e.g. ``"D=4096,F=11008,E=7,K=5,dtype=bfloat16"``."""
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
    return f"D={D},F={F},E={E},K={K},dtype={_DTYPE_NAMES[dtype]}"


@functools.lru_cache(maxsize=None)
def _tables(directory: str) -> tuple[dict, ...]:
    out = []
    for path in sorted(Path(directory).glob("triton_moe_*.json")):
        with open(path) as f:
            data = json.load(f)
        for field in ("devices", "shapes"):
            if field not in data:
                raise ValueError(f"config table {path} has no {field!r} field")
        data["_path"] = str(path)
        out.append(data)
    return tuple(out)


def load_table(name: str, directory: Optional[str | Path] = None) -> Optional[dict]:
    """The JSON table for device ``name`` (e.g. ``"NVIDIA H100 80GB HBM3"``), or None.

    A table matches when ``name`` equals one of its ``devices`` entries, or (second choice)
    contains one of its ``device_substrings`` (e.g. "H100").
    """
    tables = _tables(str(directory or config_dir()))
    for t in tables:
        if name in t["devices"]:
            return t
    for t in tables:
        if any(s in name for s in t.get("device_substrings", [])):
            return t
    return None


def _from_entry(entry: dict, source: str) -> MoEConfigs:
    missing = [k for k in KINDS if k not in entry and k != "bwd_dh"]  # bwd_dh: optional (default_bwd_dh)
    if missing:
        raise ValueError(f"config entry {source} lacks kinds {missing}")
    return MoEConfigs(**{k: GemmConfig(**entry[k]) for k in KINDS if k in entry}, source=source)


def tokens_per_expert_bucket(T: int, K: int, E: int) -> int:
    """The table bucket of a problem: rows per expert ``m = ceil(T*K/E)`` rounded up to a power
    of two (1, 2, 4, ...): the quantity the tile shapes depend on, whatever T, K and E are."""
    return _pow2_ceil(max(1, -(-T * K // E)))


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def lookup_table(table: dict, T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype) -> Optional[MoEConfigs]:
    """Configs for the exact shape key in ``table`` (None if the shape is absent), at the nearest
    entry: tables with ``"key": "tokens_per_expert"`` are keyed by :func:`tokens_per_expert_bucket`
    (nearest bucket in log2; ties go to the smaller), older ones by T (absolute distance; ties to
    the smaller T)."""
    key = shape_key(D, F, E, K, dtype)
    entries = table["shapes"].get(key)
    if not entries:
        return None
    name = Path(table.get("_path", "table")).name
    if table.get("key") == "tokens_per_expert":
        m = tokens_per_expert_bucket(T, K, E)
        best = min(entries, key=lambda s: (abs(int(s).bit_length() - m.bit_length()), int(s)))
        return _from_entry(entries[best], f"{name}[{key}][m={best}]")
    best = min(entries, key=lambda s: (abs(int(s) - T), int(s)))
    return _from_entry(entries[best], f"{name}[{key}][T={best}]")


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` for CUDA devices (cached; no synchronisation), else the type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _name_of(device: torch.device) -> str:
    return device_name(device)  # the module attribute (get_configs' keyword shadows it there)


@functools.lru_cache(maxsize=256)
def _get_configs_cached(T, D, F, E, K, dtype, dev_name, dev_type, env, directory) -> MoEConfigs:
    cfgs = None
    if dev_type == "cuda":
        table = load_table(dev_name, directory)
        if table is not None:
            cfgs = lookup_table(table, T, D, F, E, K, dtype)
    if cfgs is None:
        cfgs = heuristic_configs(T, D, F, E, K, dtype, dev_type)
    if env:
        over = parse_config_string(env)
        cfgs = _apply_overrides(cfgs, over)
        check_pinned_configs(cfgs, over, dtype, dev_type, dev_name)
    return cfgs


def get_configs(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype, device: torch.device | str, *,
                device_name: Optional[str] = None) -> MoEConfigs:
    """Configs for a layer problem on ``device``: table (nearest bucket / T) > heuristic, then
    the ``FLEXMOE_TRITON_CONFIG`` overrides. Pure host code, cached, no GPU synchronisation.
    ``device_name``: choose as on the CUDA device of that name (e.g. "NVIDIA H100 80GB HBM3";
    no GPU needed: the compile report and benchmarks use it), with ``device`` "cuda"."""
    device = torch.device(device)
    if device_name is None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        device_name = _name_of(device)
    return _get_configs_cached(
        int(T), int(D), int(F), int(E), int(K), dtype, device_name, device.type,
        os.environ.get(ENV_VAR, ""), str(config_dir()),
    )
