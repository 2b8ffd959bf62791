"""FlexOlmo for vLLM, with per-request opt-out (registered for ``FlexOlmoForCausalLM``).

The decoder is FlexOlmo's (docs/SEMANTICS.md §1): post-norm blocks
``h = x + post_attention_layernorm(attn(x))``, ``out = h + post_feedforward_layernorm(moe(h))``,
QK-norm over the whole q / k projections before RoPE (rotate-half), a final RMSNorm and the
LM head. Attention, norms, RoPE, embeddings and the LM head are vLLM's layers; each MoE layer
is the opaque custom op ``torch.ops.vllm.flexmoe_moe`` (:mod:`.runtime`), which applies the
request's allow-mask as logit -inf before the softmax and FlexOlmo's ``min(b, 0)`` expert bias
when the checkpoint has one (``config.expert_bias``; vLLM's own FlexOlmo path has no bias).

Weights: Hugging Face ``flex_olmo`` names; experts fused (``mlp.experts.gate_up_proj`` (E, 2F, D),
``mlp.experts.down_proj`` (E, D, F)) or per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``).
The MoE weights are replicated on every tensor-parallel rank (attention is sharded as usual);
pipeline parallelism is not supported.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_gather)
from vllm.distributed.utils import split_tensor_along_last_dim
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from .runtime import init_mask_state, register_custom_op

__all__ = ["FlexOlmoForCausalLM"]


def _rope_parameters(config) -> dict:
    rp = getattr(config, "rope_parameters", None)
    if rp:
        return dict(rp)
    return {"rope_type": "default", "rope_theta": float(getattr(config, "rope_theta", 500000.0))}


class FlexOlmoAttention(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        tp = get_tensor_model_parallel_world_size()
        self.tp_size, self.tp_rank = tp, get_tensor_model_parallel_rank()
        H, G = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // H
        assert H % tp == 0 and (G % tp == 0 or tp % G == 0)
        self.num_heads, self.num_kv_heads = H // tp, max(1, G // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        eps = config.rms_norm_eps
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, H, G, bias=False,
                                          quant_config=vllm_config.quant_config, prefix=f"{prefix}.qkv_proj")
        self.q_norm = RMSNorm(H * self.head_dim, eps=eps)
        self.k_norm = RMSNorm(G * self.head_dim, eps=eps)
        self.o_proj = RowParallelLinear(H * self.head_dim, config.hidden_size, bias=False,
                                        quant_config=vllm_config.quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=getattr(config, "max_position_embeddings", 4096),
                                   rope_parameters=_rope_parameters(config), is_neox_style=True)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                              prefix=f"{prefix}.attn")

    def _qk_norm(self, q, k):
        if self.tp_size > 1:
            q = tensor_model_parallel_all_gather(q.contiguous())
            k = tensor_model_parallel_all_gather(k.contiguous())
        q, k = self.q_norm(q), self.k_norm(k)
        if self.tp_size > 1:
            split = partial(split_tensor_along_last_dim, num_partitions=self.tp_size)
            q, k = split(q)[self.tp_rank], split(k)[self.tp_rank]
        return q, k

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self._qk_norm(q, k)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class _Gate(nn.Module):
    def __init__(self, E: int, D: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(E, D), requires_grad=False)
        self.expert_bias = nn.Parameter(torch.zeros(E), requires_grad=False) if bias else None


class _Experts(nn.Module):
    def __init__(self, E: int, D: int, F: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F, D), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, D, F), requires_grad=False)


class FlexOlmoMoE(nn.Module):
    """Router (+ optional bias) and SwiGLU experts; forward = ``torch.ops.vllm.flexmoe_moe``."""

    def __init__(self, config) -> None:
        super().__init__()
        E, D, F = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = int(config.num_experts_per_tok)
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        self.gate = _Gate(E, D, bool(getattr(config, "expert_bias", False)))
        self.experts = _Experts(E, D, F)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = torch.ops.vllm.flexmoe_moe(x, self.gate.weight, self.gate.expert_bias, self.experts.gate_up_proj,
                                         self.experts.down_proj, self.top_k, self.norm_topk_prob)
        return out.view(shape)


class FlexOlmoDecoderLayer(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.self_attn = FlexOlmoAttention(vllm_config=vllm_config, prefix=f"{prefix}.self_attn")
        self.mlp = FlexOlmoMoE(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(positions, x))
        return h + self.post_feedforward_layernorm(self.mlp(h))


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
class FlexOlmoModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            FlexOlmoDecoderLayer(vllm_config=vllm_config, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            h = layer(positions, h)
        return self.norm(h)


def _check_supported(vllm_config) -> None:
    """Refuse engine features under which the allow-mask would not follow the batch (fail at
    start-up rather than silently serve every expert)."""
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise NotImplementedError("flexmoe per-request opt-out does not support speculative decoding "
                                  "(vLLM then drops custom logits processors)")
    pc = vllm_config.parallel_config
    if getattr(pc, "enable_dbo", False) or getattr(pc, "ubatch_size", 1) > 1:
        raise NotImplementedError("flexmoe per-request opt-out does not support micro-batching (DBO)")


class FlexOlmoForCausalLM(nn.Module):
    """vLLM model class for Hugging Face ``flex_olmo`` checkpoints with per-request opt-out."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size > 1:
            raise NotImplementedError("flexmoe's FlexOlmo model does not support pipeline parallelism")
        if getattr(vllm_config, "use_v2_model_runner", False):
            # Model Runner V2 (vLLM's GPU default when Triton is present) does not call V1 logits
            # processors, so the allow-mask would never be filled: refuse rather than silently
            # serve every expert.
            raise NotImplementedError(
                "flexmoe per-request opt-out needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0 "
                "(flexmoe serve sets it; docs/SERVING.md, 'GPU')")
        register_custom_op()
        self.config = config
        self.model = FlexOlmoModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if self.tie:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        _check_supported(vllm_config)
        # the worker's mask state, created by the logits processor that fills it (vLLM builds the
        # persistent batch and its logits processors before it loads the model)
        state = init_mask_state(config.num_experts, vllm_config.scheduler_config.max_num_seqs,
                                vllm_config.device_config.device)
        if not state.tracked:
            raise RuntimeError(
                "flexmoe: the allowed-experts logits processor (entry point vllm.logits_processors: "
                "flexmoe_allowed_experts) is not active in this engine, so per-request opt-out cannot work; "
                "is the package installed in this environment (pip install -e .)?")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        stacked = {".q_proj.": ("q", ".qkv_proj."), ".k_proj.": ("k", ".qkv_proj."), ".v_proj.": ("v", ".qkv_proj.")}
        F = self.config.intermediate_size
        for name, w in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tie and name.startswith("lm_head."):
                continue
            done = False
            for old, (shard, new) in stacked.items():
                if old in name:
                    pname = name.replace(old, new)
                    p = params[pname]
                    p.weight_loader(p, w, shard)
                    loaded.add(pname)
                    done = True
                    break
            if done:
                continue
            parts = name.split(".")
            # per-expert layout: model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight
            if ".mlp.experts." in name and len(parts) >= 3 and parts[-3].isdigit():
                e, kind = int(parts[-3]), parts[-2]
                base = ".".join(parts[:-3])
                if kind in ("gate_proj", "up_proj"):
                    p = params[base + ".gate_up_proj"]
                    rows = slice(0, F) if kind == "gate_proj" else slice(F, 2 * F)
                    p.data[e, rows].copy_(w)
                else:
                    p = params[base + ".down_proj"]
                    p.data[e].copy_(w)
                loaded.add(base + (".down_proj" if kind == "down_proj" else ".gate_up_proj"))
                continue
            if name not in params:
                raise ValueError(f"flexmoe vLLM FlexOlmo: checkpoint tensor {name!r} matches no parameter")
            p = params[name]
            getattr(p, "weight_loader", default_weight_loader)(p, w)
            loaded.add(name)
        if self.tie:
            loaded.add("lm_head.weight")
        return loaded
