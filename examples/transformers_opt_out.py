"""Our MoE layer in a Hugging Face transformers model, with per-user expert opt-out.

Runs on CPU in seconds with a tiny random OLMoE-style model (no network, nothing saved)::

    python examples/transformers_opt_out.py [--model-type flex_olmo|olmoe|qwen3_moe|mixtral]

It patches the model with ``apply_flexmoe``, checks that the patched logits equal
transformers' own, opts one expert out in ``forward``, in ``generate`` (one permission set
per sequence) and through the ``allowed_experts`` context manager, and shows that opting
out equals the model rebuilt without that expert.
"""
from __future__ import annotations

import argparse
import copy

import torch
import transformers

from flexmoe_kernels.integrations.transformers import allowed_experts, apply_flexmoe

NAMES = ["public", "news", "code", "medical"]


def tiny_model(model_type: str, num_experts: int = 4) -> torch.nn.Module:
    """A random 2-layer model of ``model_type`` with ``num_experts`` experts, top-2."""
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2, initializer_range=0.2, num_experts_per_tok=2)
    config_class = transformers.AutoConfig.for_model(model_type).__class__
    experts_key = "num_local_experts" if model_type == "mixtral" else "num_experts"
    config = config_class(**common, **{experts_key: num_experts})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def without_expert(model: torch.nn.Module, drop: int) -> torch.nn.Module:
    """The same transformers model physically rebuilt without expert ``drop``."""
    keep = [e for e in range(len(NAMES)) if e != drop]
    config = copy.deepcopy(model.config)
    setattr(config, "num_local_experts" if config.model_type == "mixtral" else "num_experts", len(keep))
    small = type(model)(config).float().eval()
    expert_keys = ("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")
    small.load_state_dict({k: v[keep] if k.endswith(expert_keys) else v for k, v in model.state_dict().items()})
    return small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="olmoe", choices=["flex_olmo", "olmoe", "qwen3_moe", "mixtral"])
    args = parser.parse_args()

    reference = tiny_model(args.model_type)
    model = apply_flexmoe(copy.deepcopy(reference), expert_names=NAMES)   # patched in place
    input_ids = torch.randint(3, 128, (2, 8))                             # (B, S)

    same = (model(input_ids).logits - reference(input_ids).logits).abs().max().item()
    print(f"{args.model_type}: patched vs transformers, max |logit difference| = {same:.2e}")

    no_news = model(input_ids, allowed_experts=["public", "code", "medical"]).logits
    rebuilt = without_expert(reference, NAMES.index("news"))(input_ids).logits
    print(f"opt out 'news' vs model rebuilt without it: {(no_news - rebuilt).abs().max().item():.2e}")

    per_user = torch.tensor([[1, 1, 1, 1],                                # user 0: every expert
                             [1, 0, 1, 0]], dtype=torch.bool)             # user 1: public + code
    tokens = model.generate(input_ids, max_new_tokens=6, do_sample=False, allowed_experts=per_user,
                            pad_token_id=0)
    print("generate with one permission set per sequence:", tuple(tokens.shape))

    with allowed_experts(model, ["public", "code"]):                      # for pipelines / trainers
        out = model(input_ids, labels=input_ids, output_router_logits=True)
    print(f"in the context manager: loss {out.loss.item():.3f}, aux loss {out.aux_loss.item():.3f}, "
          f"{len(out.router_logits)} router logit tensors of shape {tuple(out.router_logits[0].shape)}")


if __name__ == "__main__":
    main()
