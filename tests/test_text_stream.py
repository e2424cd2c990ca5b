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
