"""End-to-end training benchmark with DeepSpeed: tokens/s and MFU per training step.

Legend: B sequences per micro-batch, S sequence length, D hidden, L layers, F expert width,
E experts, K top-k, V vocabulary.

Models (``flexmoe_kernels.models.FlexOlmoForCausalLM``, same backbone, random init):

* ``dense``: ``num_experts=1``, top-1, FFN width K*F (equal active parameters to the MoEs).
* ``moe``: standard MoE, ``E_std`` experts of width F, top-K, everything trainable.
* ``moe2_full``: 2 experts, top-2, everything trainable.
* ``flexolmo_coupled``: the same 2-expert model trained the FlexOlmo way: embeddings,
  attention, norms, LM head and the public expert 0 frozen (``requires_grad=False`` for the
  shared tensors, ``FlexMoE.set_trainable_experts([1])`` so no dW is computed for expert 0);
  trainable: expert 1's FFN, its router row and bias. Done by the training recipe's own
  ``freeze_for_expert_training`` (see :func:`freeze_for_coupled`).

Each model: ``deepspeed.initialize`` after training's own process-group set-up
(``flexmoe_training.distributed.init_distributed``: single process on a free local port;
``gloo`` on CPU, ``nccl`` on CUDA), bf16 on GPU / fp32 on CPU, ZeRO stage 0 (``--zero-stage``), AdamW
(betas 0.9/0.95, weight decay 0, as FlexOlmo), clip 1.0; ``warmup`` untimed steps, then the
median of ``steps`` timed steps (fresh random token ids each step; loss = shifted CE).

* ``tokens_per_s = B*S / median step time``.
* ``mfu = tokens_per_s * flops_per_token / peak``, with the PaLM convention
  ``flops_per_token = 6*N_active + 12*L*S*H*hd`` where ``N_active`` counts every matmul
  weight a token passes through (attention projections, router, the K active experts, LM
  head; not the embedding table) and the second term is attention scores/values (non-causal
  count). It is the same "model FLOPs" for coupled and fully trainable training, so the MFU of
  coupled training is a *useful-work* figure (the hardware skips the frozen dW GEMMs).
  ``peak`` = dense bf16 peak of the GPU (table in harness.py, or ``--peak-tflops``); no MFU on CPU.
"""
from __future__ import annotations

import logging
import time
import traceback
from typing import Optional

import torch

from . import harness
from .presets import E2E_PRESETS, E2EPreset



def init_deepspeed(device: torch.device):
    """Import DeepSpeed and initialise a single-process group (idempotent) with training's own
    set-up (:func:`flexmoe_training.distributed.init_distributed`); DeepSpeed's log is quieted."""
    from flexmoe_training.distributed import init_distributed

    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass
    init_distributed(device.type)
    import deepspeed

    return deepspeed


def model_config(pre: E2EPreset, kind: str, moe_backend: str = "auto"):
    """The FlexOlmoConfig of one benchmark model (see module docstring)."""
    from flexmoe_kernels.models import FlexOlmoConfig

    if kind == "dense":
        E, K, width = 1, 1, pre.K * pre.F
    elif kind == "moe":
        E, K, width = pre.E_std, pre.K, pre.F
    elif kind in ("moe2_full", "flexolmo_coupled"):
        E, K, width = 2, 2, pre.F
    else:
        raise ValueError(f"e2e model must be one of dense, moe, moe2_full, flexolmo_coupled; got {kind!r}")
    head_dim = pre.D // pre.heads
    return FlexOlmoConfig(
        vocab_size=pre.vocab, hidden_size=pre.D, intermediate_size=width,
        num_hidden_layers=pre.L, num_attention_heads=pre.heads, num_key_value_heads=pre.kv_heads,
        head_dim=head_dim, max_position_embeddings=max(pre.seq, 128), num_experts=E,
        num_experts_per_tok=K, norm_topk_prob=False, tie_word_embeddings=False,
        expert_bias=kind == "flexolmo_coupled", moe_backend=moe_backend,
    )


def flops_per_token(pre: E2EPreset, cfg) -> float:
    """Model FLOPs per trained token (fwd+bwd), PaLM convention (see module docstring)."""
    from .flops import e2e_flops_per_token

    return e2e_flops_per_token(cfg, pre.seq).model


