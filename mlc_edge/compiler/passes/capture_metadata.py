"""Keep a copy of the ``_metadata`` JSON as the pipeline attached it.

A library for a phone cannot be run here to ask its ``_metadata``, yet the bundle needs
its numbers (``memory_usage`` for the app's ``estimated_vram_bytes``). Placed after
``AttachMetadata``, this pass reads the JSON string back out of the module.
"""

from __future__ import annotations

import json
from typing import Any

import tvm
import tvm_ffi
from tvm import IRModule


@tvm.transform.module_pass(opt_level=0, name="CaptureMetadata")
class CaptureMetadata:
    def __init__(self, sink: dict[str, Any]):
        self.sink = sink  # filled in place with the metadata

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        strings: list[str] = []
        tvm_ffi.structural_walk(
            mod["_metadata"], [(tvm.ir.StringImm, lambda s: strings.append(str(s.value)))]
        )
        self.sink.update(json.loads(strings[0]))
        return mod
