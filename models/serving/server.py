"""OpenAI-compatible HTTP serving on FastAPI (uvicorn runs it: ``scripts/serve.py``).

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events, ``data: [DONE]`` last), ``GET /v1/models``, vLLM's ``POST /tokenize`` and
``/detokenize``, ``GET /health``, ``GET /metrics`` (Prometheus text). This layer only translates: OpenAI bodies to engine requests
(one per choice: a batch of prompts, ``n`` completions of each), engine tokens to text
(:mod:`.text`), and the choices' text to OpenAI bodies (:mod:`.responses`); the engine runs in
a thread of its own (:meth:`Engine.run_forever`).

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 for a bad
body (malformed JSON, bad sampling values, a prompt past the model's positions), 404 for an
unknown model, 429 with ``Retry-After`` when the waiting queue is full, 503 while shutting down.
Every accepted request ends with its tokens or an error; a client that goes away cancels its
request, whose pages are freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from moe_relayfree_models.generation import ContextLengthError
from moe_relayfree_models.serving.chat import ChatError, ChatTemplate
from moe_relayfree_models.serving.engine import Engine
from moe_relayfree_models.serving.metrics import prometheus
from moe_relayfree_models.serving.responses import Choice, Header, answer, stream
from moe_relayfree_models.serving.scheduler import MAX_LOGPROBS, QueueFull, SamplingParams
from moe_relayfree_models.serving.text import TextStream


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self, headers=None) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=headers)


UNSUPPORTED = ("echo", "best_of", "suffix", "logit_bias", "tools", "functions",
               "response_format")


def _number(body: dict, name: str, default, kind, low=None, high=None, low_open=False):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"{name} must be a {'integer' if kind is int else 'number'}", name)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"{name} must be {'>' if low_open else '>='} {low}, got {value}", name)
    if high is not None and value > high:
        raise ApiError(400, f"{name} must be <= {high}, got {value}", name)
    return value


def _token_ids(value) -> bool:
    """Whether ``value`` is a list of token ids (ints, not bools)."""
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", name)
    return value


class Server:
    """The HTTP side of one served model: ``app`` is the FastAPI application."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str, stop_ids=(),
                 chat_template: ChatTemplate | None = None):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.stop_ids = frozenset(stop_ids)
        self.chat_template = chat_template
        self.draining = False
        self.thread: threading.Thread | None = None
        self.app = self._app()

    # --- requests -> engine -----------------------------------------------------------------

    def _sampling(self, body: dict, chat: bool) -> tuple[SamplingParams, int | None]:
        temperature = _number(body, "temperature", 1.0, (int, float), 0, 2)
        top_p = _number(body, "top_p", 1.0, (int, float), 0, 1, low_open=True)
        top_k = _number(body, "top_k", 0, int, 0)
        seed = body.get("seed")
        if seed is not None:
            seed = _number(body, "seed", None, int, 0, 2**32 - 1)
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None:
            max_tokens = _number(body, "max_tokens" if "max_tokens" in body else
                                 "max_completion_tokens", None, int, 1)
        logprobs = self._logprobs(body, chat)
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False, 0, [], {}):
                raise ApiError(400, f"{name} is not supported by this server", name)
        return SamplingParams(float(temperature), top_k, float(top_p), seed, logprobs), max_tokens

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> int | None:
        """The top log-probabilities asked for per token (None: none): chat's ``logprobs:
        true`` with ``top_logprobs``, completions' ``logprobs: N``."""
        if not chat:
            if body.get("logprobs") is None:
                return None
            return _number(body, "logprobs", None, int, 0, MAX_LOGPROBS)
        wanted = _flag(body, "logprobs", False)
        top = body.get("top_logprobs")
        if top is not None:
            top = _number(body, "top_logprobs", None, int, 0, MAX_LOGPROBS)
            if not wanted:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if wanted else None

    def _stops(self, body: dict) -> tuple[frozenset, list[str]]:
        ids = set() if body.get("ignore_eos") else set(self.stop_ids)
        extra = body.get("stop_token_ids") or []
        if not isinstance(extra, list) or not all(isinstance(i, int) for i in extra):
            raise ApiError(400, "stop_token_ids must be a list of token ids", "stop_token_ids")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", "stop")
        return frozenset(ids | set(extra)), stop

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{self.model_name}'", "model", code="model_not_found")

    def _prompts(self, prompt) -> list[list[int]]:
        """``/v1/completions``'s prompt: a string, token ids, or a list of either (a batch)."""
        def ids(p):
            return bool(p) and _token_ids(p)

        if isinstance(prompt, str):
            return [self.tok.encode(prompt)]
        if ids(prompt):
            return [list(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
            return [self.tok.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list "
                            "of either", "prompt")

    def render_chat(self, body: dict) -> list[int]:
        """The prompt ids of a chat body: its messages through the checkpoint's template
        (:meth:`ChatTemplate.prompt_ids`)."""
        if self.chat_template is None:
            raise ApiError(400, f"the model '{self.model_name}' ships no chat template; use "
                                "/v1/completions or start the server with --chat-template",
                           "messages")
        kwargs = body.get("chat_template_kwargs")
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict):
            raise ApiError(400, "chat_template_kwargs must be an object", "chat_template_kwargs")
        try:
            return self.chat_template.prompt_ids(
                self.tok, body.get("messages"), kwargs=kwargs,
                add_generation_prompt=_flag(body, "add_generation_prompt", True))
        except ChatError as e:
            raise ApiError(400, str(e), "messages") from None

    def _submit(self, prompt: list[int], max_tokens: int, sampling, stop_ids, loop, queue):
        def listener(request, tokens, reason):  # the engine's thread: the step's results
            lps = (request.logprobs[-len(tokens):]
                   if tokens and request.sampling.logprobs is not None else [])
            loop.call_soon_threadsafe(queue.put_nowait, (list(tokens), reason, lps))

        if self.draining:
            raise ApiError(503, "the server is shutting down", kind="service_unavailable")
        try:
            return self.engine.submit(prompt, max_tokens, sampling, stop_ids, listener)
        except ContextLengthError as e:
            raise ApiError(400, str(e), e.param, code="context_length_exceeded") from None
        except QueueFull as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry later",
                           kind="rate_limit_error") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def _submit_all(self, prompts, n, max_tokens, sampling, stop_ids, stop_strings,
                    chat) -> list[Choice]:
        """One engine request per (prompt, completion of it): all queued, or none (a refusal
        cancels the ones already queued). A request's seed gives its ``n`` completions seed,
        seed + 1, ...: different samples, each reproducible."""
        loop, choices = asyncio.get_running_loop(), []
        try:
            for prompt in prompts:
                # OpenAI: 16 tokens for completions, the rest of the context for chat
                limit = max_tokens if max_tokens is not None else (
                    max(1, self.engine.max_positions - len(prompt)) if chat else 16)
                for j in range(n):
                    own = sampling if sampling.seed is None or j == 0 else dataclasses.replace(
                        sampling, seed=(sampling.seed + j) % 2**32)
                    queue = asyncio.Queue()
                    request = self._submit(prompt, limit, own, stop_ids, loop, queue)
                    choices.append(Choice(len(choices), prompt, request,
                                          self._events(request, queue, stop_strings), j == 0))
        except ApiError:
            self._cancel(choices)
            raise
        return choices

    def _cancel(self, choices: list[Choice]) -> None:
        for c in choices:
            self.engine.cancel(c.request)

    # --- engine -> responses ----------------------------------------------------------------

    async def _events(self, request, queue, stop_strings: list[str]):
        """(text delta, finish reason or None, the token ids since the last event, their
        log-probabilities where asked) as the engine hands tokens over (:class:`TextStream`: a
        character split across tokens waits for its last byte, text that may be the start of
        a stop string for the next tokens)."""
        text = TextStream(self.tok.decode, stop_strings)
        given, logprobs = 0, []
        while True:
            tokens, reason, lps = await queue.get()
            logprobs += lps
            delta, stopped = text.push(tokens, final=reason is not None)
            ids = text.ids
            if stopped:
                self.engine.cancel(request)
                yield delta, "stop", ids[given:], logprobs[given:]
                return
            if reason is not None:
                yield delta, reason, ids[given:], logprobs[given:]
                return
            if delta:
                yield delta, None, ids[given:], logprobs[given:]
                given = len(ids)

    def _app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.thread = threading.Thread(target=self.engine.run_forever, name="engine", daemon=True)
            self.thread.start()
            yield
            self.draining = True  # uvicorn stopped accepting; requests in flight finish
            self.engine.stop(drain=True)
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 60)

        app = FastAPI(title="moe-relayfree", lifespan=lifespan)

        @app.exception_handler(ApiError)
        async def api_error(_, exc: ApiError):
            headers = {"Retry-After": "1"} if exc.status == 429 else None
            return exc.response(headers)

        @app.get("/health")
        async def health():
            if self.draining:
                return JSONResponse({"status": "draining"}, status_code=503)
            error = self.engine.last_error
            return {"status": "ok", **({"last_error": error} if error else {})}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                "created": 0, "owned_by": "moe-relayfree",
                                                "max_model_len": self.engine.max_positions}]}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(prometheus(self.engine),
                                     media_type="text/plain; version=0.0.4")

        async def body_of(http: HttpRequest) -> dict:
            try:
                body = json.loads(await http.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the body is not valid JSON ({e})") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the body must be a JSON object")
            return body

        async def complete(http: HttpRequest, chat: bool):
            body = await body_of(http)
            self._check_model(body)
            sampling, max_tokens = self._sampling(body, chat)
            n = _number(body, "n", 1, int, 1)
            stop_ids, stop_strings = self._stops(body)
            with_ids = _flag(body, "return_token_ids", False)
            prompts = [self.render_chat(body)] if chat else self._prompts(body.get("prompt"))
            if len(prompts) * n > self.engine.scheduler.max_waiting:
                raise ApiError(400, f"{len(prompts) * n} completions in one request; this server "
                                    f"queues at most {self.engine.scheduler.max_waiting}", "n")
            choices = self._submit_all(prompts, n, max_tokens, sampling, stop_ids, stop_strings,
                                       chat)
            cancel = functools.partial(self._cancel, choices)
            head = Header(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                          int(time.time()), self.model_name, chat)
            token_text = (None if sampling.logprobs is None else
                          lambda i: self.tok.decode([i]))
            if body.get("stream"):
                options = body.get("stream_options") or {}
                usage = isinstance(options, dict) and options.get("include_usage")
                return StreamingResponse(
                    stream(head, choices, cancel, with_ids, bool(usage), token_text),
                    media_type="text/event-stream")
            try:
                return await answer(head, choices, cancel, http.is_disconnected, with_ids,
                                    token_text)
            except RuntimeError as e:
                raise ApiError(500, str(e), kind="server_error") from None

        @app.post("/v1/completions")
        async def completions(http: HttpRequest):
            return await complete(http, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(http: HttpRequest):
            return await complete(http, chat=True)

        @app.post("/tokenize")
        async def tokenize(http: HttpRequest):
            """vLLM's: a prompt's ids (``prompt``, special tokens added as for a completion
            unless ``add_special_tokens`` is false) or a chat's (``messages``, as rendered)."""
            body = await body_of(http)
            self._check_model(body)
            if "messages" in body:
                ids = self.render_chat(body)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise ApiError(400, "prompt must be a string", "prompt")
                ids = self.tok.encode(prompt,
                                      add_special_tokens=_flag(body, "add_special_tokens", True))
            return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_positions}

        @app.post("/detokenize")
        async def detokenize(http: HttpRequest):
            body = await body_of(http)
            self._check_model(body)
            ids = body.get("tokens")
            if not _token_ids(ids):
                raise ApiError(400, "tokens must be a list of token ids", "tokens")
            return {"prompt": self.tok.decode(ids)}

        return app


__all__ = ["ApiError", "Server"]
