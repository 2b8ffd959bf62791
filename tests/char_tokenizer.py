"""The tiny character-level tokenizer the serving and evaluation tiers' test models use: printable
ASCII plus four specials, one token a character, saved as a Hugging Face tokenizer directory
(``PreTrainedTokenizerFast``), so that vLLM and lm-eval load it offline like any checkpoint's."""
from __future__ import annotations

from typing import Optional

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def save_char_tokenizer(directory: str, vocab_size: int = 128, chat_template: Optional[str] = None) -> None:
    """Write the tokenizer into ``directory``: ids 0-3 the specials, then the printable ASCII
    characters, then filler tokens ``<x{i}>`` up to ``vocab_size`` ids (the model's vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
