"""Tiny random FlexOlmo checkpoints and a character tokenizer for the serving tests (nothing is
downloaded). Used by tests/serving/ and benchmarks/bench_serve.py."""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: char_tokenizer
from char_tokenizer import save_char_tokenizer  # noqa: E402

NAMES = ["public", "news", "code", "medical"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def save_tokenizer(directory: str, vocab_size: int = 128) -> None:
    """The tiers' character-level tokenizer (tests/char_tokenizer.py), with a minimal chat template."""
    save_char_tokenizer(directory, vocab_size, CHAT_TEMPLATE)


def make_model(directory: str, *, expert_bias: bool = True, seed: int = 0, num_layers: int = 2,
               hidden: int = 64, heads: int = 2, experts: Sequence[str] = NAMES, top_k: int = 2,
               init_std: float = 0.15, max_pos: int = 1024):
    """A random FlexOlmo (head size hidden/heads >= 32 for vLLM's CPU attention) saved in fp32
    with a tokenizer. A large init std makes the experts (and so the opt-out) matter and the
    greedy choices well separated. Returns the model."""
    import torch

    import flexmoe_kernels as fk

    torch.manual_seed(seed)
    cfg = fk.FlexOlmoConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=num_layers, num_attention_heads=heads, num_experts=len(experts),
                            num_experts_per_tok=top_k, expert_names=list(experts), expert_bias=expert_bias,
                            initializer_range=init_std, max_position_embeddings=max_pos,
                            pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = fk.FlexOlmoForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            if expert_bias:  # FlexOlmo's bias: min(b, 0) is added, so a positive entry acts as 0
                b = torch.tensor([0.0, -0.7, -0.2, 0.4] + [-0.1] * (len(experts) - 4))[: len(experts)]
                layer.gate.expert_bias.copy_(b)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


def make_removed(src: str, directory: str, allowed: Sequence[int]):
    """The checkpoint ``src`` with every expert outside ``allowed`` physically removed."""
    import flexmoe_kernels as fk

    model = fk.FlexOlmoForCausalLM.from_pretrained(src).eval()
    names = list(model.expert_names)
    for i in sorted(set(range(len(names))) - set(allowed), reverse=True):
        model.remove_expert(i)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    env.update(extra or {})
    return env


def reference_greedy(path: str, prompt_ids: list[int], n: int, allowed: Optional[Sequence[int]] = None):
    """Greedy tokens and their log-probabilities from our PyTorch model (fp32) with every expert
    outside ``allowed`` physically removed: ``(tokens, logprobs)``."""
    import torch

    import flexmoe_kernels as fk

    model = fk.FlexOlmoForCausalLM.from_pretrained(path).eval()
    if allowed is not None:
        for i in sorted(set(range(model.num_experts)) - set(allowed), reverse=True):
            model.remove_expert(i)
    ids = list(prompt_ids)
    toks, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            t = int(torch.argmax(logp))
            toks.append(t)
            lps.append(float(logp[t]))
            ids.append(t)
    return toks, lps


def start_server(model: str, port: int, extra_args: Sequence[str] = (), log_path: Optional[str] = None,
                 env: Optional[dict] = None, timeout: float = 600.0):
    """``flexmoe serve MODEL`` in a subprocess; returns ``(process, seconds until /health answered)``."""
    import subprocess
    import sys
    import time
    import urllib.request

    cmd = [sys.executable, "-m", "flexmoe_training.cli", "serve", model, "--port", str(port), *extra_args]
    log = open(log_path or os.devnull, "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=serve_env(env))
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"flexmoe serve exited with {proc.returncode} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, time.time() - t0
        except OSError:
            time.sleep(1.0)
    proc.kill()
    raise TimeoutError(f"flexmoe serve did not answer /health within {timeout} s (log: {log_path})")


def stop_server(proc) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait()
