"""Launch configurations of the Triton grouped expert GEMMs: heuristics, JSON tables, env pin.

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k.

Five GEMM kinds (see :mod:`flexmoe_kernels.ops.triton.grouped_gemm_kernels`):

========  ==========================================================  ===========================
kind      what                                                        BLOCK_M / BLOCK_N / BLOCK_K
========  ==========================================================  ===========================
up        x (gathered) @ gate_up[e].T, SwiGLU epilogue                slots / F / D
down      h @ down[e].T, router weight + top-k combine                slots / D / F
bwd_up    recompute gate, up and dh = dOut @ down[e], dgate/dup       slots / F / D
bwd_dx    dgate|dup @ gate_up[e], combine over top-k                  slots / D / 2F
dw        per-expert A^T @ B over the expert's slots                  rows of dW / cols / slots
========  ==========================================================  ===========================

The four tile kinds share ``BLOCK_M``: it is the tile height of the routing schedule
(``block_m`` of :func:`flexmoe_kernels.ops.triton.routing.triton_route`).

Resolution order in :func:`get_configs` (cached per problem and environment):

1. a JSON table in ``flexmoe_kernels/ops/triton/tables/`` for the device (by name), the exact shape key
   ``D=..,F=..,E=..,K=..,dtype=..`` and the nearest token count T (absolute distance; ties go
   to the smaller T);
2. otherwise :func:`heuristic_configs` (rows per expert, dtype, device type);
3. then the environment variable ``FLEXMOE_TRITON_CONFIG`` overrides fields, e.g.
   ``"BLOCK_M=64,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=8,num_stages=4"`` (every kind) or
   ``"dw.BLOCK_N=64,up.num_stages=3"`` (one kind; ``block_m`` applies to the tile kinds).

The shipped H100 table is labelled ``"untuned: heuristic defaults, not measured"``: it was
written without a GPU from the same rules as :func:`heuristic_configs`; re-tune it on the
hardware and replace its ``status``.
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
    "device_name",
    "get_configs",
    "heuristic_configs",
    "load_table",
    "lookup_table",
    "parse_config_string",
    "shape_key",
]

ENV_VAR = "FLEXMOE_TRITON_CONFIG"
KINDS = ("up", "down", "bwd_up", "bwd_dx", "dw")
TILE_KINDS = ("up", "down", "bwd_up", "bwd_dx")
_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class GemmConfig:
    """One kernel launch configuration. Blocks are powers of two >= 16 (``tl.dot``'s minimum),
    ``GROUP_M >= 1``, ``num_warps`` a power of two in [1, 32], ``num_stages >= 1``."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
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
    """The configs of all five kinds; ``block_m`` (= every tile kind's ``BLOCK_M``) is the
    routing schedule's tile height. ``source`` says where they came from (for logs/benchmarks)."""

    up: GemmConfig
    down: GemmConfig
    bwd_up: GemmConfig
    bwd_dx: GemmConfig
    dw: GemmConfig
    source: str = "heuristic"

    def __post_init__(self):
        bms = {k: getattr(self, k).BLOCK_M for k in TILE_KINDS}
        if len(set(bms.values())) != 1:
            raise ValueError(f"the tile kinds {TILE_KINDS} must share BLOCK_M (the schedule's block_m), got {bms}")

    @property
    def block_m(self) -> int:
        return self.up.BLOCK_M

    def to_dict(self) -> dict:
        return {k: getattr(self, k).to_dict() for k in KINDS}


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _pow2_floor(max(1, n))))


