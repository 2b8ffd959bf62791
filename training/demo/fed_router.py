"""Federated router tuning: the merged model's router tuned on the owners' own data, which never
leaves them. Only router parameters (the rows and biases every party already holds in the merged
model) and a validation number per party and scored round are exchanged.

Why: tuning on public proxies (the paper's router tuning, ``flexmoe tune-router``) optimises a
loss on public text, which rewards the public expert; on an owner whose real text its proxies do
not resemble it made the merged model worse (docs/DEMO.md). Tuning on the union of the owners'
data would not, but that data cannot be pooled. Federated optimisation of the router gets the same
objective without pooling: every party trains the router on its own data and only the resulting
router goes back.

The optimiser is FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): each party
takes a few plain SGD steps from the global router, the coordinator treats the parties' mean
change as a gradient and takes one Adam step on the global router with it. Plain FedAvg with each
party running Adam locally (this module's first version) barely moved: every party's own Adam
normalises its update to about ``lr`` per coordinate, so the parties' pushes toward their own
experts cancel in the mean and the part they agree on (which expert is better for which text) is
lost. On the corpus measured it gave a third of the gain on the owners' held-out text that tuning
on the pooled data gives, FedAdam nearly all of it (docs/DEMO.md, "The recipe, measured").

Parties: each owner (its data directory) and the public party (public text: proxy-pool documents
the public model never trained on). Rounds r = 0 .. R, through files in ``EXCHANGE``:

* the coordinator writes ``global-r.safetensors``: every layer's router rows ``(E, D)`` and biases
  ``(E,)`` (the public bias stays 0);
* each party loads it into its copy of the merged model; on a scored round (every
  ``eval_every``-th and the last) it scores it on its own *validation* split (mean next-token
  cross-entropy at the saved top-k, the model users get) and writes ``PARTY-r.json``
  ``{"val_loss": x}``; unless r = R it then trains ``local_steps`` plain SGD steps at ``lr`` on
  its training split (router rows and non-public biases only, top-k = all experts, as
  ``tune-router``) and writes its router as ``PARTY-r.safetensors``;
* the coordinator (:class:`ServerAdam`) takes the mean of the parties' routers, ``g = global-r -
  mean``, and one Adam step with ``g`` (decoupled weight decay on the rows; the public bias held
  at 0, every bias at most 0): ``global-(r+1)``.

Selection (:func:`choose_round`): among the scored rounds whose public validation loss is at most
round 0's plus ``public_tolerance``, the one whose global router has the lowest mean validation
loss over the owners; round 0 (the router the tuning started from) unless a round beats it by more
than ``min_delta``. So the tuning cannot make the owners' validation loss worse, and the decision
is the owners' own numbers.

Command line (one process per party; the demo runs the coordinator itself)::

    python -m flexmoe_training.demo.fed_router --model MERGED --name code --data DATA_DIR \\
        [--val-data DIR] --exchange DIR --rounds 40 --local-steps 5 --lr 0.05 --eval-every 5 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["ServerAdam", "choose_round", "coordinate", "main", "read_router", "router_state", "scored_rounds",
           "write_router"]

POLL_S = 0.05


def router_state(model) -> Dict[str, "object"]:
    """``{"layers.L.weight": (E, D), "layers.L.bias": (E,)}`` fp32 CPU copies of the router."""
    out = {}
    for i, moe in enumerate(model.moe_layers()):
        out[f"layers.{i}.weight"] = moe.gate.weight.detach().float().cpu().clone()
        if moe.gate.expert_bias is not None:
            out[f"layers.{i}.bias"] = moe.gate.expert_bias.detach().float().cpu().clamp(max=0).clone()
    return out


def load_router(model, state: Dict) -> None:
    """Copy a :func:`router_state` dict into ``model``'s routers (in place)."""
    import torch

    with torch.no_grad():
        for i, moe in enumerate(model.moe_layers()):
            moe.gate.weight.copy_(state[f"layers.{i}.weight"])
            if moe.gate.expert_bias is not None:
                moe.gate.expert_bias.copy_(state[f"layers.{i}.bias"])


