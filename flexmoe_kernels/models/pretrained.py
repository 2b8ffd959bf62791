"""Build a model from a checkpoint directory: ours / Hugging Face ``flex_olmo`` (sharded
safetensors, :mod:`.checkpoint`) or a Hugging Face ``olmo2`` checkpoint read as our dense public
model (:mod:`.olmo2`). Its own module so that neither of those imports the other."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..utils.fs import remove_stale_temporaries

from .checkpoint import _check_against, convert_state_dict, load_state_dict
from .config import FlexOlmoConfig
from .olmo2 import checkpoint_model_type, open_olmo2

__all__ = ["load_pretrained"]


def load_pretrained(
    directory: Union[str, os.PathLike],
    cls,
    dtype: Optional[torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    **config_overrides,
):
    """Build a ``cls`` model (``cls(config)``, e.g. ``FlexOlmoForCausalLM``) from a checkpoint
    directory (see :meth:`FlexOlmoForCausalLM.from_pretrained`).

    ``cls`` is passed in so that this module does not import the model module (which imports
    this one). ``dtype`` None keeps the stored dtype of the embedding matrix (all tensors are
    cast to one dtype). Parameters are created on the meta device and assigned from the file,
    so nothing is initialised twice. Temporary directories that a killed save of this
    checkpoint left beside it are removed (:func:`flexmoe_kernels.utils.fs.remove_stale_temporaries`).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    remove_stale_temporaries(directory)  # a save of this checkpoint killed mid-way (utils.fs)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if checkpoint_model_type(directory) == "olmo2":  # OLMo-2: read as our dense model (models.olmo2)
        config, src = open_olmo2(directory, "checkpoint")
        config = config.copy(**config_overrides) if config_overrides else config
        sd = {k: src[k] for k in src}
    else:
        config = FlexOlmoConfig.from_pretrained(directory, **config_overrides)
        sd = convert_state_dict(load_state_dict(directory), config.num_experts)
    with torch.device("meta"):
        model = cls(config)
    _check_against(model, sd)
    if dtype is None:
        dtype = sd["model.embed_tokens.weight"].dtype
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    # Non-persistent buffers were created on meta: rebuild them.
    from ..modules import FlexMoE

    for m in model.modules():
        if isinstance(m, FlexMoE):
            m.trainable_experts = torch.ones(m.num_experts, dtype=torch.bool)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: tensors left on the meta device after loading: {leftover}")
    if device is not None:
        model.to(device)
    return model.eval()
