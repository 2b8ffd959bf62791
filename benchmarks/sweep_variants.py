"""The variants of the layer sweep (:mod:`benchmarks.gpu_sweep`): what each one pins, how it
resolves at a shape without a GPU, the cut of duplicates, and the environment that applies one;
with the small helpers every sweep command shares (the device, the ``--shapes`` text).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Optional

import torch

from .presets import LAYER_PRESETS

DET_ENV = "FLEXMOE_TRITON_DETERMINISTIC"
CONFIG_ENV = "FLEXMOE_TRITON_CONFIG"
BASE_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# The two target shapes and their token counts (the performance targets' shapes).
TARGET_SHAPES = {"fine-grained": 32768, "flexolmo-7x7b": 16384}
# Hand-picked pins beside the default; each must fit the 227 KB of Hopper shared memory at the
# training-size configs (benchmarks.compile_report with the pin set says so: 4 stages of the
# 128-row up / down / dX tiles take ~196 KB, with or without TMA). A pin that does not compile
# gets error rows, not a crash.
CONFIG_CANDIDATES = {
    "bn128": "down.BLOCK_N=128,bwd_dx.BLOCK_N=128",
    "bm64": "BLOCK_M=64",
    "stages4": "up.num_stages=4,down.num_stages=4,bwd_up.num_stages=4,bwd_dx.num_stages=4,dw.num_stages=4",
    "tma0": "tma=0",
    "persistent": "persistent=1",
    "tma0-persistent": "tma=0,persistent=1",
}
# Flags swept by the pins above (not again as ``field:`` variants).
SWEPT_FLAGS = ("tma", "persistent")
BASELINES = ("cuda", "cublas_gemm", "torch_grouped_mm")
MODES = ("fwd", "fwd_bwd")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    env: tuple  # ((VAR, value), ...); the variables not named are unset

    @property
    def provider(self) -> str:
        return "triton" if self.name == "default" else f"triton:{self.name}"


def _configs_module():
    from flexmoe_kernels.ops.triton import configs

    return configs


def _pin_string(cfgs) -> str:
    """A ``FLEXMOE_TRITON_CONFIG`` text that pins every field of every kind of ``cfgs``."""
    return ",".join(f"{k}.{f}={int(v)}" for k, d in cfgs.to_dict().items() for f, v in d.items())


def _extra_field_variants(configs, skip: tuple = ()) -> list[Variant]:
    """``field:F=V`` for every 0/1 GemmConfig field beyond :data:`BASE_FIELDS` and ``skip``."""
    out = []
    defaults = {f.name: f.default for f in dataclasses.fields(configs.GemmConfig)}
    for name in getattr(configs, "_FIELDS", ()):
        d = defaults.get(name, dataclasses.MISSING)
        if name in BASE_FIELDS or name in skip or d not in (0, 1):  # also rules out MISSING
            continue
        v = 0 if int(d) else 1
        out.append(Variant(f"field:{name}={v}", ((CONFIG_ENV, f"{name}={v}"),)))
    return out


ASSUMED_DEVICE = "NVIDIA H100 80GB HBM3"  # what a plan made without a GPU resolves configs for


def _candidates(configs, dev: str, device_type: str, shapes: dict) -> list[Variant]:
    """Every variant before de-duplication (see the module docstring)."""
    out = [Variant("default", ()), Variant("atomic", ((DET_ENV, "0"),))]
    table = configs.load_table(dev) if device_type == "cuda" else None
    if table is not None:
        for pn, T in shapes.items():
            p = LAYER_PRESETS[pn]
            heur = configs.heuristic_configs(T, p.D, p.F, p.E, p.K, torch.bfloat16, "cuda")
            tab = configs.lookup_table(table, T, p.D, p.F, p.E, p.K, torch.bfloat16)
            if tab is not None and tab.to_dict() != heur.to_dict():
                out.append(Variant("heuristic", ((CONFIG_ENV, _pin_string(heur)),)))
                break  # one pin per shape would need per-shape runs; the first differing shape's
    out += [Variant(f"cfg:{n}", ((CONFIG_ENV, pin),)) for n, pin in CONFIG_CANDIDATES.items()]
    return out + _extra_field_variants(configs, SWEPT_FLAGS)


def resolve_variant(v: Variant, preset: str, T: int, device_type: str = "cuda",
                    device_name: Optional[str] = None) -> tuple[dict, str]:
    """The configs (kind -> fields) and source variant ``v`` resolves for ``preset`` at ``T`` on a
    device of ``device_type`` called ``device_name`` (no GPU needed); ``({}, reason)`` when
    they cannot be resolved (a bad pin: its check fails later)."""
    configs = _configs_module()
    p = LAYER_PRESETS[preset]
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    with variant_env(v):
        try:
            c = configs.get_configs(T, p.D, p.F, p.E, p.K, dtype, device_type,
                                    device_name=(device_name or ASSUMED_DEVICE) if device_type == "cuda" else None)
        except Exception as exc:  # noqa: BLE001
            return {}, f"unresolved: {type(exc).__name__}: {exc}"
    return c.to_dict(), c.source


def variants(device: torch.device, shapes: Optional[dict] = None, device_name: Optional[str] = None,
             duplicates: Optional[list] = None) -> list[Variant]:
    """The variants measured on ``device`` at ``shapes`` ({preset: T}; default both targets),
    without duplicates: a variant whose resolved configs (and combine) equal an earlier one's
    at every shape is dropped (e.g. ``cfg:stages4`` under the H100 table, whose entries already
    have 4 stages) and appended to ``duplicates`` as ``(name, same_as)``. ``device_name``:
    resolve as on that CUDA device (default: ``device``'s name; without a GPU
    :data:`ASSUMED_DEVICE`)."""
    configs = _configs_module()
    shapes = shapes or TARGET_SHAPES
    if device.type == "cuda" and device_name is None:
        try:
            device_name = configs.device_name(device)
        except Exception:  # noqa: BLE001 - no GPU here: plan for the assumed one
            device_name = ASSUMED_DEVICE
    dev = device_name or device.type
    seen: dict = {}
    out = []
    for v in _candidates(configs, dev, device.type, shapes):
        sig = (dict(v.env).get(DET_ENV), json.dumps(
            [resolve_variant(v, pn, T, device.type, device_name)[0] or v.name for pn, T in shapes.items()],
            sort_keys=True))
        if sig in seen:
            if duplicates is not None:
                duplicates.append((v.name, seen[sig]))
            continue
        seen[sig] = v.name
        out.append(v)
    return out


@contextlib.contextmanager
def variant_env(v: Variant):
    """Set the variant's variables (unsetting the other pins) for the duration."""
    keys = (DET_ENV, CONFIG_ENV)
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(dict(v.env))
    try:
        yield
    finally:
        for k, val in saved.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val


def resolved_configs(preset: str, T: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, str]:
    """The Triton configs (kind -> fields) and their source for ``preset`` at ``T``, under the
    current environment; ``({}, reason)`` when they cannot be resolved."""
    p = LAYER_PRESETS[preset]
    try:
        cfgs = _configs_module().get_configs(T, p.D, p.F, p.E, p.K, dtype, device)
    except Exception as exc:  # noqa: BLE001 - a bad pin is an error row later, not a crash here
        return {}, f"unresolved: {type(exc).__name__}: {exc}"
    return cfgs.to_dict(), cfgs.source


def _device(arg: Optional[str]) -> torch.device:
    dev = torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def parse_shapes(text: str) -> dict:
    """``"fine-grained:32768,flexolmo-7x7b:16384"`` -> {preset: T}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, t = item.partition(":")
        if name not in LAYER_PRESETS or not t.isdigit():
            raise ValueError(f"--shapes item {item!r}: expected PRESET:TOKENS with a preset of {list(LAYER_PRESETS)}")
        out[name] = int(t)
    return out
