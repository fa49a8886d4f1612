"""MLC's ``conv_template`` derived from a checkpoint's own jinja ``chat_template``.

The jinja template is rendered (as transformers' ``apply_chat_template`` does) on probe
conversations whose contents are unique markers; the text between the markers gives
MLC's fields:

    [BOS] system_prefix  SYSTEM  system_suffix | user_role rcs  U1  sep0 | asst_role rcs
    A1  sep1 | user_role rcs  U2  sep0 | asst_role res

(``rcs``/``res``: ``role_content_sep`` / ``role_empty_sep``). Without a system message
the template's own default message fills the system part. The result is accepted only
if ``conversation.render`` reproduces the jinja text on every check conversation (with
and without a system message, one to three turns); otherwise ``DerivedTemplate.problem``
names what MLC's format cannot express and the caller falls back to a named template.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..conversation import render
from .conv_templates import choose_template, make_template, read_chat_template

_SYSTEM = "\x01SYSTEM\x01"
_U1, _A1, _U2, _A2, _U3 = (
    f"\x01{m}\x01" for m in ("USER1", "ASSISTANT1", "USER2", "ASSISTANT2", "USER3")
)

Messages = list[tuple[str, str | None]]  # (role, content); None = the reply to write


@dataclass
class DerivedTemplate:
    template: dict[str, Any] | None  # MLC's conv_template fields, or None
    problem: str | None = None  # why the jinja template cannot be expressed
    bos_prefix: bool = False  # the template starts with the BOS token


def render_jinja(
    chat_template: str, messages: Messages, bos_token: str = "", eos_token: str = ""
) -> str:
    """``messages`` through the jinja template, with the environment transformers uses
    for ``apply_chat_template`` (trim_blocks, lstrip_blocks, sandboxed)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    msgs = [{"role": r, "content": c} for r, c in messages if c is not None]
    return env.from_string(chat_template).render(
        messages=msgs,
        add_generation_prompt=messages[-1][1] is None if messages else False,
        bos_token=bos_token,
        eos_token=eos_token,
        tools=None,
        documents=None,
    )


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :] if n else ""


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _between(text: str, start: str, end: str | None) -> str | None:
    i = text.find(start)
    if i < 0:
        return None
    i += len(start)
    if end is None:
        return text[i:]
    j = text.find(end, i)
    return text[i:j] if j >= 0 else None


def _split_sep_role(common: str, special_tokens: list[str]) -> int:
    """Where the separator ends and the role prefix begins in ``common`` (the text the
    two role prefixes share after the separator): before a special token that opens a
    role (``<|im_start|>``, ``<|start_header_id|>``) when ``common`` ends with one."""
    for token in sorted(special_tokens, key=len, reverse=True):
        if token and common.endswith(token):
            return len(common) - len(token)
    return len(common)


CHECKS: list[Messages] = [
    [("user", _U1), ("assistant", None)],
    [("system", _SYSTEM), ("user", _U1), ("assistant", None)],
    [("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", None)],
    [("system", _SYSTEM), ("user", _U1), ("assistant", _A1), ("user", _U2), ("assistant", None)],
    [
        ("system", _SYSTEM),
        ("user", _U1),
        ("assistant", _A1),
        ("user", _U2),
        ("assistant", _A2),
        ("user", _U3),
        ("assistant", None),
    ],
]


def render_mlc(template: dict[str, Any], messages: Messages, prefix_text: str = "") -> str:
    """``messages`` as MLC's runtime renders them, a system message replacing the default."""
    template = dict(template)
    if messages and messages[0][0] == "system":
        template["system_message"] = messages[0][1]
        messages = messages[1:]
    return prefix_text + render(template, messages)


