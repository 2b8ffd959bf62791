"""Compile the Triton kernels exactly as the library launches them, without a GPU, and read
what the compiler made of them. Shared by :mod:`benchmarks.compile_report` and
``tests/test_compile_sm90.py`` (the one place for the launch-recording machinery).

How it works:

1. :class:`LaunchRecorder` replaces ``flexmoe_kernels.ops.triton.launch.kernels`` by a module
   whose kernels record ``(kernel, grid, args, kwargs)`` instead of launching, and disables
   ``launch.check_runnable`` / ``launch.interpreting``; ``launch.tma_supported`` and
   ``launch.num_programs`` answer for the target (TMA from compute capability 9.0; the SM count
   of the target's device for persistent grids); the launchers then run on CPU tensors
   (buffers from ``launch.alloc`` are ``torch.empty``: nothing is computed).
2. :func:`compile_launch` binds a recorded launch with Triton's own launch binder (the same
   specialisation a real launch gets: pointer alignment, ints divisible by 16 or equal to 1,
   constexprs, ``num_warps`` / ``num_stages``) and compiles it with ``triton.compile`` for a
   ``GPUTarget("cuda", capability, 32)``.
3. :func:`read_kernel` reads the result: TTGIR, PTX, the cubin's SASS and ``ptxas -v``.

The kernel modules must have been imported **without** ``TRITON_INTERPRET=1`` (the
interpreter replaces the JIT functions in-process), so callers run in a fresh interpreter with
that variable unset (the tests start a subprocess).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["Launch", "LaunchRecorder", "compile_env", "library_configs", "record_layer", "launch_key",
           "compile_launch", "find_ptxas", "ptxas_usage", "read_kernel", "GEMM_KERNELS", "sass_wgmma_serialized",
           "device_descriptors", "host_descriptors"]

# The kernels whose main loop is a tl.dot over a K dimension (the grouped GEMMs).
GEMM_KERNELS = ("_up_swiglu_kernel", "_up_interleaved_kernel", "_dh_swiglu_bwd_kernel", "_tile_gemm_scatter_kernel",
                "_grouped_dw_kernel")


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its grid and arguments, and the phase
    ("fwd" / "bwd", set by the caller on the recorder) in which it was launched."""

    fn: Any
    grid: tuple
    args: tuple
    kwargs: dict
    phase: str = ""

    @property
    def name(self) -> str:
        return self.fn.__name__


class _RecordingKernel:
    def __init__(self, fn, recorder: "LaunchRecorder"):
        self.fn, self.recorder = fn, recorder

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.recorder.launches.append(Launch(self.fn, tuple(grid), args, kwargs, self.recorder.phase))
        return record


class _RecordingModule:
    def __init__(self, module, recorder: "LaunchRecorder"):
        self.module, self.recorder = module, recorder

    def __getattr__(self, name):
        return _RecordingKernel(getattr(self.module, name), self.recorder)


# SMs of the device the compile report names for a compute capability (persistent grids).
SM_COUNTS = {90: 132, 89: 142, 86: 84, 80: 108}


@dataclass
class LaunchRecorder:
    """Context manager: inside it every Triton kernel launch of the library is recorded in
    ``launches`` (tagged with the current ``phase``) instead of run, as on a GPU of compute
    ``capability`` (TMA descriptors from 90 on, when this Triton has them)."""

    launches: list = field(default_factory=list)
    phase: str = ""
    capability: int = 90

    def __enter__(self) -> "LaunchRecorder":
        from flexmoe_kernels.ops.triton import launch

        self._launch = launch
        import triton.language as tl

        self._names = ("kernels", "check_runnable", "interpreting", "tma_supported", "num_programs")
        self._saved = tuple(getattr(launch, n) for n in self._names)
        real = launch.kernels
        launch.kernels = lambda name: _RecordingModule(real(name), self)
        launch.check_runnable = lambda device, what: None
        launch.interpreting = lambda: False
        tma = self.capability >= 90 and hasattr(tl, "make_tensor_descriptor")
        launch.tma_supported = lambda device: tma
        launch.num_programs = lambda device: SM_COUNTS.get(self.capability, 132)
        return self

    def __exit__(self, *exc) -> None:
        for name, value in zip(self._names, self._saved):
            setattr(self._launch, name, value)


