"""A checkpoint's chat template: OpenAI chat messages -> the prompt text, as transformers makes it.

Where the template comes from, as ``AutoTokenizer`` finds it: ``chat_template.jinja`` in the
checkpoint folder, else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of
named templates: the one named ``default``), or a file given by the server's
``--chat-template``. The template sees what ``apply_chat_template`` gives it: ``messages``
(keys whose value is None dropped), ``add_generation_prompt``, ``tools``, the special tokens as
strings (``bos_token`` ... ``mask_token``, also where the file stores them as ``AddedToken``
objects), and the request's ``chat_template_kwargs`` (Qwen3's ``enable_thinking``); it runs in
Jinja's immutable sandbox (templates are code from the Hub) with transformers' ``tojson``,
``raise_exception``, ``strftime_now`` and loop controls. The text is then encoded *without*
the tokenizer's own special tokens: the template already wrote them (a second BOS otherwise).
``tests/test_chat.py`` compares the ids with transformers' ``apply_chat_template``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


class ChatError(ValueError):
    """Messages this template cannot render (its own ``raise_exception``, or a bad shape)."""


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"__type": "AddedToken", "content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def message_text(content) -> str:
    """A message's content as the string text templates expect: a string as it is, OpenAI's
    list of parts as its text parts joined by newlines (vLLM's "string" content format)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatError(f"content parts of type {part.get('type')!r} are not supported "
                                "(this server takes text)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ChatError("a message's content must be a string or a list of text parts")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template (``source``) and the special tokens it may use (name -> text)."""

    source: str
    special_tokens: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _compile(self.source)  # a template that is not valid Jinja fails here, not per request

    @classmethod
    def from_folder(cls, folder: str, template_file: str | None = None) -> ChatTemplate | None:
        """The checkpoint's template (None where it has none); ``template_file`` overrides it."""
        config = {}
        path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                config = json.load(fh)
        special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        file = template_file or os.path.join(folder, "chat_template.jinja")
        if template_file is not None and not os.path.exists(template_file):
            raise FileNotFoundError(f"no chat template file {template_file}")
        if os.path.exists(file):
            with open(file, encoding="utf-8") as fh:
                source = fh.read()
        return cls(source, special) if isinstance(source, str) else None

    def prompt_ids(self, tokenizer, messages, **render) -> list[int]:
        """The prompt's token ids: :meth:`render`'s text encoded without the tokenizer's own
        special tokens (the template wrote them: a second BOS otherwise)."""
        return tokenizer.encode(self.render(messages, **render), add_special_tokens=False)

    def render(self, messages, *, add_generation_prompt: bool = True, tools=None,
               kwargs: dict | None = None) -> str:
        """messages: OpenAI chat messages (``role`` and ``content`` each) -> the prompt text."""
        import jinja2

        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ChatError("messages must be a non-empty list of objects with a role")
        plain = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            if "content" in m:
                m["content"] = message_text(m["content"])
            plain.append(m)
        try:
            return _compile(self.source).render(
                messages=plain, tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **(kwargs or {})})
        except jinja2.TemplateError as e:  # raise_exception's, or the template's own failure
            raise ChatError(f"the chat template cannot render these messages: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatError(f"the chat template failed on these messages "
                            f"({type(e).__name__}: {e})") from None


_COMPILED: dict = {}


def _compile(source: str):
    """The template in transformers' environment (``chat_template_utils``), compiled once."""
    if source in _COMPILED:
        return _COMPILED[source]
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja: {e}") from None
    _COMPILED[source] = compiled
    return compiled


__all__ = ["ChatError", "ChatTemplate", "SPECIAL_TOKENS", "message_text"]
