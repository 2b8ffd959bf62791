from .allow import resolve_allowed_experts
from .flex_moe import FlexMoE

__all__ = ["FlexMoE", "resolve_allowed_experts"]
