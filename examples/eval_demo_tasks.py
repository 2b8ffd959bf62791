"""lm-eval tasks from a ``flexmoe demo`` run's held-out text, one per domain, for ``flexmoe eval``.

    python examples/eval_demo_tasks.py runs/demo/<run> demo_tasks
    flexmoe eval --model runs/demo/<run>/ckpt/merged --include-path demo_tasks \\
        --tasks demo_web,demo_code,demo_man,demo_licenses --opt-out-sweep --out evals/demo

For each domain directory under ``RUN/data`` (``web`` is the public corpus; the owners' domains;
router-tuning data is skipped) the held-out tokens (``val.bin``) are decoded with the run's
tokenizer and cut into passages of ``--tokens`` tokens. Each domain gets two tasks over local
jsonl (``dataset_path: json``, so everything runs offline):

* ``demo_<domain>``: ``loglikelihood_rolling`` over the passages: lm-eval's ``bits_per_byte``
  (lower is better), ``byte_perplexity`` and ``word_perplexity``;
* ``demo_<domain>_mc``: multiple choice: a passage's first half, and its true second half among
  three second halves of other passages of the same domain (``acc``, ``acc_norm``).
"""
from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np

SKIP = ("tune", "tune-val")


def _passages(data_dir: str, tokens: int) -> list[str]:
    from tokenizers import Tokenizer

    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    ids = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.dtype(meta["dtype"]))
    tok = Tokenizer.from_file(os.path.join(data_dir, meta["tokenizer"]["file"]))
    eos = meta.get("eos_token_id")
    out = []
    for start in range(0, len(ids) - tokens // 2, tokens):
        chunk = [int(t) for t in ids[start:start + tokens] if int(t) != eos]
        text = tok.decode(chunk).strip()
        if len(text) >= 40:
            out.append(text)
    return out


def _cut(text: str) -> int:
    """Where a passage is split for the multiple-choice task: the last space before its middle
    (so that every choice starts like a word does), else the middle."""
    mid = len(text) // 2
    space = text.rfind(" ", 0, mid)
    return space if space > mid // 2 else mid


def _write(out: str, name: str, yaml_text: str, rows: list[dict]) -> None:
    path = os.path.join(out, f"{name}.jsonl")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out, f"{name}.yaml"), "w") as fh:
        fh.write(yaml_text.format(name=name, path=os.path.abspath(path)))


ROLLING = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
  - metric: word_perplexity
"""

MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a flexmoe demo run directory (runs/demo/<run>)")
    p.add_argument("out", help="directory for the task YAML and jsonl files")
    p.add_argument("--tokens", type=int, default=96, help="tokens per passage (default 96)")
    p.add_argument("--seed", type=int, default=0, help="seed of the distractor choice (default 0)")
    args = p.parse_args(argv)
    data = os.path.join(args.run, "data")
    if not os.path.isdir(data):
        p.error(f"run {args.run!r} has no data/ directory: give a flexmoe demo run directory")
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    for domain in sorted(os.listdir(data)):
        if domain in SKIP or not os.path.isfile(os.path.join(data, domain, "val.bin")):
            continue
        passages = _passages(os.path.join(data, domain), args.tokens)
        if len(passages) < 4:
            print(f"{domain}: {len(passages)} held-out passages, skipped")
            continue
        _write(args.out, f"demo_{domain}", ROLLING, [{"text": t} for t in passages])
        rows = []
        for i, t in enumerate(passages):
            cut = _cut(t)
            others = [q for j, q in enumerate(passages) if j != i]
            wrong = [q[_cut(q):][: len(t) - cut] for q in rng.sample(others, 3)]
            choices = [t[cut:]] + wrong
            order = list(range(4))
            rng.shuffle(order)
            rows.append({"context": t[:cut], "choices": [choices[k] for k in order], "label": order.index(0)})
        _write(args.out, f"demo_{domain}_mc", MC, rows)
        print(f"{domain}: {len(passages)} passages -> demo_{domain}, demo_{domain}_mc")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
