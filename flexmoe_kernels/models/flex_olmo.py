"""FlexOlmo decoder: ``FlexOlmoModel`` and ``FlexOlmoForCausalLM`` (forward, loss, generate).

Legend: B batch, S sequence (new positions), P past positions, D hidden, V vocabulary,
E experts, K top-k, L layers, T = B*S tokens.

Each block is post-norm (FlexOlmo / OLMo-2 "reordered norm"; :mod:`.blocks`, which also holds
the optional per-block activation checkpointing: :meth:`FlexOlmoForCausalLM.gradient_checkpointing_enable`).
Parameter names equal Hugging Face's ``FlexOlmoForCausalLM``, so state dicts map 1:1.
``allowed_experts`` (names/indices, bool (E,), (B, E) per sequence or (T, E) per token) is
resolved and checked once per forward (a tensor: one host sync; names: none; ``validate=False``
or CUDA-graph capture: none) and the same mask goes to every layer, which does not check it
again: an opted-out expert is removed exactly (logit -inf before the softmax) and its weights
are never read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._validate import check_positive_int
from ..modules import FlexMoE
from ..modules.allow import AllowedExperts, allowed_expert_indices, checked_allow_mask, resolve_allowed_experts
from ..ops.backends import BACKENDS
from .attention import KVCache, RMSNorm, RotaryEmbedding
from .blocks import FlexOlmoDecoderLayer, run_layers
from .pretrained import load_pretrained as _load_pretrained
from .checkpoint import save_pretrained as _save_pretrained
from .config import FlexOlmoConfig
from .hub import checkpoint_expert_names, resolve_checkpoint

__all__ = [
    "FlexOlmoConfig",
    "FlexOlmoModel",
    "FlexOlmoForCausalLM",
    "FlexOlmoDecoderLayer",
    "CausalLMOutput",
    "KVCache",
]


@dataclass
class CausalLMOutput:
    """Output of :meth:`FlexOlmoForCausalLM.forward`.

    logits: (B, S, V) in the model dtype. loss: scalar float32 mean shifted CE, or None.
    past_key_values: the :class:`KVCache` when ``use_cache``. router_logits: tuple of L
    (T, E) float32 masked router logits when ``output_router_logits``.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    past_key_values: Optional[KVCache] = None
    router_logits: Optional[tuple] = None
    last_hidden_state: Optional[torch.Tensor] = None


class FlexOlmoModel(nn.Module):
    """Embeddings, L decoder layers and the final RMSNorm (no LM head)."""

    def __init__(self, config: FlexOlmoConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(FlexOlmoDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        # activation checkpointing per block in training mode (blocks.run_layers); not in the config
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        allowed_experts: AllowedExperts = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        position_ids: Optional[torch.Tensor] = None,
        output_router_logits: bool = False,
        *,
        validate: bool = True,
    ):
        """Returns ``(hidden (B, S, D), cache or None, router_logits tuple or None)``.

        See :meth:`FlexOlmoForCausalLM.forward` for the arguments.
        """
        cfg = self.config
        _check_input_ids(input_ids, cfg.vocab_size)
        B, S = input_ids.shape
        device = input_ids.device
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise TypeError(f"past_key_values must be a KVCache, got {type(past_key_values).__name__}")
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(
                f"past_key_values has {len(past_key_values)} layers, the model has {len(self.layers)}"
            )
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(len(self.layers))
        past = 0 if cache is None else cache.get_seq_length()
        if cache is not None and cache.layers[0] is not None and cache.layers[0][0].shape[0] != B:
            raise ValueError(
                f"past_key_values holds batch {cache.layers[0][0].shape[0]}, input_ids has batch {B}"
            )

        key_valid_BL = None
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            if attention_mask.shape != (B, past + S):
                raise ValueError(
                    f"attention_mask must have shape (B, past + S)=({B}, {past + S}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                raise TypeError(f"attention_mask must be bool or integer (1 = token, 0 = pad), got {attention_mask.dtype}")
            key_valid_BL = attention_mask.to(device=device, dtype=torch.bool)
            if bool(key_valid_BL.all()):
                key_valid_BL = None  # no padding: take the plain causal path

        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=device)[None].expand(B, S)
        else:
            if not isinstance(position_ids, torch.Tensor) or position_ids.shape not in ((B, S), (S,)):
                raise ValueError(f"position_ids must have shape (B, S)=({B}, {S}) or (S,)")
            position_ids = position_ids.to(device).expand(B, S)

        top_k = max(layer.mlp.top_k for layer in self.layers)  # the one check covers every layer
        allow = checked_allow_mask(allowed_experts, cfg.expert_names, (B, S), device, top_k, validate)
        h = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb(position_ids, h.dtype)
        h, router_logits = run_layers(self.layers, h, cos_sin, key_valid_BL, cache, allow,
                                      checkpointing=self.gradient_checkpointing and self.training)
        return self.norm(h), cache, (tuple(router_logits) if output_router_logits else None)


def _check_input_ids(input_ids: object, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"input_ids must be an integer tensor (int64), got dtype {input_ids.dtype}")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must have shape (B, S) with B, S >= 1, got {tuple(input_ids.shape)}")
    if input_ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"input_ids must be in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]")


