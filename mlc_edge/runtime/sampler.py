"""Token sampling on the CPU from the library's probabilities, as MLC's engine does on
OpenCL and CPU devices (its ``cpu_sampler``).

The engine calls the library's ``softmax_with_temperature`` with the request's temperature
(0 for greedy) and samples from the result: the argmax at temperatures below
``GREEDY_TEMPERATURE``, otherwise from the top-p nucleus with a uniform random number.
``Engine.generate`` does the first step; ``Sampler`` the second, with TVM's
``vm.builtin.sample_top_p_from_prob`` (the ancestor of the engine's own).
"""

from __future__ import annotations

import numpy as np
import tvm

from ..compiler.contract import GREEDY_TEMPERATURE
from ..errors import UserError


class Sampler:
    """Greedy when ``temperature`` <= 1e-5; otherwise top-p (nucleus) sampling from the
    probabilities the library computed at ``temperature``."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)
        self._sample = tvm.get_global_func("vm.builtin.sample_top_p_from_prob")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def __call__(self, probs: np.ndarray) -> int:
        """A token id drawn from ``probs`` (one distribution over the vocabulary)."""
        probs = np.ascontiguousarray(probs, dtype="float32").reshape(1, -1)
        if not np.isfinite(probs).all():
            # MLC's engine stops its loop here ("Possibly prob distribution contains NAN").
            # Libraries compiled before greedy rows became one-hot do this at temperature 0.
            raise UserError(
                "the library's softmax_with_temperature returned non-finite "
                f"probabilities at temperature {self.temperature} (MLC's engine would stop "
                "here too); compile the bundle again with this mlc-edge"
            )
        uniform = float(self.rng.random())  # one per token at any temperature, as the engine
        if self.greedy:
            # The engine's argmax (top_p 0): the first maximum, so ties go to the lowest
            # id. TVM's builtin breaks ties some other way.
            return int(np.argmax(probs))
        return int(self._sample(tvm.runtime.tensor(probs), self.top_p, uniform))
