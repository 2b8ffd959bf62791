"""Serving benchmark: throughput, TTFT and TPOT of ``flexmoe serve`` with mixed per-request
allowed sets versus no opt-out, on the same server.

One server (``flexmoe serve MODEL``; vLLM's OpenAI-compatible API with the flexmoe plugin) is
started, warmed up, then each scenario sends ``--requests`` streaming completions with
``--concurrency`` in flight:

* ``all``: no ``allowed_experts`` (every expert; the mask op skips masking when no row is
  restricted);
* ``mixed``: request i allows ``SETS[i % len(SETS)]`` (different sets in the same batches,
  plus some unrestricted requests).

Per scenario: output tokens/s (all output tokens / wall time), request/s, TTFT (time to the
first streamed token) and TPOT ((last - first token time) / (tokens - 1)), medians and p90.
Prompts differ per request (no prefix-cache hits between them). ``--smoke`` builds a tiny
random FlexOlmo (tests/serving/serve_helpers.py) and runs a few requests in eager mode: a CPU
check of the harness (its numbers mean little). Run it in the serve venv (README, 'Serving')::

    python -m benchmarks.bench_serve --smoke
    python -m benchmarks.bench_serve --model ckpt/merged --requests 64 --concurrency 16 -- --dtype bfloat16
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "8",
              "--kv-cache-memory-bytes", str(32 << 20), "--disable-log-stats"]


def _helpers():
    sys.path.insert(0, os.path.join(ROOT, "tests", "serving"))
    import serve_helpers

    return serve_helpers


def _sets(names: list[str], top_k: int) -> list:
    """A few allowed sets of sizes top_k .. E-1 (names and indices mixed), and None (every expert)."""
    E = len(names)
    out = []
    for i in range(E):
        size = top_k + (i % max(1, E - top_k))
        idx = [(i + j) % E for j in range(size)]
        out.append([names[k] for k in idx] if i % 2 == 0 else idx)
    return out + [None]


def _one(client, model, prompt, allowed, max_tokens):
    # skip_special_tokens=False: every token streams a chunk (a random model emits special tokens,
    # which would otherwise be held back and delay the "first token" by many steps)
    extra = {"ignore_eos": True, "skip_special_tokens": False}
    if allowed is not None:
        extra["vllm_xargs"] = {"allowed_experts": allowed}
    t0 = time.perf_counter()
    times = []
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body=extra):
        if chunk.choices and chunk.choices[0].text is not None:  # one token per chunk (stream_interval 1)
            times.append(time.perf_counter())
    n = max(len(times), 1)
    ttft = (times[0] - t0) if times else float("nan")
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "chunks": len(times), "end": time.perf_counter()}


def _pct(xs, q):
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_scenario(client, model, sets, args, tag) -> dict:
    prompts = [f"Request {tag} {i}: " + "tell me something about expert opt-out. " * args.prompt_repeat
               for i in range(args.requests)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(args.concurrency) as ex:
        res = list(ex.map(lambda i: _one(client, model, prompts[i], sets[i % len(sets)], args.max_tokens),
                          range(args.requests)))
    wall = time.perf_counter() - t0
    tokens = args.requests * args.max_tokens
    return {"scenario": tag, "requests": args.requests, "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "requests_per_s": args.requests / wall,
            "ttft_median_s": statistics.median(r["ttft"] for r in res), "ttft_p90_s": _pct([r["ttft"] for r in res], .9),
            "tpot_median_s": statistics.median(r["tpot"] for r in res), "tpot_p90_s": _pct([r["tpot"] for r in res], .9)}


def _model_info(path: str) -> tuple[list[str], int]:
    from flexmoe_kernels.models.config import read_json_object

    cfg = read_json_object(os.path.join(path, "config.json"))
    E = int(cfg["num_experts"])
    return list(cfg.get("expert_names") or [f"expert_{i}" for i in range(E)]), int(cfg["num_experts_per_tok"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="FlexOlmo checkpoint directory (default with --smoke: a tiny random one)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, few requests, eager (CPU check)")
    p.add_argument("--requests", type=int, default=None, help="requests per scenario (default 32; smoke 8)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 8; smoke 4)")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 64; smoke 16)")
    p.add_argument("--prompt-repeat", type=int, default=2, help="prompt length knob (x 40 characters)")
    p.add_argument("--rounds", type=int, default=None, help="alternating all/mixed rounds (default 2; smoke 1)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("server_args", nargs="*", help="after --: options for flexmoe serve / vLLM")
    args = p.parse_args(argv)
    small = args.smoke
    args.requests = args.requests or (8 if small else 32)
    args.concurrency = args.concurrency or (4 if small else 8)
    args.max_tokens = args.max_tokens or (16 if small else 64)
    args.rounds = args.rounds or (1 if small else 2)
    h = _helpers()
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    model = args.model
    if model is None:
        if not small:
            p.error("--model is required without --smoke")
        model = os.path.join(tmp, "model")
        h.make_model(model)
    server_args = list(args.server_args) or (SMOKE_ARGS if small else [])
    port = args.port or h.free_port()
    log = os.path.join(tmp, "server.log")
    proc, startup = h.start_server(model, port, server_args, log_path=log)
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        names, top_k = _model_info(model)
        _one(client, model, "warm up", None, 4)
        _one(client, model, "warm up", names[:top_k], 4)
        rows = []
        for _ in range(args.rounds):  # alternate, so that a change in machine load hits both alike
            rows.append(run_scenario(client, model, [None], args, "all"))
            rows.append(run_scenario(client, model, _sets(names, top_k), args, "mixed"))
    finally:
        h.stop_server(proc)
    result = {"model": model, "startup_s": startup, "server_args": server_args, "rows": rows}
    print(f"server start (to /health): {startup:.1f} s; log {log}")
    print(f"{'scenario':9} {'tok/s':>8} {'req/s':>7} {'TTFT med':>9} {'TTFT p90':>9} {'TPOT med':>9} {'TPOT p90':>9}")
    for r in rows:
        print(f"{r['scenario']:9} {r['output_tokens_per_s']:8.1f} {r['requests_per_s']:7.2f} {r['ttft_median_s']:9.3f} "
              f"{r['ttft_p90_s']:9.3f} {r['tpot_median_s']:9.4f} {r['tpot_p90_s']:9.4f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