def heuristic_configs(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype, device_type: str = "cuda") -> MoEConfigs:
    """Configs from problem-size rules (Hopper-oriented; never measured on this machine).

    * rows per expert ``m = T*K/E`` picks the tile height: 16 for decode (m <= 16), 32/64 for
      small batches, 128 for training sizes (fewer padding rows vs. tensor-core efficiency);
    * BLOCK_N 128 (up / bwd_up hold 2-3 fp32 accumulators: 128 wide at most), 128-256 for down
      and bwd_dx; BLOCK_K 64 (bf16/fp16: 128-byte rows); fp32 (IEEE, FMA units) uses small
      tiles and 4 warps so that nothing spills;
    * num_stages 3-4 (Hopper shared memory), num_warps 4 for small tiles, 8 for 128-row tiles;
    * GROUP_M 8 (grouped order, L2 reuse of weight blocks), 1 for decode (one tile per expert).

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
        bwd_up = GemmConfig(bm, 32, 32, 8, 8, 2)
        bwd_dx = GemmConfig(bm, 64, 32, 8, 8, 2)
        dw = GemmConfig(64, 64, 16, 8, 4, 3)
        return MoEConfigs(up, down, bwd_up, bwd_dx, dw, source="heuristic")
    if m <= 16:  # decode: one 16-row tile per expert, long K steps, no grouping needed
        up = down = bwd_up = bwd_dx = GemmConfig(16, 64, 128, 1, 4, 4)
    elif m <= 256:
        bm = 32 if m <= 48 else 64
        up = GemmConfig(bm, 128, 64, 8, 4, 4)
        down = GemmConfig(bm, 128, 64, 8, 4, 4)
        bwd_up = GemmConfig(bm, 64, 64, 8, 4, 4)
        bwd_dx = GemmConfig(bm, 128, 64, 8, 4, 4)
    else:  # training sizes: 128-row tiles, wgmma with 2 warp groups
        up = GemmConfig(128, 128, 64, 8, 8, 3)
        down = GemmConfig(128, 256, 64, 8, 8, 3)
        bwd_up = GemmConfig(128, 64, 64, 8, 8, 3)
        bwd_dx = GemmConfig(128, 256, 64, 8, 8, 3)
    # dW: output tiles of the (2F, D) / (D, F) gradients, reduction over an expert's m rows.
    dw = GemmConfig(128, 128, _clamp_pow2(m, 16, 64), 8, 8 if m > 256 else 4, 3 if m > 256 else 4)
    return MoEConfigs(up, down, bwd_up, bwd_dx, dw, source="heuristic")


# ------------------------------------------------------------------ environment pin
def parse_config_string(text: str) -> dict[str, dict[str, int]]:
    """Parse ``FLEXMOE_TRITON_CONFIG`` text into ``{kind or "*": {field: int}}``.

    Items are ``FIELD=INT`` (every kind) or ``kind.FIELD=INT``, separated by commas; fields are
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; kinds are those in :data:`KINDS`.
    Raises ``ValueError`` naming the variable and the bad item.
    """
    out: dict[str, dict[str, int]] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(?:(\w+)\.)?(\w+)\s*=\s*(-?\d+)", item)
        if m is None:
            raise ValueError(f"{ENV_VAR}: cannot parse {item!r}; expected FIELD=INT or kind.FIELD=INT")
        kind, field, value = m.group(1) or "*", m.group(2), int(m.group(3))
        if kind != "*" and kind not in KINDS:
            raise ValueError(f"{ENV_VAR}: unknown kind {kind!r} in {item!r}; kinds are {KINDS}")
        if field not in _FIELDS:
            raise ValueError(f"{ENV_VAR}: unknown field {field!r} in {item!r}; fields are {_FIELDS}")
        out.setdefault(kind, {})[field] = value
    return out


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
    missing = [k for k in KINDS if k not in entry]
    if missing:
        raise ValueError(f"config entry {source} lacks kinds {missing}")
    return MoEConfigs(**{k: GemmConfig(**entry[k]) for k in KINDS}, source=source)


def lookup_table(table: dict, T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype) -> Optional[MoEConfigs]:
    """Configs for the exact shape key and the nearest T in ``table`` (None if the shape is absent)."""
    by_t = table["shapes"].get(shape_key(D, F, E, K, dtype))
    if not by_t:
        return None
    best = min(by_t, key=lambda s: (abs(int(s) - T), int(s)))
    return _from_entry(by_t[best], f"{Path(table.get('_path', 'table')).name}[{shape_key(D, F, E, K, dtype)}][T={best}]")


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` for CUDA devices (cached; no synchronisation), else the type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


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
        cfgs = _apply_overrides(cfgs, parse_config_string(env))
    return cfgs


def get_configs(T: int, D: int, F: int, E: int, K: int, dtype: torch.dtype, device: torch.device | str) -> MoEConfigs:
    """Configs for a layer problem on ``device``: table (nearest T) > heuristic, then the
    ``FLEXMOE_TRITON_CONFIG`` overrides. Pure host code, cached, no GPU synchronisation."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _get_configs_cached(
        int(T), int(D), int(F), int(E), int(K), dtype, device_name(device), device.type,
        os.environ.get(ENV_VAR, ""), str(config_dir()),
    )