def derive_template(
    chat_template: str, special_tokens: list[str], bos_token: str | None, eos_token: str | None
) -> DerivedTemplate:
    """MLC fields reproducing ``chat_template``; ``special_tokens`` are the tokenizer's
    added special tokens (for splitting separators from role prefixes and for stops)."""
    bos, eos = bos_token or "", eos_token or ""
    try:
        sys_text = render_jinja(chat_template, CHECKS[1], bos, eos)
        multi = render_jinja(chat_template, CHECKS[3], bos, eos)
        plain = render_jinja(chat_template, CHECKS[0], bos, eos)
    except Exception as err:  # a template may raise on our probes (e.g. tool-only)
        return DerivedTemplate(None, f"rendering it failed ({err})")
    # A leading BOS becomes system_prefix_token_ids, unless the token also structures the
    # conversation (SmolLM2's BOS is <|im_start|>): then it stays text.
    prefix_text = bos if bos and sys_text.startswith(bos) and sys_text.count(bos) == 1 else ""
    ua = _between(multi, _U1, _A1)
    au = _between(multi, _A1, _U2)
    end = _between(multi, _U2, None)
    su = _between(sys_text, _SYSTEM, _U1)
    if None in (ua, au, end, su) or multi.find(_SYSTEM) < 0:
        return DerivedTemplate(None, "it does not show every message of a conversation")
    # ua = sep0 + asst_role + rcs, au = sep1 + user_role + rcs, end = sep0 + asst_role + res
    rcs = _common_suffix(ua, au)
    head_ua, head_au = ua[: len(ua) - len(rcs)], au[: len(au) - len(rcs)]
    # sep0 is where ua and end agree before the assistant's role; likewise the role
    # prefixes share their opening (a special token) after each separator.
    shared = _common_prefix(head_ua, end)
    split0 = _split_sep_role(
        _common_prefix(head_ua, head_au) if head_ua != head_au else shared, special_tokens
    )
    split0 = min(split0, len(shared))
    sep0, asst_role = head_ua[:split0], head_ua[split0:]
    if not end.startswith(sep0 + asst_role):
        return DerivedTemplate(None, "the reply's prompt differs from a written reply's prefix")
    res = end[len(sep0 + asst_role) :]
    # sep1 + user_role = head_au; the user role is what follows the system block too.
    # Prefer the split at the special token the two role prefixes open with, as for sep0.
    split1 = _split_sep_role(_common_prefix(head_ua, head_au), special_tokens)
    user_role = None
    for k in [split1, *range(len(head_au) + 1)]:
        candidate = head_au[k:]
        if su.endswith(candidate + rcs):
            user_role = candidate
            break
    if user_role is None:
        return DerivedTemplate(
            None,
            "the first user message after the system message is "
            "introduced differently from later ones",
        )
    sep1 = head_au[: len(head_au) - len(user_role)]
    system_suffix = su[: len(su) - len(user_role + rcs)]
    system_prefix = sys_text[len(prefix_text) : sys_text.find(_SYSTEM)]
    # The default system message: what fills the system part without one.
    after_system = system_suffix + user_role + rcs + _U1 + end
    start = prefix_text + system_prefix
    if not (
        plain.startswith(start)
        and plain.endswith(after_system)
        and len(plain) >= len(start) + len(after_system)
    ):
        return DerivedTemplate(
            None, "without a system message it writes no system block (MLC always writes one)"
        )
    default = plain[len(start) : len(plain) - len(after_system)]
    stops = [t for t in special_tokens if t and t in sep1]
    if eos and eos not in stops:
        stops.append(eos)
    template = {
        "name": "chat_template",
        "system_template": system_prefix + "{system_message}" + system_suffix,
        "system_message": default,
        "system_prefix_token_ids": [],
        "add_role_after_system_message": True,
        "roles": {"user": user_role, "assistant": asst_role},
        "role_templates": {
            "user": "{user_message}",
            "assistant": "{assistant_message}",
            "tool": "{tool_message}",
        },
        "messages": [],
        "seps": [sep0] if sep0 == sep1 else [sep0, sep1],
        "role_content_sep": rcs,
        "role_empty_sep": res,
        "stop_str": stops or ([sep1.strip()] if sep1.strip() else []),
        "stop_token_ids": [],
        "function_string": "",
        "use_function_calling": False,
    }
    for messages in CHECKS:
        try:
            theirs = render_jinja(chat_template, messages, bos, eos)
        except Exception as err:
            return DerivedTemplate(None, f"rendering it failed ({err})")
        ours = render_mlc(template, messages, prefix_text)
        if ours != theirs:
            roles = "+".join(r for r, c in messages if c is not None)
            return DerivedTemplate(
                None,
                f"MLC's format renders the conversation {roles} "
                f"differently ({_first_difference(ours, theirs)})",
            )
    return DerivedTemplate(template, bos_prefix=bool(prefix_text))


def _first_difference(ours: str, theirs: str) -> str:
    i = len(_common_prefix(ours, theirs))
    readable = {
        _SYSTEM: "<system>",
        _U1: "<user1>",
        _A1: "<reply1>",
        _U2: "<user2>",
        _A2: "<reply2>",
        _U3: "<user3>",
    }

    def show(text: str) -> str:
        for marker, name in readable.items():
            text = text.replace(marker, name)
        return repr(text[:40])

    return f"MLC {show(ours[i:])} where the template has {show(theirs[i:])}"


_TEXT_FIELDS = (
    "system_template",
    "system_message",
    "roles",
    "seps",
    "role_content_sep",
    "role_empty_sep",
)


def checkpoint_template(
    model_dir: Path,
    family_model_type: str,
    tokenizer_json: dict[str, Any],
    vocab: dict[str, int],
    bos_token_id: int | None,
    eos_token_ids: list[int],
    name: str | None = None,
) -> dict[str, Any]:
    """The ``conv_template`` for a checkpoint: the named one when ``name`` is given
    (``--conv-template``), else derived from its own chat_template, else (saying why on
    stderr) the template its tokenizer and family suggest."""
    chat_template = read_chat_template(model_dir)
    if name is None and chat_template:
        by_id = {i: t for t, i in vocab.items()}
        specials = [
            t["content"]
            for t in tokenizer_json.get("added_tokens", [])
            if t.get("special") and isinstance(t.get("content"), str)
        ]
        bos = by_id.get(bos_token_id) if bos_token_id is not None else None
        eos = by_id.get(eos_token_ids[0]) if eos_token_ids else None
        derived = derive_template(chat_template, specials, bos, eos)
        if derived.template is not None:
            template = derived.template
            # Named after the template it equals, if any (``mlc-edge`` and MLC-LLM know it).
            named = make_template(
                choose_template(family_model_type, vocab, chat_template),
                vocab,
                bos_token_id,
                eos_token_ids,
            )
            if all(named[k] == template[k] for k in _TEXT_FIELDS):
                template["name"] = named["name"]
            stops = [vocab[t] for t in template["stop_str"] if t in vocab]
            template["stop_token_ids"] = sorted(set(stops) | set(eos_token_ids))
            if derived.bos_prefix and bos_token_id is not None:
                template["system_prefix_token_ids"] = [bos_token_id]
            return template
        fallback = choose_template(family_model_type, vocab, chat_template)
        print(
            f"warning: the checkpoint's chat_template cannot be written in MLC's "
            f"format: {derived.problem}; using the '{fallback}' template",
            file=sys.stderr,
            flush=True,
        )
        name = fallback
    name = name or choose_template(family_model_type, vocab, chat_template)
    return make_template(name, vocab, bos_token_id, eos_token_ids)
