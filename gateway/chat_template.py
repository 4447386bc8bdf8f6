"""Chat messages -> one prompt: the checkpoint's Jinja chat template, an operator's, or plain turns.

Base BLOOM checkpoints ship no template, so the fallback writes each message as a "Role: content" line
and ends with "Assistant:", the turn the model is to complete:

    System: You are terse.
    User: Hello
    Assistant:
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bloomduo.gateway.errors import ValidationError

Message = dict[str, Any]  # {"role": ..., "content": ...} and whatever else a template reads


def _raise(message: str) -> None:
    # Templates call raise_exception() to refuse a conversation they cannot render (transformers' name).
    raise TemplateError(message)


def _special(config: dict[str, Any], name: str) -> str:
    token = config.get(name) or ""
    return token.get("content", "") if isinstance(token, dict) else token


def _checkpoint_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates; the unnamed use is "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def plain_turns(messages: Sequence[Message]) -> str:
    lines = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
    return "\n".join([*lines, "Assistant:"])


def load_chat_template(model_dir: Path, template_file: Path | None) -> Callable[[Sequence[Message]], str]:
    """The renderer the gateway uses: `template_file`, else tokenizer_config.json's template, else
    plain_turns. Read once at start, so a broken template fails the start, not every request."""
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    source = template_file.read_text(encoding="utf-8") if template_file else _checkpoint_template(config)
    if source is None:
        return plain_turns
    # The sandbox and these options are what transformers renders chat templates with.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    template = environment.from_string(source)
    tokens = {name: _special(config, name) for name in ("bos_token", "eos_token")}

    def render(messages: Sequence[Message]) -> str:
        try:
            return template.render(messages=list(messages), add_generation_prompt=True, **tokens)
        except TemplateError as exc:
            raise ValidationError("messages", f"the chat template refused them: {exc}") from None

    return render
