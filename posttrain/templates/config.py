"""The template section: which chat template renders conversations, and the default system prompt."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.typed_config import opt


@dataclass
class TemplateConfig:
    name: str = opt("auto", "auto = the tokenizer's own chat template; or chatml, llama3, alpaca, plain")
    system: str | None = opt(None, "system prompt for conversations without one (None: template default)")
