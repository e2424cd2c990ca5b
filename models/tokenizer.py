"""Byte-level tokenizer: ids 0..255 are bytes, then BOS, EOS, PAD. Lossless for any text."""

from __future__ import annotations

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str, *, bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [BOS] + ids if bos else ids


def decode(ids) -> str:
    """Bytes back to text; special ids are dropped, invalid UTF-8 is replaced."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class ByteTokenizer:
    """This module's byte-level scheme behind the same interface as a loaded tokenizer."""

    bos_id = BOS
    eos_id = EOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return encode(text, bos=add_special_tokens)

    def decode(self, ids) -> str:
        return decode(ids)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package (no transformers).

    Special tokens are added exactly as the file's ``post_processor`` says (a Llama/Mixtral-style
    template adds BOS; Qwen's and OLMoE's add nothing). ``tokenizer_config.json``'s
    ``add_bos_token`` / ``add_eos_token`` do not change that: transformers 5.23 (the version the
    fixtures come from) follows the post-processor for byte-level and SentencePiece-style
    tokenizers alike, whatever those flags say (tests/fixtures/hf/tokenizers records its ids).
    """

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(
                f"{path} needs the 'tokenizers' package: pip install tokenizers "
                "(or pip install -e '.[hf]')"
            ) from None
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers package raises its own Exception type
            raise ValueError(f"{path} is not a readable tokenizer.json "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``add_special_tokens=False``: none added (a chat template's text already has them);
        special tokens written in the text are still read as such."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(folder: str, vocab_size: int):
    """``folder/tokenizer.json`` if present; else the byte-level scheme, but only for a model
    whose vocabulary is exactly it (259 ids), so a real checkpoint never gets the wrong one."""
    import os

    path = os.path.join(folder, "tokenizer.json")
    if os.path.exists(path):
        return HFTokenizer(path)
    if vocab_size == VOCAB_SIZE:
        return ByteTokenizer()
    raise FileNotFoundError(
        f"{folder} has no tokenizer.json and its vocabulary ({vocab_size}) is not the byte-level "
        f"one ({VOCAB_SIZE}); add the checkpoint's tokenizer.json"
    )
