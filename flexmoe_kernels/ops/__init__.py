"""The MoE layer's operators, laid out by pipeline stage and backend.

Legend: T tokens, D hidden, F expert FFN width, E experts, K top-k, P = T*K routed pairs.

The pipeline of one layer call (``docs/SEMANTICS.md`` §2-§4)::

    x_TD --[routing]--> RoutingPlan --[permutation]--> x_PD --[experts]--> y_PD --[combine]--> out_TD
           masked softmax-top-k,     pairs grouped        grouped SwiGLU      weighted top-k sum
           counts / offsets /        by expert            GEMMs               (fp32), x's dtype
           stable grouping

Shared by every backend:

* :mod:`.layer`: :func:`~.layer.flexmoe_forward` (validate once, resolve the backend, call it);
* :mod:`.args`: the one validation -> :class:`~.args.LayerArgs` (what every backend receives);
* :mod:`.plan`: the one :class:`~.plan.RoutingPlan` type (int32 ids, optional
  :class:`~.plan.TileSchedule`);
* :mod:`.backends`: registry, availability, the measured ``"auto"`` choice.

Stage x backend (each backend folder has a ``backend.py`` with ``is_available(device)`` and
``forward(args)``):

===========  =====================  ==============================  =========================
stage        ``torch``              ``triton``                      ``cuda``
             (:mod:`.reference`)    (:mod:`.triton`)                (:mod:`.cuda`)
===========  =====================  ==============================  =========================
routing      ``routing.py``         ``routing.py`` + kernels        ``routing.py`` (csrc/routing.cu)
permutation  ``permute.py``         fused into the up GEMM          ``permute.py`` (csrc/permute.cu)
experts      ``experts.py``         ``grouped_gemm.py`` + kernels   ``experts.py`` (torch grouped_mm)
combine      ``combine.py``         fused into the down GEMM        ``combine.py`` (csrc/combine.cu)
===========  =====================  ==============================  =========================
"""
from .args import LayerArgs, validate_layer_args
from .backends import BACKENDS, available_backends, backend_status, resolve_backend
from .layer import flexmoe_forward
from .plan import RoutingPlan, TileSchedule

__all__ = [
    "BACKENDS",
    "LayerArgs",
    "RoutingPlan",
    "TileSchedule",
    "available_backends",
    "backend_status",
    "flexmoe_forward",
    "resolve_backend",
    "validate_layer_args",
]
