"""MLC-LLM's conversation template format (``conv_template`` in ``mlc-chat-config.json``)
and how a prompt is rendered from it.

The runtime builds a prompt as: system part, then per message
``role + role_content_sep + content + sep`` and, for the reply it is about to write,
``role + role_empty_sep``; ``system_prefix_token_ids`` (the BOS) go first as ids.
``render`` does the same, so what ``mlc-edge run`` feeds the model is what the phone does.

Shared vocabulary: the bundle writer (``mlc_edge.bundle.conv_templates``, the named
templates) and the runner (``mlc_edge.runtime``) both use it; it imports neither.
"""

from __future__ import annotations

from typing import Any


def conv_template(**fields: Any) -> dict[str, Any]:
    """A template with every field MLC's format has: its defaults, then ``fields``."""
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
