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
