"""Chat templates: messages -> prompt text.

Where the template comes from, first match wins: `--chat-template FILE` (Jinja, HF style);
`chat_template` in the checkpoint's tokenizer_config.json (from a list of named templates,
"default"), or a chat_template.jinja beside it; else ChatML, as Qwen models use: every message
as "<|im_start|>{role}\\n{content}<|im_end|>\\n", then "<|im_start|>assistant\\n", with
"<|im_end|>" as a stop string (no system message is inserted). Jinja templates render in
jinja2's sandbox with HF's variables (messages, add_generation_prompt=True, bos_token,
eos_token, raise_exception); only they need jinja2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass
class ChatTemplate:
    render: Callable[[List[Dict[str, str]]], str]  # messages -> prompt text
    stop: List[str]
    source: str


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
    found = template_source(checkpoint)
    if found is None:
        return default_template()
    source, data, origin = found
    return jinja_template(source, _token_text(data.get("bos_token")), _token_text(data.get("eos_token")), origin=origin)


def template_source(checkpoint: Path) -> Optional[Tuple[str, dict, str]]:
    """(Jinja source, tokenizer_config.json's data, the file it came from) of the chat template a checkpoint
    (or a run directory's checkpoint/) carries in tokenizer_config.json or chat_template.jinja; None without one."""
    checkpoint = Path(checkpoint)
    for d in (checkpoint, checkpoint / "checkpoint"):
        config, jinja = d / "tokenizer_config.json", d / "chat_template.jinja"
        try:
            data = json.loads(config.read_text()) if config.is_file() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{config} is not valid JSON: {err}") from None
        source = data.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if source is None and jinja.is_file():
            source = jinja.read_text()
        if isinstance(source, str) and source:
            return source, data, str(config if config.is_file() else jinja)
    return None
