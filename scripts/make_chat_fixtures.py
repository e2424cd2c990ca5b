"""Builds the chat-template fixtures: tokenizer folders with a chat template each, and the ids
transformers' ``apply_chat_template`` gives for sample conversations (or the error it raises).

Needs transformers (never imported by the project), not torch; run it from a separate
environment after ``scripts/make_hf_fixtures.py --tokenizers`` (whose tokenizers it extends):

    python3 -m venv .venv-hf && .venv-hf/bin/pip install transformers==5.23.0 jinja2
    .venv-hf/bin/python scripts/make_chat_fixtures.py     # writes tests/fixtures/hf/chat/

The templates are written for these fixtures, each in the manner of a family's (ChatML with a
thinking switch and loop controls, as Qwen3's; a BOS stored as an ``AddedToken`` object and a
system prompt gathered in a namespace, as DeepSeek-V3's; alternation enforced with
``raise_exception`` over a SentencePiece-style tokenizer whose post-processor adds BOS, as
Mixtral's), so the project's renderer is checked on what real templates use.
"""

from __future__ import annotations

import json
import os
import shutil

import transformers
from tokenizers import AddedToken, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZERS = os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizers")
OUT = os.path.join(ROOT, "tests", "fixtures", "hf", "chat")

CHATML = """\
{%- if messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.content is defined %}{{ message.content }}{% else %}{{ message.tool_calls | tojson }}{% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

NAMESPACE = (
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + m['content'] + '\\n' %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<\uff5cUser\uff5c>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<\uff5cAssistant\uff5c>{{ m['content'] }}<\uff5cend\uff5c>"
    "{% elif m['role'] != 'system' %}{{ raise_exception('unknown role: ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<\uff5cAssistant\uff5c>{% endif %}")

INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

ASCII = [{"role": "user", "content": "Return the number of items."}]
TURNS = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "def f(x): return x + 1"},
         {"role": "assistant", "content": "It adds one."},
         {"role": "user", "content": "And f(2)?"}]
WIDE = [{"role": "user", "content": "Caf\u00e9 \u76f4\u63a5 \U0001f680 <tag> & \"q\""}]

# name: (base tokenizer, added special tokens, tokenizer_config.json, where the template is,
# cases: (messages, add_generation_prompt, chat_template_kwargs))
CASES = {
    "chatml-thinking": (
        "bytelevel-no-postprocessor", ["<|im_start|>", "<|im_end|>"],
        {"bos_token": None, "eos_token": "<|im_end|>", "tokenizer_class": "Qwen2Tokenizer"},
        "chat_template.jinja", CHATML,
        [(TURNS, True, {}), (WIDE, True, {"enable_thinking": False}), (TURNS, False, {}),
         ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                              "tool_calls": [{"name": "f", "arguments": "{}"}]}],
          False, {})]),
    "bos-namespace": (
        "bytelevel-template-bos", ["<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<\uff5cend\uff5c>"],
        {"bos_token": {"__type": "AddedToken", "content": "<bos>", "lstrip": False,
                       "normalized": True, "rstrip": False, "single_word": False},
         "eos_token": {"__type": "AddedToken", "content": "<\uff5cend\uff5c>", "lstrip": False,
                       "normalized": True, "rstrip": False, "single_word": False},
         "tokenizer_class": "LlamaTokenizerFast"},
        "tokenizer_config.json", NAMESPACE,
        [(TURNS, True, {}), (WIDE, True, {}), ([{"role": "tool", "content": "1"}], True, {})]),
    "inst-alternate": (
        "metaspace-llama-bos", [],
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "tokenizer_class": "LlamaTokenizer"},
        "tokenizer_config.json (named list)", INST,
        [(ASCII, True, {}), ([ASCII[0], {"role": "assistant", "content": "Three."}, ASCII[0]], True, {}),
         ([ASCII[0], ASCII[0]], True, {})]),
}


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    for name, (base, added, config, where, template, cases) in CASES.items():
        path = os.path.join(OUT, name)
        os.makedirs(path)
        tok = Tokenizer.from_file(os.path.join(TOKENIZERS, base, "tokenizer.json"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
        tok.save(os.path.join(path, "tokenizer.json"))
        config = dict(config)
        if where == "chat_template.jinja":
            with open(os.path.join(path, where), "w", encoding="utf-8") as fh:
                fh.write(template)
        elif where.endswith("(named list)"):
            config["chat_template"] = [{"name": "default", "template": template},
                                       {"name": "other", "template": "{{ raise_exception('no') }}"}]
        else:
            config["chat_template"] = template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=1, ensure_ascii=False)
        auto = transformers.AutoTokenizer.from_pretrained(path)
        out = []
        for messages, generation_prompt, kwargs in cases:
            case = {"messages": messages, "add_generation_prompt": generation_prompt,
                    "chat_template_kwargs": kwargs}
            try:
                case["text"] = auto.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                        tokenize=False, **kwargs)
                case["ids"] = auto.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                       tokenize=True, return_dict=False, **kwargs)
            except Exception as e:  # the template's raise_exception
                case["error"] = str(e)
            out.append(case)
        with open(os.path.join(path, "cases.json"), "w", encoding="utf-8") as fh:
            json.dump({"transformers": transformers.__version__, "class": type(auto).__name__,
                       "cases": out}, fh, indent=1, ensure_ascii=False)
        print(name, [len(c.get("ids", [])) or c.get("error") for c in out])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