def compile_env(repo: str) -> dict:
    """The environment of a compile subprocess: ``repo`` on ``PYTHONPATH``, without
    ``TRITON_INTERPRET`` and the config pins (so the shipped configs are what compiles)."""
    drop = ("TRITON_INTERPRET", "FLEXMOE_TRITON_ROUTING_CONFIG", "FLEXMOE_TRITON_CONFIG",
            "FLEXMOE_TRITON_DETERMINISTIC")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    return env


def library_configs(T: int, D: int, F: int, E: int, K: int, dtype, device_name: str):
    """The :class:`MoEConfigs` ``get_configs`` returns for this layer on a CUDA device called
    ``device_name`` (the shipped table if one matches, else the heuristics; env pins apply)."""
    from flexmoe_kernels.ops.triton import configs as tc

    return tc.get_configs(T, D, F, E, K, dtype, "cuda", device_name=device_name)


def record_layer(T: int, D: int, F: int, E: int, K: int, dtype, configs, *, deterministic: bool = True,
                 allow_mask=None, trainable_experts=None, norm_topk_prob: bool = True,
                 capability: int = 90) -> list[Launch]:
    """The Triton launches of one forward and one backward of the "triton" backend's layer
    (routing, up, down, combine; recompute + SwiGLU backward, dX, both dW, routing backward),
    in launch order, as :mod:`flexmoe_kernels.ops.triton.backend` makes them (every input
    needs a gradient). ``configs``: the :class:`MoEConfigs` to use (the schedule's ``block_m``
    is ``configs.block_m``, as the backend does; ``capability``: see :class:`LaunchRecorder`)."""
    import torch

    from flexmoe_kernels.ops.triton import grouped_gemm as gg, routing as tr

    x = torch.empty(T, D, dtype=dtype)
    gate_up, down = torch.empty(E, 2 * F, D, dtype=dtype), torch.empty(E, D, F, dtype=dtype)
    with LaunchRecorder(capability=capability) as rec:
        rec.phase = "fwd"
        plan = tr.triton_route(torch.empty(T, E, dtype=torch.float32), K, allow_mask=allow_mask,
                               expert_bias=torch.empty(E), norm_topk_prob=norm_topk_prob,
                               block_m=configs.block_m, validate=False)
        keep = configs.up.keep_preact  # the backend keeps the pre-activation: no recompute launch
        res = gg.grouped_swiglu_forward(x, plan, gate_up, down, deterministic=deterministic, configs=configs,
                                        keep_preact=keep)
        rec.phase = "bwd"
        gg.grouped_swiglu_backward(x, x, plan, gate_up, down, trainable_experts=trainable_experts,
                                   deterministic=deterministic, configs=configs, preact_Q2F=res[1] if keep else None)
        tr.triton_route_backward(torch.empty(T, K, dtype=torch.float32), plan, norm_topk_prob=norm_topk_prob)
    return rec.launches


def _bind(launch: Launch, capability: int):
    from triton import compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = launch.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{launch.name} is a {type(fn).__name__}, not a JITFunction: the kernels were "
                        "imported under TRITON_INTERPRET=1; run without it")
    target = GPUTarget("cuda", capability, 32)
    backend = compiler.make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    options, sig, consts, attrs = fn._pack_args(backend, launch.kwargs, bound, spec, opts)
    key = (fn.__name__, capability, str(sig), str(consts), str(attrs), str(options))
    return compiler.ASTSource(fn, sig, consts, attrs), target, options, key


