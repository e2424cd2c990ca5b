"""Streamed text of a request (models/serving/text.py) against the text of all its tokens at
once: the deltas joined equal it, cut before the earliest stop string, which never shows, not
even its first characters in an earlier delta."""

import pytest

from moe_relayfree_models.serving.text import TextStream, held_suffix

# a toy vocabulary: token i is the string PIECES[i]; 5 and 6 are the two halves of "é"
PIECES = ["a", "b", "\n", "xy", "yz", "\xc3", "\xa9", "end"]


def decode(ids):
    raw = "".join(PIECES[i] for i in ids).encode("latin-1")
    return raw.decode("utf-8", errors="replace")


def stream(tokens, stops, chunk=1):
    """(the deltas, whether a stop ended it) pushing ``chunk`` tokens at a time."""
    text, deltas = TextStream(decode, stops), []
    for i in range(0, len(tokens), chunk):
        last = i + chunk >= len(tokens)
        delta, stopped = text.push(tokens[i:i + chunk], final=last)
        deltas.append(delta)
        if stopped:
            return deltas, True
    return deltas, False


def whole(tokens, stops):
    """The reference: the text of all tokens, cut at the earliest stop string."""
    text = decode(tokens)
    cut = min([text.find(s) for s in stops if s in text], default=len(text))
    return text[:cut], cut < len(text)


CASES = [
    ([0, 2, 2, 1], ["\n\n"]),  # a stop across two tokens: "a" only, no "\n" sent early
    ([0, 2, 0, 2, 2, 1], ["\n\n"]),  # a held "\n" that turns out not to be a stop goes out
    ([3, 4, 0], ["yy", "zz"]),  # "xyyz": "yy" spans tokens
    ([3, 4, 0], ["yz", "xyy"]),  # two stops match: the earliest one ("xyy" at 0) wins
    ([0, 5, 6, 1], ["é"]),  # a stop inside a character split over two tokens
    ([0, 5, 6, 1], ["\ufffd"]),  # half a character is never text, so never a stop
    ([0, 1, 7], ["endless"]),  # held to the end, then all of it goes out
    ([0, 1, 3], []),
]


@pytest.mark.parametrize("tokens,stops", CASES)
def test_deltas_join_to_the_whole_text_cut_before_the_stop(tokens, stops):
    want = whole(tokens, stops)
    for chunk in (1, 2, len(tokens)):
        deltas, stopped = stream(tokens, stops, chunk)
        # deltas only add text: joined equal to the cut text, none showed a stop's start
        assert ("".join(deltas), stopped) == want, chunk


def test_text_that_may_start_a_stop_waits_for_the_next_token():
    text = TextStream(decode, ["\n\n"])
    assert text.push([0, 2]) == ("a", False)  # "\n" held
    assert text.push([0]) == ("\na", False)  # it was not a stop
    assert text.push([2]) == ("", False)
    assert text.push([2]) == ("", True)  # "\n\n": the request ends before it
    assert held_suffix("ab\n", ["\n\n", "b\nc"]) == 2
    with pytest.raises(ValueError):
        TextStream(decode, [""])


TOKENIZERS = ["bytelevel-no-bos", "metaspace-llama-bos"]
TEXT = ("Relay-free dispatch: écrire chaque copie directement — 直接写入专家窗口 🚀🚀.\n\n"
        "  def f(x):\n      return x ** 2  # ok?\n")


@pytest.mark.parametrize("name", TOKENIZERS)
def test_incremental_text_equals_decoding_all_tokens_at_once(name):
    """Real tokenizers (byte-level BPE; SentencePiece-style with a word's leading space and
    byte fallback), multi-byte characters split over tokens, pushes of 1-5 tokens: the deltas
    joined equal decode(all ids), for the encoded text and for random ids."""
    import os
    import random

    from moe_relayfree_models.tokenizer import HFTokenizer

    tok = HFTokenizer(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "tokenizers",
                                   name, "tokenizer.json"))
    rng = random.Random(0)
    size = tok.tok.get_vocab_size()
    sequences = [tok.encode(TEXT)] + [[rng.randrange(size) for _ in range(60)] for _ in range(20)]
    for ids in sequences:
        text, deltas, i = TextStream(tok.decode), [], 0
        while i < len(ids):
            n = rng.randint(1, 5)
            deltas.append(text.push(ids[i:i + n], final=i + n >= len(ids))[0])
            i += n
        assert "".join(deltas) == tok.decode(ids), ids