def _check_generate_args(input_ids, vocab_size, max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    """Raise ValueError (TypeError for ids of the wrong type) unless :meth:`FlexOlmoForCausalLM.generate`'s
    arguments are valid: ids as :func:`_check_input_ids`, ``max_new_tokens`` an int >= 0 and,
    only when sampling, temperature > 0, top_k None or an int >= 1, top_p None or in (0, 1]."""
    _check_input_ids(input_ids, vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample:
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def _generation_attention_mask(attention_mask, B: int, S: int, device) -> Optional[torch.Tensor]:
    """The prompt mask of :meth:`FlexOlmoForCausalLM.generate` as a (B, S) long tensor on
    ``device`` (None stays None); ValueError unless it is a tensor of shape (B, S)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (B, S):
        raise ValueError(
            f"attention_mask must be a (B, S)=({B}, {S}) tensor, got "
            f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}"
        )
    return attention_mask.to(device=device, dtype=torch.long)


def _new_positions(mask_BL: Optional[torch.Tensor], n_new: int) -> Optional[torch.Tensor]:
    """Position ids (B, n_new) of the last ``n_new`` tokens under a left-padding mask (B, L):
    the count of real tokens before each one (0 for pads); None when there is no mask."""
    if mask_BL is None:
        return None
    pos = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    return pos[:, -n_new:]


class FlexOlmoForCausalLM(nn.Module):
    """FlexOlmo language model: :class:`FlexOlmoModel` + ``lm_head`` (tied to the embeddings if configured).

    ``model(input_ids, allowed_experts=None, labels=None, ...) -> CausalLMOutput``;
    ``generate(...)``; ``from_pretrained(dir)`` / ``save_pretrained(dir)`` (Hugging Face layout).
    """

    def __init__(self, config: FlexOlmoConfig):
        super().__init__()
        if not isinstance(config, FlexOlmoConfig):
            raise TypeError(f"config must be a FlexOlmoConfig, got {type(config).__name__}")
        self.config = config
        self.model = FlexOlmoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Hugging Face's init: normal(0, initializer_range) for linears, embeddings, routers and
        experts; RMSNorm weights 1; the padding embedding row 0; expert biases 0."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, FlexMoE):
                m.reset_parameters(std)

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding matrix when ``tie_word_embeddings``."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def expert_names(self) -> list[str]:
        return list(self.config.expert_names)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def moe_layers(self) -> list[FlexMoE]:
        return [layer.mlp for layer in self.model.layers]

    def set_top_k(self, k: int) -> None:
        """Route every token to ``k`` experts in every layer (1 <= k <= E)."""
        check_positive_int(k, "k")
        if k > self.config.num_experts:
            raise ValueError(f"k={k} is larger than num_experts={self.config.num_experts}")
        self.config.num_experts_per_tok = k
        for moe in self.moe_layers():
            moe.top_k = k

    def set_moe_backend(self, name: str) -> None:
        """Select the FlexMoE backend ("auto", "torch", "triton", "cuda") for every layer."""
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS) + ['auto']}, got {name!r}")
        self.config.moe_backend = name
        for moe in self.moe_layers():
            moe.backend = name

    def set_attn_implementation(self, name: str) -> None:
        """Select "auto", "sdpa" or "flash_attn" for every layer."""
        from .config import ATTN_IMPLEMENTATIONS

        if name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {name!r}")
        self.config.attn_implementation = name
        for layer in self.model.layers:
            layer.self_attn.attn_implementation = name

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing per decoder block in training mode: each block's activations
        are recomputed in the backward pass (less memory, one more block forward); outputs and
        gradients equal the run without it (:func:`.blocks.run_layers`)."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keep every block's activations again (the default)."""
        self.model.gradient_checkpointing = False

    def remove_expert(self, name_or_index: Union[str, int]) -> None:
        """Physically remove an expert from every layer (FFN, router row, bias) and the config."""
        i = self.moe_layers()[0].expert_index(name_or_index)
        if self.config.num_experts - 1 < self.config.num_experts_per_tok:
            raise ValueError(
                f"cannot remove expert {self.config.expert_names[i]!r}: {self.config.num_experts - 1} "
                f"experts would remain, fewer than num_experts_per_tok={self.config.num_experts_per_tok}"
            )
        for moe in self.moe_layers():
            moe.remove_expert(i)
        names = [n for j, n in enumerate(self.config.expert_names) if j != i]
        self.config.num_experts = len(names)
        self.config.expert_names = names

    def rename_expert(self, old: Union[str, int], new: str) -> None:
        """Rename an expert in every layer and in the config."""
        i = self.moe_layers()[0].expert_index(old)
        for moe in self.moe_layers():
            moe.rename_expert(i, new)
        self.config.expert_names = list(self.moe_layers()[0].expert_names)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        allowed_experts: AllowedExperts = None,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        output_router_logits: bool = False,
        position_ids: Optional[torch.Tensor] = None,
        *,
        validate: bool = True,
    ) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids: (B, S) integer token ids in [0, V).
            allowed_experts: None (all), expert names/indices (global), or a bool tensor
                (E,), (B, E) (per sequence) or (B*S, E) (per token). Opted-out experts are removed
                exactly; every token must allow at least K experts (``ValueError`` otherwise).
            labels: optional (B, S) integer targets aligned with ``input_ids``; the loss is the
                mean cross-entropy of logits[:, :-1] against labels[:, 1:], ignoring -100;
                every other label must be in [0, V) (``ValueError`` naming ``labels``).
            attention_mask: optional (B, P + S) bool/int, 1 = token, 0 = padding (keys only;
                covers the cached past too).
            past_key_values: a :class:`KVCache` from a previous call (its P positions come first).
            use_cache: return the (new or updated) cache in ``past_key_values``.
            output_router_logits: return each layer's (B*S, E) float32 masked router logits.
            position_ids: optional (B, S) or (S,) RoPE positions; default ``P .. P+S-1``.
            validate: check ``allowed_experts`` once here (every layer then uses it unchecked):
                names/indices on the host (no device sync), a tensor with one host sync (none
                under CUDA-graph capture). ``False``: unchecked (``docs/SEMANTICS.md`` §2.5).

        Returns:
            :class:`CausalLMOutput` with ``logits`` (B, S, V).
        """
        h, cache, router_logits = self.model(
            input_ids,
            allowed_experts=allowed_experts,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_ids=position_ids,
            output_router_logits=output_router_logits,
            validate=validate,
        )
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(
            logits=logits,
            loss=loss,
            past_key_values=cache if (use_cache or past_key_values is not None) else None,
            router_logits=router_logits,
            last_hidden_state=h,
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        allowed_experts: AllowedExperts = None,
        eos_token_id: Union[None, int, Sequence[int]] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pad_token_id: Optional[int] = None,
    ) -> torch.Tensor:
        """Autoregressive decoding: returns (B, S + n) int64, n <= ``max_new_tokens``.

        Args:
            input_ids: (B, S) prompt ids (left-pad ragged prompts and pass ``attention_mask``).
            max_new_tokens: number of tokens to append (fewer if every sequence hit eos).
            do_sample: sample instead of greedy argmax.
            temperature, top_k, top_p: sampling filters (temperature > 0; top_k >= 1; 0 < top_p <= 1).
            allowed_experts: as in :meth:`forward` but per sequence: names/indices, (E,) or (B, E);
                a (B, E) mask applies to the prompt and to every new token of that sequence.
            eos_token_id: int or list; None = ``config.eos_token_id``. A finished sequence is
                padded with ``pad_token_id`` (default: config's, else its eos id).
            use_cache: decode with a :class:`KVCache` (same greedy tokens as without).
            generator: optional ``torch.Generator`` (on the model's device) for reproducible sampling.
            attention_mask: optional (B, S) prompt mask (1 = token, 0 = left padding).
        """
        _check_generate_args(input_ids, self.config.vocab_size, max_new_tokens, do_sample, temperature, top_k, top_p)
        B, S = input_ids.shape
        device = input_ids.device
        allow = self._generation_allow_mask(allowed_experts, B, device)
        pad, eos_t = self._generation_eos_pad(eos_token_id, pad_token_id, device)
        attention_mask = _generation_attention_mask(attention_mask, B, S, device)
        tokens = input_ids.to(torch.long)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        cache = None
        step_input = tokens
        for _ in range(max_new_tokens):
            logits_BV, cache = self._decode_logits(tokens, step_input, allow, attention_mask, cache, use_cache)
            nxt = self._next_token(logits_BV, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            if eos_t is not None:
                finished |= torch.isin(nxt, eos_t)
                if bool(finished.all()):
                    break
            step_input = nxt[:, None]
        return tokens

    def _generation_eos_pad(
        self, eos_token_id: Union[None, int, Sequence[int]], pad_token_id: Optional[int], device
    ) -> tuple[int, Optional[torch.Tensor]]:
        """Resolve :meth:`generate`'s stop and pad ids: returns ``(pad id, eos ids as a long
        tensor on device or None when there are none)``.

        ``eos_token_id`` None means ``config.eos_token_ids``; an int or a sequence is used as is
        (an empty sequence disables stopping). The pad id is ``pad_token_id``, else
        ``config.pad_token_id``, else the first eos id, else 0.
        """
        cfg = self.config
        eos = cfg.eos_token_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        )
        pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
        eos_t = torch.tensor(eos, device=device, dtype=torch.long) if eos else None
        return pad, eos_t

    def _decode_logits(self, tokens, step_input, allow, attention_mask, cache, use_cache):
        """One decoding forward of :meth:`generate`: returns ``(last-position logits (B, V) fp32,
        the updated cache)``.

        With ``use_cache`` only ``step_input`` (the prompt on the first step, then the last new
        token) goes through the model with ``cache`` (None on the first step); without it the
        whole ``tokens`` sequence is run again and the cache stays None. ``attention_mask``
        (B, L) covers ``tokens`` and sets the positions of left-padded rows. ``allow`` was
        checked by :meth:`_generation_allow_mask`: no step checks it again.
        """
        if use_cache:
            out = self(step_input, allowed_experts=allow, attention_mask=attention_mask,
                       past_key_values=cache, use_cache=True, validate=False,
                       position_ids=_new_positions(attention_mask, step_input.shape[1]))
            cache = out.past_key_values
        else:
            out = self(tokens, allowed_experts=allow, attention_mask=attention_mask, validate=False,
                       position_ids=_new_positions(attention_mask, tokens.shape[1]))
        return out.logits[:, -1, :].float(), cache

    def _generation_allow_mask(self, allowed_experts: AllowedExperts, B: int, device) -> AllowedExperts:
        """Canonical per-sequence form for generation: None, (E,) or (B, E) bool, checked here
        once for the whole generation (a tensor: one host sync; names/indices: on the host, no
        sync), so the decoding forwards run with ``validate=False``."""
        if allowed_experts is None:
            return None
        E = self.config.num_experts
        if isinstance(allowed_experts, torch.Tensor):
            if allowed_experts.dtype != torch.bool:
                raise TypeError(f"allowed_experts tensor must be bool, got {allowed_experts.dtype}")
            if allowed_experts.shape not in ((E,), (B, E)):
                raise ValueError(
                    f"allowed_experts for generate must have shape (E,)=({E},) or (B, E)=({B}, {E}) "
                    f"(per-token masks cannot extend to new tokens), got {tuple(allowed_experts.shape)}"
                )
            m = allowed_experts.to(device)
            fewest = int(m.sum(-1).min())
        else:
            fewest = len(allowed_expert_indices(allowed_experts, self.config.expert_names))
            m = resolve_allowed_experts(allowed_experts, self.config.expert_names, (B, 1), device)
        top_k = max(moe.top_k for moe in self.moe_layers())
        if fewest < top_k:
            raise ValueError(
                f"allowed_experts allows {fewest} experts for some sequence, fewer than "
                f"num_experts_per_tok={top_k}"
            )
        return m

    @staticmethod
    def _next_token(logits_BV, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
        if not do_sample:
            return logits_BV.argmax(-1)
        z = logits_BV / float(temperature)
        if top_k is not None and top_k < z.shape[-1]:
            kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_z, idx = torch.sort(z, dim=-1, descending=True)
            cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
            # drop a token when the mass before it already reaches top_p (the top token always stays)
            drop_sorted = (cum - torch.softmax(sorted_z, dim=-1)) >= top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
            z = z.masked_fill(drop, float("-inf"))
        probs = torch.softmax(z, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Union[str, os.PathLike],
        dtype: Optional[torch.dtype] = None,
        device: Union[None, str, torch.device] = None,
        *,
        revision: Optional[str] = None,
        cache_dir: Union[None, str, os.PathLike] = None,
        local_files_only: bool = False,
        token: Union[None, bool, str] = None,
        **config_overrides,
    ) -> "FlexOlmoForCausalLM":
        """Load a Hugging Face FlexOlmo checkpoint (config.json + safetensors, fused or per-expert
        layout, single file or sharded) from a directory or a Hub id such as
        ``"allenai/FlexOlmo-7x7B-1T"`` (:func:`flexmoe_kernels.models.hub.resolve_checkpoint`:
        needs ``huggingface_hub``; ``revision``, ``cache_dir``, ``local_files_only`` and ``token``
        are passed to it; only JSON, safetensors and tokenizer files are fetched).
        ``dtype`` None keeps the checkpoint's dtype. ``config_overrides`` (e.g.
        ``moe_backend="triton"``) replace config fields. A config without ``expert_names`` gets
        the names of Ai2's released checkpoints when it is one of them
        (:data:`flexmoe_kernels.models.hub.RELEASED_EXPERT_NAMES`)."""
        directory = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token, argument="name_or_path")
        if "expert_names" not in config_overrides:
            names = checkpoint_expert_names(name_or_path, directory)
            if names is not None:
                config_overrides["expert_names"] = names
        return _load_pretrained(directory, cls, dtype=dtype, device=device, **config_overrides)

    def save_pretrained(self, directory: Union[str, os.PathLike], max_shard_size: Optional[int] = None) -> None:
        """Atomically write config.json + model.safetensors (sharded above ``max_shard_size`` bytes)."""
        _save_pretrained(self, directory, max_shard_size=max_shard_size)


def _check_label_values(labels_BS: torch.Tensor, vocab_size: int) -> None:
    """``ValueError`` naming ``labels``, the offending values and their (b, s) positions unless
    every label is -100 (ignored) or in [0, vocab_size). Checked on the labels' own device:
    labels on the CPU cost no device sync; labels on CUDA cost one device-to-host sync (the
    ``any()`` read back, as ``input_ids`` are checked), skipped while a CUDA graph is captured."""
    if labels_BS.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    bad_BS = (labels_BS != -100) & ((labels_BS < 0) | (labels_BS >= vocab_size))
    if not bool(bad_BS.any()):
        return
    vals = labels_BS[bad_BS]
    where = [tuple(p) for p in bad_BS.nonzero()[:5].tolist()]
    raise ValueError(
        f"labels must be -100 (ignored) or in [0, vocab_size={vocab_size}), got {vals.numel()} value(s) outside "
        f"(in [{int(vals.min())}, {int(vals.max())}]): {vals[:5].tolist()} at (b, s) {where}"
        f"{' ...' if vals.numel() > 5 else ''}")


def causal_lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32: logits[:, :-1] vs labels[:, 1:], -100 ignored.

    ``labels_BS``: (B, S) integer tensor, every value -100 or in [0, V) (``TypeError`` /
    ``ValueError`` naming ``labels`` otherwise; see :func:`_check_label_values` for its cost).
    """
    if not isinstance(labels_BS, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels_BS).__name__}")
    if labels_BS.is_floating_point() or labels_BS.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels_BS.dtype}")
    if labels_BS.shape != logits_BSV.shape[:2]:
        raise ValueError(f"labels must have shape (B, S)={tuple(logits_BSV.shape[:2])}, got {tuple(labels_BS.shape)}")
    V = logits_BSV.shape[-1]
    _check_label_values(labels_BS, V)
    shift_logits = logits_BSV[:, :-1, :].reshape(-1, V).float()
    shift_labels = labels_BS[:, 1:].reshape(-1).to(device=logits_BSV.device, dtype=torch.long)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
