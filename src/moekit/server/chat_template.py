"""Chat templates: messages -> prompt text.

Where the template comes from, first match wins:
  1. `--chat-template FILE` (a Jinja template, HF style);
  2. `chat_template` in the checkpoint's tokenizer_config.json (HF checkpoints; a list of
     named templates picks "default"), or a chat_template.jinja file beside it;
  3. the default template below (ChatML, as Qwen models use):

        <|im_start|>system
        You are a helpful assistant.<|im_end|>
        <|im_start|>user
        Hello!<|im_end|>
        <|im_start|>assistant

     i.e. every message as "<|im_start|>{role}\\n{content}<|im_end|>\\n", then
     "<|im_start|>assistant\\n". "<|im_end|>" is added as a stop string, so a model that
     ends its turn with it stops there. No system message is inserted.

Jinja templates render in jinja2's sandbox with HF's variables (messages,
add_generation_prompt=True, bos_token, eos_token, raise_exception); jinja2 is needed only
for them (a clear error when it is missing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class ChatTemplate:
    def __init__(self, render: Callable[[List[Dict[str, str]]], str], stop: List[str], source: str):
        self._render, self.stop, self.source = render, stop, source

    def render(self, messages: List[Dict[str, str]]) -> str:
        return self._render(messages)


def default_template() -> ChatTemplate:
    def render(messages):
        body = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return body + f"{IM_START}assistant\n"

    return ChatTemplate(render, [IM_END], "default (ChatML)")


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in HF tokenizer configs
        return value.get("content", "")
    return value if isinstance(value, str) else ""


def jinja_template(source: str, bos_token: str = "", eos_token: str = "", origin: str = "jinja") -> ChatTemplate:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError(f"the chat template from {origin} is a Jinja template, which needs the 'jinja2' package: "
                         "pip install jinja2 (or serve with the default template: --chat-template default)") from None

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(source)
    except TemplateError as err:
        raise ValueError(f"the chat template from {origin} does not parse: {err}") from None

    def render(messages):
        try:
            return template.render(messages=messages, add_generation_prompt=True, bos_token=bos_token,
                                   eos_token=eos_token)
        except TemplateError as err:
            raise ValueError(str(err)) from None

    return ChatTemplate(render, [], origin)


def load_chat_template(checkpoint: Path, override: Optional[str] = None) -> ChatTemplate:
    """The chat template for a checkpoint directory (see the module docstring)."""
    if override == "default":
        return default_template()
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise ValueError(f"--chat-template {override!r}: no such file (or pass 'default')")
        return jinja_template(path.read_text(), origin=str(path))
    checkpoint = Path(checkpoint)
    for d in (checkpoint, checkpoint / "checkpoint"):
        config = d / "tokenizer_config.json"
        data = {}
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{config} is not valid JSON: {err}") from None
        source = data.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if source is None and (d / "chat_template.jinja").is_file():
            source = (d / "chat_template.jinja").read_text()
        if isinstance(source, str) and source:
            return jinja_template(source, _token_text(data.get("bos_token")), _token_text(data.get("eos_token")),
                                  origin=str(config if config.is_file() else d / "chat_template.jinja"))
    return default_template()
