"""Everything that decides what gets compiled: family, config with runtime sizes, scheme.

The same ``model_config`` dict (the Hugging Face config plus the runtime sizes) is
written into ``mlc-chat-config.json``, so a bundle can be recompiled from itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.prequantized import require_scheme_for
from ..errors import UserError
from ..models import ModelFamily, RuntimeSizes, find_family
from ..models.vocab import vocab_pieces
from ..quantization import WeightScheme, get_scheme
from .presets import PRESET_KEYS

# model_config key (mlc-chat-config.json) of the allocation limit a bundle's embedding and
# output layer were split for; absent when they are whole.
SPLIT_LIMIT_KEY = "max_alloc_bytes"
# model_config key of a bundle whose 4-bit qweights are stored in CPU tiles
# (``mlc_edge.quantization.int4``); absent when they are in rows.
CPU_TILES_KEY = "int4_cpu_tiles"


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a directory: give a Hugging Face model folder")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"no config.json in {model_dir}: give a Hugging Face model folder")
    return read_json_file(path)


def read_json_file(path: Path) -> Any:
    """The JSON in ``path`` (a config.json, a bundle's mlc-chat-config.json), or one
    UserError line naming the file and where it stops being JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


# Upper bounds far above any released model, below sizes that would only fail later (an
# allocation of terabytes, an hour-long compile): a value outside them is a broken config.
_CONFIG_BOUNDS: dict[str, tuple[int, bool]] = {  # key -> (largest value, required)
    "hidden_size": (1 << 16, True),
    "intermediate_size": (1 << 20, True),
    "num_hidden_layers": (1 << 10, True),
    "num_attention_heads": (1 << 10, True),
    "num_key_value_heads": (1 << 10, False),
    "head_dim": (1 << 12, False),
    "vocab_size": (1 << 22, True),
    "max_position_embeddings": (1 << 24, False),
}
_RUNTIME_BOUNDS = {
    "context_window_size": 1 << 24,
    "prefill_chunk_size": 1 << 16,
    "max_batch_size": 1 << 10,
}


def check_config_values(hf_config: dict[str, Any]) -> None:
    """Refuse sizes no model has (a hidden size of 10^9, zero heads, a negative vocab)
    before anything is built or allocated from them."""
    if not isinstance(hf_config, dict):
        raise UserError("config.json does not hold a JSON object; fix or download it again")
    for key, (largest, required) in _CONFIG_BOUNDS.items():
        value = hf_config.get(key)
        if value is None:
            if required:
                raise UserError(
                    f"config.json has no '{key}': is this a complete Hugging Face config?"
                )
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= largest:
            raise UserError(
                f"config.json has {key} = {value!r}: it must be a whole number "
                f"from 1 to {largest:,}; fix config.json or download it again"
            )
    heads, kv_heads = hf_config["num_attention_heads"], hf_config.get("num_key_value_heads")
    if kv_heads is not None and heads % kv_heads:
        raise UserError(
            f"config.json has num_attention_heads = {heads}, not a multiple of "
            f"num_key_value_heads = {kv_heads}; fix config.json"
        )
    for key in ("rope_theta", "rms_norm_eps", "layer_norm_eps"):
        value = hf_config.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value < float("inf")
            or (key == "rope_theta" and value == 0)
        ):
            raise UserError(
                f"config.json has {key} = {value!r}, not a usable number; fix "
                "config.json or download it again"
            )


@dataclass
class ModelSpec:
    family: ModelFamily
    model_config: dict[str, Any]  # the HF config + runtime sizes
    config: Any  # the family's parsed config
    scheme: WeightScheme
    # Read from a bundle: its weights are converted, so their layout is what it records.
    from_bundle: bool = False

    @classmethod
    def create(
        cls, hf_config: dict[str, Any], quantization: str, runtime_sizes: dict[str, int]
    ) -> ModelSpec:
        if not isinstance(hf_config, dict):
            raise UserError("config.json does not hold a JSON object; fix or download it")
        family = find_family(hf_config)
        check_config_values(hf_config)
        # A bundle made for a device with an allocation limit records it: its weights
        # (and every library compiled from it) keep the embedding/output split.
        scheme = get_scheme(quantization).with_max_alloc(hf_config.get(SPLIT_LIMIT_KEY))
        scheme = scheme.with_int4_tiles(bool(hf_config.get(CPU_TILES_KEY, False)))
        require_scheme_for(hf_config, scheme)  # a pre-quantized checkpoint: the scheme fits
        for key, value in runtime_sizes.items():
            if value < 1:
                raise UserError(f"{key} must be a positive integer, got {value}")
            if value > _RUNTIME_BOUNDS.get(key, value):
                raise UserError(
                    f"{key} {value:,} is larger than mlc-edge allows ({_RUNTIME_BOUNDS[key]:,})"
                )
        model_config = {**hf_config, **runtime_sizes, "tensor_parallel_shards": 1}
        runtime = RuntimeSizes(**{key: runtime_sizes[key] for key in PRESET_KEYS})
        config = family.config_class.from_hf(hf_config, runtime)
        if runtime_sizes["prefill_chunk_size"] > runtime_sizes["context_window_size"]:
            raise UserError("prefill_chunk_size must not exceed context_window_size")
        return cls(family, model_config, config, scheme)

    @classmethod
    def from_chat_config(cls, chat_config: dict[str, Any]) -> ModelSpec:
        model_config = chat_config["model_config"]
        sizes = {k: int(model_config[k]) for k in PRESET_KEYS}
        spec = cls.create(model_config, chat_config["quantization"], sizes)
        spec.from_bundle = True
        return spec

    @property
    def runtime_sizes(self) -> dict[str, int]:
        return {k: int(self.model_config[k]) for k in PRESET_KEYS}

    def for_device(self, max_alloc_bytes: int | None) -> ModelSpec:
        """This spec for a device whose buffers hold at most ``max_alloc_bytes``: the
        embedding / output layer split into pieces when they would not fit (see
        ``mlc_edge.models.vocab``). A spec that already records a limit keeps it (its
        bundle's weights are split that way); one that needs no split is returned as is.
        """
        if max_alloc_bytes is None or self.scheme.max_alloc_bytes is not None:
            return self
        c = self.config
        if len(vocab_pieces(c.vocab_size, c.hidden_size, self.scheme.dtype, max_alloc_bytes)) == 1:
            return self
        model_config = {**self.model_config, SPLIT_LIMIT_KEY: int(max_alloc_bytes)}
        return ModelSpec.create(model_config, self.scheme.name, self.runtime_sizes)

    def with_cpu_tiles(self, tiles: bool) -> ModelSpec:
        """This spec with its 4-bit qweights stored in CPU tiles (``tiles``) or rows,
        recorded in ``model_config``. A bundle's spec keeps the layout its weights have."""
        if self.from_bundle or self.scheme.int4_layout is None:
            return self
        if tiles == bool(self.model_config.get(CPU_TILES_KEY, False)):
            return self
        model_config = {k: v for k, v in self.model_config.items() if k != CPU_TILES_KEY}
        if tiles:
            model_config[CPU_TILES_KEY] = True
        return ModelSpec.create(model_config, self.scheme.name, self.runtime_sizes)
