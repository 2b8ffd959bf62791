"""FlexOlmo models: config, decoder, KV cache and Hugging Face checkpoints."""
from .attention import KVCache
from .checkpoint import CheckpointError, tensors_sha256
from .config import FlexOlmoConfig
from .flex_olmo import CausalLMOutput, FlexOlmoForCausalLM, FlexOlmoModel
from .hub import RELEASED_EXPERT_NAMES, resolve_checkpoint

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "FlexOlmoConfig",
    "FlexOlmoForCausalLM",
    "FlexOlmoModel",
    "KVCache",
    "RELEASED_EXPERT_NAMES",
    "resolve_checkpoint",
    "tensors_sha256",
]