def host_descriptors(launch: Launch) -> int:
    """Host-side TMA descriptors (``triton.tools.tensor_descriptor.TensorDescriptor`` arguments)
    the launch passes: made once per launch on the host, no device work per program."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return 0
    return sum(isinstance(v, TensorDescriptor) for v in list(launch.args) + list(launch.kwargs.values()))


def launch_key(launch: Launch, capability: int) -> tuple:
    """Identifies the compiled variant of ``launch``: equal keys compile to the same kernel."""
    return _bind(launch, capability)[3]


def compile_launch(launch: Launch, capability: int):
    """``(compiled, key)``: ``launch`` compiled by ``triton.compile`` for ``GPUTarget("cuda",
    capability, 32)`` with the specialisation Triton's launcher would give these arguments
    (``key``: see :func:`launch_key`)."""
    from triton import compiler

    src, target, options, key = _bind(launch, capability)
    return compiler.compile(src, target=target, options=options.__dict__), key


# ------------------------------------------------------------------ reading the result
def _tool_version(path: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else ()


def find_ptxas(capability: int) -> tuple[Optional[str], str]:
    """``(path, "release X.Y")`` of the newest ptxas among the one Triton compiles with for
    ``capability`` (it reads the PTX version Triton emits, by construction), ``ptxas`` on PATH
    and ``/usr/local/cuda*/bin/ptxas``; ties go to Triton's. ``(None, reason)`` if none runs."""
    candidates = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        candidates.append(get_ptxas(capability).path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this Triton
        pass
    candidates += [p for p in [shutil.which("ptxas")] + sorted(glob.glob("/usr/local/cuda*/bin/ptxas")) if p]
    found = [(v, -i, p) for i, p in enumerate(candidates) if os.path.isfile(p) and (v := _tool_version(p))]
    if not found:
        return None, "no runnable ptxas (Triton's bundled one, PATH, /usr/local/cuda*/bin)"
    version, _, path = max(found)
    return path, "release " + ".".join(map(str, version))


def ptxas_usage(ptx: str, ptxas: str, arch: str, fp_fusion: bool = True) -> dict:
    """``ptxas -v`` on ``ptx`` with the flags Triton's ``make_cubin`` passes: registers,
    spill store/load bytes and stack frame bytes of the (single) kernel."""
    fd, path = tempfile.mkstemp(suffix=".ptx")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path, "-o", path + ".o"]
        if not fp_fusion:
            cmd.insert(2, "--fmad=false")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        for p in (path, path + ".o"):
            if os.path.exists(p):
                os.remove(p)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    log = r.stdout + r.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    return dict(registers=num(r"Used (\d+) registers"), spill_store_bytes=num(r"(\d+) bytes spill stores"),
                spill_load_bytes=num(r"(\d+) bytes spill loads"), stack_bytes=num(r"(\d+) bytes stack frame"),
                c7515=bool(re.search(r"\(C7515\)|wgmma\.mma_async instructions are serialized", log)))


def sass_wgmma_serialized(sass: str) -> bool:
    """True when every ``HGMMA`` of the SASS is followed (before the next HGMMA) by a full wait
    ``WARPGROUP.DEPBAR.LE gsb0, 0x0``: each wgmma waits for itself, none overlaps the next (what
    ptxas does when it reports C7515). A pipelined loop issues several HGMMAs per wait group
    and waits with ``0x1`` or more. False without HGMMA."""
    seen, serialized = 0, True
    pending = False  # an HGMMA not yet followed by a full wait
    for line in sass.splitlines():
        if re.search(r"\bHGMMA\.", line):
            if pending:
                serialized = False
            seen += 1
            pending = True
        elif pending and re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", line):
            pending = False
    if pending:
        serialized = False
    return bool(seen) and serialized