def executed_flops_per_token(pre: E2EPreset, cfg, kind: str, device, dtype) -> tuple[float, str]:
    """Executed FLOPs per trained token (:func:`benchmarks.flops.e2e_flops_per_token`): the MoE
    layers' recompute where their resolved backend is Triton without ``up.keep_preact``, minus
    the dW GEMMs of frozen weights in coupled training (expert 1 and its router row train:
    ``L*(3*D*F + D)`` active matmul weights); and the backend it assumed."""
    from flexmoe_kernels.ops.backends import resolve_backend

    from .flops import e2e_flops_per_token, triton_recomputes

    T, D, F, E, K = pre.batch * pre.seq, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, \
        cfg.num_experts_per_tok
    problem = dict(T=T, D=D, F=F, E=E, K=K, dtype=dtype)
    try:
        backend = resolve_backend(cfg.moe_backend, device, problem)
    except Exception as exc:  # noqa: BLE001 - unknown: count no recompute, and say so
        backend = f"unresolved ({type(exc).__name__})"
    recompute = backend == "triton" and triton_recomputes(T, D, F, E, K, dtype, device)
    trainable = cfg.num_hidden_layers * (3 * D * F + D) if kind == "flexolmo_coupled" else None
    return e2e_flops_per_token(cfg, pre.seq, recompute, trainable).executed, backend


def freeze_for_coupled(model) -> str:
    """Freeze ``model`` for FlexOlmo coupled expert training with the training recipe's own
    ``flexmoe_training.modeling.freeze_for_expert_training`` (frozen leading rows via a
    parametrization + ``set_trainable_experts([1])``), so the benchmark times what
    ``flexmoe train-expert`` runs; returns how it was done."""
    from flexmoe_training.modeling import freeze_for_expert_training

    freeze_for_expert_training(model)
    return "flexmoe_training.modeling.freeze_for_expert_training"


def run_e2e(presets, models, device, rec: harness.Recorder, peak: Optional[float],
            show_progress: bool = True, steps: Optional[int] = None, zero_stage: int = 0,
            moe_backend: str = "auto") -> None:
    """One ``train_step`` row per (preset, model); a failing model gives an error row."""
    jobs = [(pn, m) for pn in presets for m in models]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for pn, kind in harness.progress(jobs, len(jobs), "e2e", show_progress):
        pre = E2E_PRESETS[pn]
        base = dict(bench="e2e", preset=pn, provider=kind, mode="train_step", T=pre.batch * pre.seq,
                    D=pre.D, F=pre.F, dtype=str(dtype).replace("torch.", ""),
                    layers=pre.L, seq=pre.seq, batch=pre.batch)
        try:
            from flexmoe_kernels.models import FlexOlmoForCausalLM  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            rec.add(**base, status="skipped", note=f"flexmoe_kernels.models not available: {exc}")
            continue
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            rec.add(**base, status="skipped", note=f"deepspeed not importable: {exc}")
            continue
        engine = model = None
        try:
            row = _train(pre, kind, device, dtype, peak, steps, zero_stage, moe_backend)
            rec.add(**base, **row)
        except Exception as exc:  # noqa: BLE001
            rec.log(traceback.format_exc())
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            rec.add(**base, status="error", note=("out of memory: " if harness.is_oom(exc) else "") + msg)
        finally:
            del engine, model
            harness.free_memory(device)


def _train(pre: E2EPreset, kind: str, device, dtype, peak, steps: Optional[int], zero_stage: int,
           moe_backend: str) -> dict:
    from flexmoe_kernels.models import FlexOlmoForCausalLM

    deepspeed = init_deepspeed(device)
    cfg = model_config(pre, kind, moe_backend)
    model = FlexOlmoForCausalLM(cfg)
    how = "all parameters trainable"
    if kind == "flexolmo_coupled":
        how = freeze_for_coupled(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    model.to(device)
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ds_cfg = {
        "train_micro_batch_size_per_gpu": pre.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW (weight decay 0) under ZeRO 1/2
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if device.type == "cuda":
        ds_cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    n_steps = steps if steps is not None else pre.steps
    batches = [torch.randint(0, pre.vocab, (pre.batch, pre.seq), device=engine.device)
               for _ in range(pre.warmup + n_steps)]
    times, losses = [], []
    for i, ids in enumerate(batches):
        if i == pre.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        harness.synchronize(device)
        t0 = time.perf_counter()
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        harness.synchronize(device)
        if i >= pre.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss.detach()))
    t = harness._quantiles(times)
    tok = pre.batch * pre.seq
    tps = tok / (t.ms * 1e-3)
    fpt = flops_per_token(pre, cfg)
    fpt_exec, backend = executed_flops_per_token(pre, cfg, kind, device, dtype)
    row = dict(ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, n_calls=t.n, tokens_per_s=tps,
               flops=fpt * tok, tflops=fpt * tok / (t.ms * 1e-3) / 1e12,
               flops_executed=fpt_exec * tok, tflops_executed=fpt_exec * tok / (t.ms * 1e-3) / 1e12,
               moe_backend_resolved=backend,
               mfu=(tps * fpt / peak) if peak else None, E=cfg.num_experts, K=cfg.num_experts_per_tok,
               params_total=n_total, params_trainable=n_train, loss_first=losses[0], loss_last=losses[-1],
               peak_mem_mb=(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
               freeze=how,
               zero_stage=zero_stage, moe_backend=moe_backend,
               note="CPU: fp32, numbers meaningless" if device.type != "cuda" else f"bf16, ZeRO-{zero_stage}")
    del engine, opt, batches
    return row
