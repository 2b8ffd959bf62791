"""FlexOlmo models: config, decoder, KV cache and Hugging Face checkpoints."""
from .attention import KVCache
from .checkpoint import CheckpointError, tensors_sha256
from .config import FlexOlmoConfig
from .flex_olmo import CausalLMOutput, FlexOlmoForCausalLM, FlexOlmoModel

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "FlexOlmoConfig",
    "FlexOlmoForCausalLM",
    "FlexOlmoModel",
    "KVCache",
    "tensors_sha256",
]
