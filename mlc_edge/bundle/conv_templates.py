"""Conversation templates in MLC-LLM's ``conv_template`` format, and their rendering.

The runtime builds a prompt as: system part, then per message
``role + role_content_sep + content + sep`` and, for the reply it is about to write,
``role + role_empty_sep``; ``system_prefix_token_ids`` (the BOS) go first as ids.
``render`` does the same, so what ``mlc-edge run`` feeds the model is what the phone does.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import UserError


def _template(**fields: Any) -> dict[str, Any]:
    base = {
        "system_template": "{system_message}",
        "system_message": "",
        "system_prefix_token_ids": [],
        "add_role_after_system_message": True,
        "roles": {"user": "user", "assistant": "assistant"},
        "role_templates": {
            "user": "{user_message}",
            "assistant": "{assistant_message}",
            "tool": "{tool_message}",
        },
        "messages": [],
        "seps": ["\n"],
        "role_content_sep": ": ",
        "role_empty_sep": ":",
        "stop_str": [],
        "stop_token_ids": [],
        "function_string": "",
        "use_function_calling": False,
    }
    base.update(fields)
    return base


# Special tokens each template needs from the tokenizer: (field, token text).
_TEMPLATES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "llama-3": (
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
        ["<|eot_id|>", "<|end_of_text|>"],
    ),
    "llama-2": (
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
        [],
    ),
}

TEMPLATE_NAMES = tuple(_TEMPLATES)


def choose_template(family_model_type: str, vocab: dict[str, int]) -> str:
    """The template a checkpoint's tokenizer was trained for."""
    if "<|eot_id|>" in vocab:
        return "llama-3"
    return "llama-2"


def make_template(name: str, vocab: dict[str, int], bos_token_id: int | None,
                  eos_token_ids: list[int]) -> dict[str, Any]:
    """The full template object for ``mlc-chat-config.json``, ids filled from the tokenizer."""
    if name not in _TEMPLATES:
        raise UserError(
            f"unknown conversation template '{name}': choose one of {', '.join(TEMPLATE_NAMES)}"
        )
    template, stop_tokens = _TEMPLATES[name]
    template = copy.deepcopy(template)
    stops = [vocab[t] for t in stop_tokens if t in vocab] + list(eos_token_ids)
    template["stop_token_ids"] = sorted(set(stops))
    if bos_token_id is not None:
        template["system_prefix_token_ids"] = [bos_token_id]
    return template


def render(template: dict[str, Any], messages: list[tuple[str, str | None]]) -> str:
    """The prompt text for ``messages`` ((role, content); content None = reply to write).

    ``system_prefix_token_ids`` are not part of the text: the caller prepends them.
    """
    system = template["system_template"].replace("{system_message}", template["system_message"])
    parts = [system]
    seps = template["seps"]
    for i, (role, content) in enumerate(messages):
        role_text = template["roles"][role]
        if i == 0 and not template["add_role_after_system_message"] and role == "user":
            # Llama-2 puts the first message inside the system block's [INST].
            role_text = ""
        if content is None:
            parts.append(role_text + template["role_empty_sep"])
            continue
        body = template["role_templates"].get(role, "{" + role + "_message}")
        body = body.replace("{" + role + "_message}", content)
        parts.append(role_text + (template["role_content_sep"] if role_text else "") + body)
        parts.append(seps[i % len(seps)])
    return "".join(parts)
