"""``flexmoe prepare-data``: tokenise a text directory into a data directory."""
from __future__ import annotations

from .common import add_command, check_output, require, guard


def register(sub) -> None:
    """Add this subcommand and its flags to ``sub`` (an argparse subparsers object)."""
    p = add_command(sub, "prepare-data", cmd_prepare_data, help="tokenise a text directory into a data directory",
                    description="Tokenise every *.txt/*.md/*.text file (one document each) and every line of "
                                "*.jsonl files (field \"text\", a string; a line that is not a JSON object "
                                "with a \"text\" string is an error naming the file and line, blank lines and "
                                "empty texts are skipped) under --input into --out: train.bin, val.bin "
                                "(memory-mapped token ids, documents separated by EOS) and meta.json. The "
                                "held-out split is chosen by a hash of each document's text.")
    require(p, "--input", help="directory of text documents")
    require(p, "--out", help="data directory to create")
    p.add_argument("--tokenizer", default=None, help="a `tokenizers` JSON file (default: byte-level, vocab 258)")
    p.add_argument("--eos-token", default=None, help="end-of-document token of --tokenizer (default: auto)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out fraction of documents (default 0.05)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")


@guard
def cmd_prepare_data(args) -> int:
    from ..data import ByteTokenizer, DataError, DocumentError, TokenizersTokenizer, prepare_data

    check_output(args.out, [("--input", args.input), ("--tokenizer", args.tokenizer)])
    tok = TokenizersTokenizer(args.tokenizer, args.eos_token) if args.tokenizer else ByteTokenizer()
    try:
        meta = prepare_data(args.input, args.out, tokenizer=tok, val_fraction=args.val_fraction,
                            overwrite=args.overwrite, progress=args.progress)
    except DocumentError as exc:
        raise DataError(f"--input: {exc}") from exc
    print(f"prepare-data: {meta['train_docs']} train docs ({meta['train_tokens']} tokens), {meta['val_docs']} held-out "
          f"docs ({meta['val_tokens']} tokens), vocab {meta['vocab_size']} -> {args.out}")
    return 0
