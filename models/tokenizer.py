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

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids) -> str:
        return decode(ids)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package (no transformers).

    Special tokens are added as the checkpoint says: the ``post_processor`` of
    ``tokenizer.json`` (a Llama/Mixtral-style template adds BOS; Qwen's and OLMoE's add
    nothing), overridden by explicit ``add_bos_token`` / ``add_eos_token`` booleans in
    ``tokenizer_config.json``, which transformers applies the same way (it rebuilds the
    template from them).
    """

    def __init__(self, path: str, config: dict | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(
                f"{path} needs the 'tokenizers' package: pip install tokenizers "
                "(or pip install -e '.[hf]')"
            ) from None
        self.tok = Tokenizer.from_file(path)
        config = config or {}
        self.add_bos = config.get("add_bos_token")
        self.add_eos = config.get("add_eos_token")
        self.bos_id = self._token_id(config.get("bos_token"), "bos_token", path)
        self.eos_id = self._token_id(config.get("eos_token"), "eos_token", path)
        if self.add_bos and self.bos_id is None:
            raise ValueError(f"tokenizer_config.json next to {path} sets add_bos_token but no bos_token")
        if self.add_eos and self.eos_id is None:
            raise ValueError(f"tokenizer_config.json next to {path} sets add_eos_token but no eos_token")

    def _token_id(self, token, key: str, path: str) -> int | None:
        if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
            token = token.get("content")
        if token is None:
            return None
        token_id = self.tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json's {key} {token!r} is not in {path}")
        return token_id

    def encode(self, text: str) -> list[int]:
        plain = self.tok.encode(text, add_special_tokens=False).ids
        ids = self.tok.encode(text, add_special_tokens=True).ids
        if self.add_bos is not None:
            has = len(ids) > len(plain) and ids[0] == self.bos_id
            if self.add_bos and not has:
                ids = [self.bos_id] + ids
            elif not self.add_bos and has:
                ids = ids[1:]
        if self.add_eos is not None:
            has = len(ids) > len(plain) and ids[-1] == self.eos_id
            if self.add_eos and not has:
                ids = ids + [self.eos_id]
            elif not self.add_eos and has:
                ids = ids[:-1]
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(folder: str, vocab_size: int):
    """``folder/tokenizer.json`` (with ``tokenizer_config.json`` if present); else the
    byte-level scheme, but only for a model whose vocabulary is exactly it (259 ids), so a real
    checkpoint never gets the wrong one."""
    import json
    import os

    path = os.path.join(folder, "tokenizer.json")
    if os.path.exists(path):
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = None
        if os.path.exists(config_path):
            with open(config_path) as fh:
                config = json.load(fh)
        return HFTokenizer(path, config)
    if vocab_size == VOCAB_SIZE:
        return ByteTokenizer()
    raise FileNotFoundError(
        f"{folder} has no tokenizer.json and its vocabulary ({vocab_size}) is not the byte-level "
        f"one ({VOCAB_SIZE}); add the checkpoint's tokenizer.json"
    )