def _sass_mma(cubin: bytes) -> Optional[dict]:
    """Counts of HGMMA / HMMA / UTMALDG (TMA load) instructions in the cubin's SASS and
    ``wgmma_serialized`` (:func:`sass_wgmma_serialized`) (None without cuobjdump)."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001
        tool = shutil.which("cuobjdump")
    if not tool or not os.path.isfile(tool):
        return None
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, timeout=600).stdout
    finally:
        os.remove(path)
    return {"HGMMA": len(re.findall(r"\bHGMMA\.", sass)), "HMMA": len(re.findall(r"\bHMMA\.", sass)),
            "UTMALDG": len(re.findall(r"\bUTMALDG\b", sass)), "wgmma_serialized": sass_wgmma_serialized(sass)}


def device_descriptors(compiled) -> int:
    """Device-side TMA descriptors a program of ``compiled`` makes (``tl.make_tensor_descriptor``:
    each is ~15 ``tensormap.replace``, a 128-byte copy to global memory and a fence): the
    ``tt.make_tensor_descriptor`` ops of the TTIR (``ttng.tensormap_create`` in the TTGIR if
    more). A static count: each is made once per program that reaches it (the kernels make
    them after the dead-tile exit, outside the persistent tile loop). Host-side descriptors
    (``TensorDescriptor`` arguments) are not counted here."""
    ttir = compiled.asm.get("ttir", "") or ""
    ttgir = compiled.asm.get("ttgir", "") or ""
    return max(len(re.findall(r"\btt\.make_tensor_descriptor\b", ttir)),
               len(re.findall(r"\bttng\.tensormap_create\b", ttgir)))


def _buffers(ttgir: str) -> int:
    """Depth of the shared-memory operand ring: the smallest leading dimension of the
    ``NxRxC`` floating-point shared allocations (one slot per pipeline stage; index buffers
    such as ``1x64xi32`` are not operand data); 1 for single-buffered 2-D operand tiles, 0
    when the kernel stages no tensor-core operand in shared memory."""
    shapes = re.findall(r"ttg\.local_alloc[^\n]*?!ttg\.memdesc<([0-9x]+)x(bf16|f16|f32|f8\w*)", ttgir)
    rings = [int(s.split("x")[0]) for s, _ in shapes if s.count("x") >= 2]
    if rings:
        return min(rings)
    return 1 if shapes else 0


def read_kernel(compiled, ptxas: Optional[str]) -> dict:
    """What one compiled kernel is: ``gemm`` (contains a tl.dot), ``mma`` ("wgmma" /
    "mma.sync" / "none"), ``mma_n`` (N of the wgmma shape ``m64nNk16``, the largest if
    several), ``tma`` (``cp.async.bulk.tensor`` in the PTX or ``UTMALDG`` in the SASS), ``buffers`` (see
    :func:`_buffers`), ``smem_bytes`` (Triton's ``metadata.shared``: the dynamic shared memory
    a launch requests), ``num_stages`` (as compiled), ``registers`` / ``spill_bytes`` (stores
    + loads) / ``stack_bytes`` from ``ptxas -v``, ``sass_mma`` (HGMMA / HMMA counts),
    ``wgmma_serialized`` (ptxas reported C7515 "wgmma.mma_async instructions are serialized",
    or the SASS waits for every HGMMA alone: :func:`sass_wgmma_serialized`; which of the two:
    ``wgmma_serialized_by``), ``device_descriptors`` (:func:`device_descriptors`, per program)."""
    ptx, ttgir, md = compiled.asm["ptx"], compiled.asm["ttgir"], compiled.metadata
    sass = _sass_mma(compiled.asm["cubin"])
    wgmma_n = [int(n) for n in re.findall(r"wgmma\.mma_async[.\w]*?\.m64n(\d+)k\d+", ptx)]
    if wgmma_n or (sass and sass["HGMMA"]):
        mma = "wgmma"
    elif re.search(r"\bmma\.sync\b", ptx) or (sass and sass["HMMA"]):
        mma = "mma.sync"
    else:
        mma = "none"
    row = dict(gemm=bool(re.search(r"\btt\.dot\b|warp_group_dot", ttgir)), mma=mma,
               mma_n=max(wgmma_n) if wgmma_n else None,
               tma="cp.async.bulk.tensor" in ptx or bool(sass and sass["UTMALDG"]),
               buffers=_buffers(ttgir), smem_bytes=int(md.shared), num_stages=int(md.num_stages),
               sass_mma=sass, device_descriptors=device_descriptors(compiled))
    by = ["sass"] if sass and sass["wgmma_serialized"] else []
    if ptxas:
        usage = ptxas_usage(ptx, ptxas, _arch_of(ptx), md.enable_fp_fusion)
        row.update(registers=usage["registers"], stack_bytes=usage["stack_bytes"],
                   spill_bytes=usage["spill_store_bytes"] + usage["spill_load_bytes"])
        if usage["c7515"]:
            by.insert(0, "ptxas C7515")
    row.update(wgmma_serialized=bool(by), wgmma_serialized_by=", ".join(by) or None)
    return row


def _arch_of(ptx: str) -> str:
    m = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    if m is None:
        raise ValueError("no .target line in the PTX")
    return m.group(1)
