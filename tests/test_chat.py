"""Chat templates (models/serving/chat.py) against transformers' ``apply_chat_template``: the
ids of each fixture conversation (tests/fixtures/hf/chat, made by scripts/make_chat_fixtures.py
with transformers 5.23), the template's own errors, and where a template is found."""

import json
import os

import pytest

from moe_relayfree_models.serving.chat import ChatError, ChatTemplate, message_text
from moe_relayfree_models.tokenizer import HFTokenizer

CHAT = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "chat")


@pytest.mark.parametrize("name", sorted(os.listdir(CHAT)))
def test_prompt_ids_equal_transformers_apply_chat_template(name):
    """Three places a template is stored (chat_template.jinja, a string, a named list), a BOS
    stored as an AddedToken object, a post-processor that would add a second BOS, loop controls,
    tojson, a namespace, chat_template_kwargs, raise_exception."""
    folder = os.path.join(CHAT, name)
    template = ChatTemplate.from_folder(folder)
    tok = HFTokenizer(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "cases.json"), encoding="utf-8") as fh:
        cases = json.load(fh)["cases"]
    for case in cases:
        def render():
            return template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"],
                                   kwargs=case["chat_template_kwargs"])
        if "error" in case:
            with pytest.raises(ChatError, match=case["error"].replace(".", r"\.")):
                render()
            continue
        text = render()
        assert text == case["text"]
        assert tok.encode(text, add_special_tokens=False) == case["ids"]
        assert template.prompt_ids(tok, case["messages"], kwargs=case["chat_template_kwargs"],
                                   add_generation_prompt=case["add_generation_prompt"]) == case["ids"]


def test_content_parts_and_where_a_template_is_found(tmp_path):
    folder = os.path.join(CHAT, "chatml-thinking")
    template = ChatTemplate.from_folder(folder)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert template.render(parts) == template.render([{"role": "user", "content": "a\nb"}])
    assert message_text("x") == "x"
    with pytest.raises(ChatError, match="image_url"):
        template.render([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    for bad in ([], [{"content": "x"}], "hi"):
        with pytest.raises(ChatError, match="messages"):
            template.render(bad)
    # no template anywhere; a file given overrides the checkpoint's; a missing or broken file
    assert ChatTemplate.from_folder(os.path.join(CHAT, "..", "tokenizers", "bytelevel-no-bos")) is None
    own = tmp_path / "t.jinja"
    own.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    assert ChatTemplate.from_folder(folder, str(own)).render(parts) == "user: a\nb\n"
    with pytest.raises(FileNotFoundError):
        ChatTemplate.from_folder(folder, str(tmp_path / "none.jinja"))
    own.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="not valid Jinja"):
        ChatTemplate.from_folder(folder, str(own))
