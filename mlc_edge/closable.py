"""``with`` for the objects that hold files open: a checkpoint, a safetensors file, the
tensor-cache writer. Each defines ``close``; the block's end calls it, error or not."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closable:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
