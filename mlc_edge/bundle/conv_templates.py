"""Named conversation templates in MLC-LLM's ``conv_template`` format, and the one a
checkpoint's tokenizer was trained for.

The format itself (its fields, their defaults) and ``render`` live in
``mlc_edge.conversation``: the runner renders prompts with them and imports nothing here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..conversation import conv_template as _template
from ..errors import UserError
from ..models import family_by_model_type


@dataclass(frozen=True)
class _Entry:
    template: dict[str, Any]
    stop_tokens: tuple[str, ...]  # special tokens whose ids stop generation
    bos_prefix: bool  # the tokenizer's own chat template starts with the BOS token


def _chatml(name: str, system_message: str) -> _Entry:
    """Qwen's ChatML: ``<|im_start|>role\ncontent<|im_end|>\n``, no BOS."""
    return _Entry(
        _template(
            name=name,
            system_template="<|im_start|>system\n{system_message}<|im_end|>\n",
            system_message=system_message,
            roles={"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
            seps=["<|im_end|>\n"],
            role_content_sep="\n",
            role_empty_sep="\n",
            stop_str=["<|endoftext|>", "<|im_end|>"],
        ),
        ("<|im_end|>", "<|endoftext|>"),
        bos_prefix=False,
    )


_TEMPLATES: dict[str, _Entry] = {
    "llama-3": _Entry(
        _template(
            name="llama-3",
            system_template=(
                "<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>"
            ),
            system_message="You are a helpful, respectful and honest assistant.",
            roles={
                "user": "<|start_header_id|>user",
                "assistant": "<|start_header_id|>assistant",
            },
            seps=["<|eot_id|>"],
            role_content_sep="<|end_header_id|>\n\n",
            role_empty_sep="<|end_header_id|>\n\n",
        ),
        ("<|eot_id|>", "<|end_of_text|>"),
        bos_prefix=True,
    ),
    "llama-2": _Entry(
        _template(
            name="llama-2",
            system_template="[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
            system_message="You are a helpful, respectful and honest assistant.",
            roles={"user": "[INST]", "assistant": "[/INST]"},
            add_role_after_system_message=False,
            seps=[" "],
            role_content_sep=" ",
            role_empty_sep=" ",
            stop_str=["[INST]"],
        ),
        (),
        bos_prefix=True,
    ),
    # Qwen2-Instruct's default system message.
    "qwen2": _chatml("qwen2", "You are a helpful assistant."),
    # Qwen2.5-Instruct's tokenizer template puts this one in when no system message is given.
    "qwen2.5": _chatml(
        "qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    ),
    # Qwen3's tokenizer template writes no system block without a system message, which
    # MLC's format cannot express (its system part is always rendered); like MLC-LLM's own
    # qwen3 template we default to Qwen2's message rather than an empty system block.
    "qwen3": _chatml("qwen3", "You are a helpful assistant."),
    # Phi-2's documented QA format, "Instruct: ...\nOutput:"; its tokenizer has no template.
    "phi-2": _Entry(
        _template(
            name="phi-2",
            roles={"user": "Instruct", "assistant": "Output"},
            seps=["\n"],
            role_content_sep=": ",
            role_empty_sep=":",
            stop_str=["<|endoftext|>"],
        ),
        ("<|endoftext|>",),
        bos_prefix=False,
    ),
}

TEMPLATE_NAMES = tuple(_TEMPLATES)

_QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud."


def choose_template(
    family_model_type: str, vocab: dict[str, int], chat_template: str | None = None
) -> str:
    """The template a checkpoint's tokenizer was trained for.

    The tokenizer decides where it can (its special tokens and the text of its own
    ``chat_template``): a Phi-2 fine-tune with Qwen's tokenizer speaks ChatML. The
    family's usual template is the fallback.
    """
    if "<|eot_id|>" in vocab:
        return "llama-3"
    if "<|im_start|>" in vocab:
        if "<think>" in vocab:  # Qwen3 added the reasoning tokens
            return "qwen3"
        if chat_template and _QWEN25_SYSTEM in chat_template:
            return "qwen2.5"
        return "qwen2"
    # The template the family declares (models/<family>/__init__.py).
    family = family_by_model_type(family_model_type)
    return family.conv_template if family else "llama-2"


def read_chat_template(model_dir: Path) -> str | None:
    """The tokenizer's own jinja chat template, from wherever transformers saved it."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def make_template(
    name: str, vocab: dict[str, int], bos_token_id: int | None, eos_token_ids: list[int]
) -> dict[str, Any]:
    """The full template object for ``mlc-chat-config.json``, ids filled from the tokenizer."""
    if name not in _TEMPLATES:
        raise UserError(
            f"unknown conversation template '{name}': choose one of {', '.join(TEMPLATE_NAMES)}"
        )
    entry = _TEMPLATES[name]
    template = copy.deepcopy(entry.template)
    stops = [vocab[t] for t in entry.stop_tokens if t in vocab] + list(eos_token_ids)
    template["stop_token_ids"] = sorted(set(stops))
    # Qwen's config.json names a bos_token_id its tokenizer never adds: only templates
    # whose prompts start with BOS get it.
    if entry.bos_prefix and bos_token_id is not None:
        template["system_prefix_token_ids"] = [bos_token_id]
    return template
