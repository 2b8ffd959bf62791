"""Tiny random models, a character tokenizer and two small local lm-eval tasks for the
``flexmoe eval`` tests (nothing is downloaded)."""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: char_tokenizer
from char_tokenizer import save_char_tokenizer  # noqa: E402

NAMES = ["public", "news", "code", "medical"]

MC_DOCS = [
    {"question": "Question: 2 + 2 =", "choices": [" 4", " 5", " 22"], "label": 0},
    {"question": "Question: the sky is", "choices": [" blue", " green", " loud"], "label": 0},
    {"question": "Question: def f(x): return", "choices": [" x", " ))", " the"], "label": 0},
    {"question": "Question: cats say", "choices": [" woof", " meow"], "label": 1},
    {"question": "Question: 10 / 2 =", "choices": [" 3", " 5", " 8", " 1"], "label": 1},
    {"question": "Question: ls lists", "choices": [" files", " cats"], "label": 0},
]
GEN_DOCS = [
    {"prompt": "Say hi:", "answer": " hi"},
    {"prompt": "Copy abc:", "answer": " abc"},
    {"prompt": "1 2 3", "answer": " 4"},
    {"prompt": "print(", "answer": "x)"},
]


def save_tokenizer(directory: str, vocab_size: int = 128) -> None:
    """The tiers' character-level tokenizer (tests/char_tokenizer.py)."""
    save_char_tokenizer(directory, vocab_size)


def make_flexolmo(directory: str, *, seed: int = 0, experts: Sequence[str] = NAMES, top_k: int = 2,
                  hidden: int = 32, layers: int = 2, init_std: float = 0.2, expert_bias: bool = False):
    """A random FlexOlmo (our classes) saved with the tokenizer; returns the model. A large
    init std makes the experts (and so the opt-out) change the scores. ``expert_bias``: FlexOlmo's
    router bias (ours only; transformers' flex_olmo has none), with negative entries that act."""
    import torch

    import flexmoe_kernels as fk

    torch.manual_seed(seed)
    cfg = fk.FlexOlmoConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2, num_experts=len(experts),
                            num_experts_per_tok=top_k, expert_names=list(experts), initializer_range=init_std,
                            max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                            expert_bias=expert_bias)
    model = fk.FlexOlmoForCausalLM(cfg).eval()
    if expert_bias:
        with torch.no_grad():
            for layer in model.moe_layers():
                layer.gate.expert_bias.copy_(torch.linspace(0.3, -1.5, len(experts)))
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


def make_removed(src: str, directory: str, allowed: Sequence[str], top_k: int):
    """``src`` rebuilt without the experts outside ``allowed`` (physically removed), routing
    ``top_k`` experts per token, saved with the tokenizer to ``directory``."""
    import flexmoe_kernels as fk

    model = fk.FlexOlmoForCausalLM.from_pretrained(src)
    model.set_top_k(top_k)  # first: a removal may leave fewer experts than the old top-k
    for name in [n for n in model.expert_names if n not in allowed]:
        model.remove_expert(name)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


def make_dense(directory: str) -> None:
    """A tiny dense (OLMo-2) transformers model: not an MoE."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Olmo2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=256, pad_token_id=0,
                                   eos_token_id=1, bos_token_id=2)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(directory)
    save_tokenizer(directory)


def write_tasks(directory: str) -> str:
    """Two tasks over local jsonl (``dataset_path: json``): ``toy_mc`` (multiple choice, acc and
    acc_norm) and ``toy_gen`` (generate_until, exact_match). Returns ``directory``."""
    os.makedirs(directory, exist_ok=True)
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as fh:
            fh.writelines(json.dumps(d) + "\n" for d in docs)
    mc = os.path.join(directory, "mc.jsonl")
    gen = os.path.join(directory, "gen.jsonl")
    with open(os.path.join(directory, "toy_mc.yaml"), "w") as fh:
        fh.write(f"""task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    with open(os.path.join(directory, "toy_gen.yaml"), "w") as fh:
        fh.write(f"""task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return directory
