"""OpenAI response bodies from a request's choices: one JSON answer, or one server-sent-event
stream that interleaves the choices' chunks as their tokens come (each chunk names its
``index``), ``data: [DONE]`` last.

A choice is one engine request: a prompt of a ``/v1/completions`` batch of prompts, or one of
``n`` completions of a prompt (OpenAI's order: prompt by prompt, ``n`` each). Every choice's
events are ``(text delta, finish reason or None, token ids, their log-probabilities)`` from
:meth:`Server._events`; log-probabilities go out in OpenAI's shape for the route (completions:
``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``; chat: ``content``, one
entry per token with its ``top_logprobs``), each token as its own decoded text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import AsyncIterator, Callable


@dataclasses.dataclass
class Choice:
    index: int
    prompt: list[int]
    request: object  # the engine's Request
    events: AsyncIterator
    first: bool = True  # the first completion of its prompt (usage counts a prompt once)


@dataclasses.dataclass(frozen=True)
class Header:
    """What every body of one response repeats."""

    id: str
    created: int
    model: str
    chat: bool

    def body(self, choices: list, usage: dict | None = None, chunk: bool = False) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else "")
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


def logprobs_body(chat: bool, token_text: Callable[[int], str], ids: list[int], lps: list,
                  offset: int = 0):
    """OpenAI's ``logprobs`` of a choice's tokens ``ids`` (``lps``: per token ``(its
    log-probability, the top ids, theirs)``); ``offset``: the text's characters before them."""
    texts = [token_text(i) for i in ids]
    if chat:
        def entry(text, lp):
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [{**entry(t, lp[0]), "top_logprobs": [
            entry(token_text(i), v) for i, v in zip(lp[1], lp[2])]} for t, lp in zip(texts, lps)]}
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {"tokens": texts, "token_logprobs": [lp[0] for lp in lps],
            "top_logprobs": [{token_text(i): v for i, v in zip(lp[1], lp[2])} for lp in lps],
            "text_offset": offsets}


def usage(choices: list[Choice], completion_tokens: int) -> dict:
    """Each prompt's tokens once (not once per each of its ``n`` completions, as vLLM counts
    them), and OpenAI's ``prompt_tokens_details.cached_tokens``: those the prefix cache gave."""
    firsts = [c for c in choices if c.first]
    prompt_tokens = sum(len(c.prompt) for c in firsts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(c.request.cached_tokens
                                                           for c in firsts)}}


async def answer(head: Header, choices: list[Choice], cancel: Callable[[], None],
                 disconnected, with_ids: bool,
                 token_text: Callable[[int], str] | None = None) -> dict:
    """The whole response once every choice has finished. -> the body; raises RuntimeError if
    the engine failed on a choice. ``disconnected()``: whether the client went away (then every
    choice is cancelled); ``token_text``: a token's text, where log-probabilities were asked
    for."""
    async def one(c: Choice):
        text, reason, ids, lps = "", None, [], []
        async for delta, reason, new, new_lps in c.events:
            text += delta
            ids += new
            lps += new_lps
            if await disconnected():
                cancel()
        return text, reason, ids, lps

    try:
        results = await asyncio.gather(*(one(c) for c in choices))
    except asyncio.CancelledError:
        cancel()
        raise
    if any(reason == "error" for _, reason, _, _ in results):
        raise RuntimeError("the engine failed on this request")
    bodies = []
    for c, (text, reason, ids, lps) in zip(choices, results):
        logprobs = None if token_text is None else logprobs_body(head.chat, token_text, ids, lps)
        body = ({"index": c.index, "message": {"role": "assistant", "content": text},
                 "logprobs": logprobs, "finish_reason": reason} if head.chat else
                {"index": c.index, "text": text, "finish_reason": reason, "logprobs": logprobs})
        if with_ids:  # vLLM's return_token_ids: the exact tokens, not only their text
            body.update(prompt_token_ids=c.prompt, token_ids=ids)
        bodies.append(body)
    return head.body(bodies, usage(choices, sum(len(r[2]) for r in results)))


async def stream(head: Header, choices: list[Choice], cancel: Callable[[], None],
                 with_ids: bool, include_usage: bool = False,
                 token_text: Callable[[int], str] | None = None):
    """The SSE stream. With ``include_usage`` (``stream_options``), OpenAI's last chunk: no
    choices, the usage; with ``with_ids`` (``return_token_ids``), each choice's first chunk
    carries its prompt's ids and every chunk its token ids."""
    def chunk(c: Choice, delta, reason, role=None, ids=None, prompt=None, logprobs=None) -> str:
        message = {"role": role} if role else {"content": delta} if delta else {}
        body = ({"index": c.index, "delta": message, "logprobs": logprobs,
                 "finish_reason": reason} if head.chat else
                {"index": c.index, "text": delta, "finish_reason": reason, "logprobs": logprobs})
        if ids is not None:
            body["token_ids"] = ids
        if prompt is not None:
            body["prompt_token_ids"] = prompt
        return f"data: {json.dumps(head.body([body], chunk=True))}\n\n"

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        try:
            async for event in c.events:
                merged.put_nowait((c, event))
        finally:
            merged.put_nowait((c, None))

    tasks, done = [], False
    try:
        if head.chat:  # OpenAI's first chat chunk of a choice carries the role alone
            for c in choices:
                yield chunk(c, None, None, role="assistant")
        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        running, count, first = len(choices), 0, {c.index for c in choices}
        offsets = {c.index: 0 for c in choices}  # each choice's text so far, for text_offset
        while running:
            c, event = await merged.get()
            if event is None:
                running -= 1
                continue
            delta, reason, new, lps = event
            count += len(new)
            logprobs = None
            if token_text is not None:
                logprobs = logprobs_body(head.chat, token_text, new, lps, offsets[c.index])
                if not head.chat:  # text_offset: completions' only
                    offsets[c.index] += sum(len(t) for t in logprobs["tokens"])
            yield chunk(c, delta, reason, ids=new if with_ids else None,
                        prompt=c.prompt if with_ids and c.index in first else None,
                        logprobs=logprobs)
            first.discard(c.index)
        if include_usage:
            yield f"data: {json.dumps(head.body([], usage(choices, count), chunk=True))}\n\n"
        done = True
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        if not done:  # the client went away mid-stream: the pages go back at the next step
            cancel()


__all__ = ["Choice", "Header", "answer", "logprobs_body", "stream", "usage"]