def write_router(path: str, state: Dict) -> None:
    """Write a router state atomically (safetensors)."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def read_router(path: str) -> Dict:
    from safetensors.torch import load_file

    return load_file(path)


def _wait_for(paths: Sequence[str], abort: Callable[[], Optional[str]], timeout_s: float) -> None:
    """Block until every file in ``paths`` exists; ``RuntimeError`` when ``abort()`` says why or
    after ``timeout_s``."""
    t0 = time.time()
    while not all(os.path.exists(p) for p in paths):
        why = abort()
        if why:
            raise RuntimeError(why)
        if time.time() - t0 > timeout_s:
            missing = [p for p in paths if not os.path.exists(p)]
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {missing}")
        time.sleep(POLL_S)


def scored_rounds(rounds: int, eval_every: int) -> List[int]:
    """The rounds whose global router the parties score: 0, every ``eval_every``-th and the last."""
    return sorted(set(range(0, rounds + 1, max(1, eval_every))) | {rounds})


def choose_round(val: Dict[str, List[float]], owners: Sequence[str], public: str, public_tolerance: float,
                 min_delta: float, rounds: Optional[Sequence[int]] = None) -> dict:
    """The round to keep from ``{party: [validation loss of each scored round]}``; ``rounds``: the
    round numbers of those entries (default 0, 1, 2, ...; the first must be round 0)."""
    n = len(val[public])
    rounds = list(range(n)) if rounds is None else list(rounds)
    if len(rounds) != n or rounds[0] != 0:
        raise ValueError(f"rounds must list the {n} scored rounds starting at 0, got {rounds}")
    owner_mean = [sum(val[o][i] for o in owners) / len(owners) for i in range(n)]
    ok = [i for i in range(n) if val[public][i] <= val[public][0] + public_tolerance]
    best = min(ok, key=lambda i: (owner_mean[i], i))
    if owner_mean[best] >= owner_mean[0] - min_delta:
        best = 0
    return {"round": rounds[best], "scored_rounds": rounds, "owner_mean": owner_mean, "public": list(val[public]),
            "start_owner_mean": owner_mean[0], "best_owner_mean": owner_mean[best],
            "public_tolerance": public_tolerance, "min_delta": min_delta, "kept": "tuned" if best else "start"}


class ServerAdam:
    """The coordinator's optimiser (FedAdam): Adam on the router with the pseudo-gradient
    ``g = global - mean(parties' routers)`` of each round.

    ``state``: a :func:`router_state` dict (the global router, updated in place by :meth:`step`).
    Rows (``layers.L.weight``, (E, D)) get decoupled weight decay ``lr * weight_decay`` per round;
    biases (``layers.L.bias``, (E,)) none, the public expert's (index 0) held at 0 and every bias
    clamped to at most 0 (applied as ``min(b, 0)``: kept where it has a gradient).
    """

    def __init__(self, state: Dict, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.99), eps: float = 1e-8):
        import torch

        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.params = {k: torch.nn.Parameter(v.detach().float().clone()) for k, v in state.items()}
        rows = [p for k, p in self.params.items() if k.endswith(".weight")]
        biases = [p for k, p in self.params.items() if not k.endswith(".weight")]
        self.opt = torch.optim.AdamW([{"params": rows, "weight_decay": weight_decay},
                                      {"params": biases, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)

    @property
    def state(self) -> Dict:
        """The global router now (a :func:`router_state` dict, no copy)."""
        return {k: p.data for k, p in self.params.items()}

    def step(self, party_states: Sequence[Dict]) -> Dict:
        """One round: the parties' routers in, the next global router out (a copy)."""
        import torch

        if not party_states:
            raise ValueError("party_states is empty")
        for k, p in self.params.items():
            p.grad = p.detach() - sum(s[k].float() for s in party_states) / len(party_states)
        self.opt.step()
        with torch.no_grad():
            for k, p in self.params.items():
                if k.endswith(".bias"):
                    p[0] = 0.0
                    p.clamp_(max=0.0)
        return {k: p.detach().clone() for k, p in self.params.items()}


def coordinate(exchange: str, start: Dict, parties: Sequence[str], rounds: int,
               failed: Callable[[], Optional[str]], *, lr: float, weight_decay: float = 0.0, eval_every: int = 1,
               timeout_s: float = 1800.0, log: Callable[[str], None] = print) -> dict:
    """Run the coordinator: write ``global-0`` = ``start``, then one :class:`ServerAdam` step per
    round. Returns ``{"val": {party: [validation loss per scored round]}, "rounds": [the scored
    rounds], "globals": [the global router of every round]}`` (in memory: a few kB per round)."""
    os.makedirs(exchange, exist_ok=True)
    server = ServerAdam(start, lr, weight_decay)
    globals_ = [{k: v.clone() for k, v in server.state.items()}]
    write_router(os.path.join(exchange, "global-0.safetensors"), globals_[0])
    scored = scored_rounds(rounds, eval_every)
    val: Dict[str, List[float]] = {p: [] for p in parties}
    try:
        for r in range(rounds + 1):
            if r in scored:
                _wait_for([os.path.join(exchange, f"{p}-{r}.json") for p in parties], failed, timeout_s)
                for p in parties:
                    with open(os.path.join(exchange, f"{p}-{r}.json"), encoding="utf-8") as f:
                        val[p].append(float(json.load(f)["val_loss"]))
                log(f"   federated router tuning: round {r}/{rounds}, validation "
                    + ", ".join(f"{p} {val[p][-1]:.4f}" for p in parties))
            if r == rounds:
                break
            _wait_for([os.path.join(exchange, f"{p}-{r}.safetensors") for p in parties], failed, timeout_s)
            globals_.append(server.step([read_router(os.path.join(exchange, f"{p}-{r}.safetensors"))
                                         for p in parties]))
            write_router(os.path.join(exchange, f"global-{r + 1}.safetensors"), globals_[-1])
    except BaseException:
        with open(os.path.join(exchange, "ABORT"), "w", encoding="utf-8") as f:
            f.write("the coordinator stopped")
        raise
    return {"val": val, "rounds": scored, "globals": globals_}


def _router_params(model) -> tuple:
    """Every router row ``(E, D)`` and non-public bias of ``model`` trainable, the rest frozen:
    ``(rows, biases)``."""
    rows, biases = [], []
    for p in model.parameters():
        p.requires_grad_(False)
    for moe in model.moe_layers():
        moe.gate.weight.requires_grad_(True)
        rows.append(moe.gate.weight)
        if moe.gate.expert_bias is not None:
            moe.gate.expert_bias.requires_grad_(True)
            biases.append(moe.gate.expert_bias)
    return rows, biases


def party(args) -> int:
    """One party's side: score, train locally and send back the router, every round."""
    import torch
    import torch.nn.functional as F

    from flexmoe_kernels.models import FlexOlmoForCausalLM

    from ..data import BatchSampler, DataDir, eval_windows
    from .owner_check import window_loss

    torch.manual_seed(args.seed)
    datas = [DataDir(d) for d in args.data]
    val_windows = eval_windows([DataDir(args.val_data)] if args.val_data else datas, args.seq_len, args.val_windows,
                               splits=("val",))
    if val_windows.shape[0] == 0:
        raise ValueError(f"{args.val_data or args.data}: no validation window of {args.seq_len + 1} tokens")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model = FlexOlmoForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    val_windows = val_windows.to(device)
    top_k, E = model.config.num_experts_per_tok, model.config.num_experts
    rows, biases = _router_params(model)
    scored = scored_rounds(args.rounds, args.eval_every)
    sampler = BatchSampler(datas, args.seq_len, args.batch_size, 1, 1, args.seed)
    abort_file = os.path.join(args.exchange, "ABORT")

    def aborted():
        return "the coordinator stopped" if os.path.exists(abort_file) else None

    step = 0
    for r in range(args.rounds + 1):
        _wait_for([os.path.join(args.exchange, f"global-{r}.safetensors")], aborted, args.timeout)
        load_router(model, {k: v.to(device) for k, v in
                            read_router(os.path.join(args.exchange, f"global-{r}.safetensors")).items()})
        if r in scored:
            model.set_top_k(top_k)
            loss = window_loss(model, val_windows)
            tmp = os.path.join(args.exchange, f".{args.name}-{r}.json")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"val_loss": loss, "windows": int(val_windows.shape[0])}, f)
            os.replace(tmp, os.path.join(args.exchange, f"{args.name}-{r}.json"))
        if r == args.rounds:
            break
        model.train()
        model.set_top_k(E)                       # tuning sees every expert, as tune-router
        for _ in range(args.local_steps):
            batch = sampler.global_batch(step).to(device)
            logits = model(batch[:, :-1]).logits
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            for p in rows + biases:
                p.grad = None
            ce.backward()
            with torch.no_grad():                # plain SGD: the coordinator's Adam does the rest
                for p in rows + biases:
                    p.sub_(args.lr * p.grad)
                for b in biases:
                    b[0] = 0.0                   # the public expert's bias stays 0
                    b.clamp_(max=0.0)            # applied as min(b, 0): keep it where it has a gradient
            step += 1
            print(f"[fed {args.name}] step {step}/{args.rounds * args.local_steps} loss {float(ce.detach()):.4f}", flush=True)
        write_router(os.path.join(args.exchange, f"{args.name}-{r}.safetensors"), router_state(model))
    print(f"[fed {args.name}] done: {step} local steps in {args.rounds} rounds", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexmoe_training.demo.fed_router", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the merged checkpoint the tuning starts from")
    p.add_argument("--name", required=True, help="this party's name (file names in --exchange)")
    p.add_argument("--data", action="append", required=True, help="this party's training data directory (repeat)")
    p.add_argument("--val-data", default=None, help="data directory whose val split is scored (default: --data's)")
    p.add_argument("--exchange", required=True, help="directory shared with the coordinator")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05, help="the party's SGD learning rate")
    p.add_argument("--eval-every", type=int, default=5, help="score the global router every N rounds (and the last)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the coordinator per round")
    args = p.parse_args(argv)
    for flag in ("rounds", "local_steps", "eval_every", "seq_len", "batch_size", "val_windows"):
        if getattr(args, flag) < 1:
            print(f"fed_router: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if not args.lr > 0:
        print(f"fed_router: --lr must be > 0, got {args.lr}", file=sys.stderr)
        return 2
    try:
        return party(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"fed_router: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
