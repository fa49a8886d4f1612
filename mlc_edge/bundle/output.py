"""Write outputs so a failure leaves nothing half-written behind.

Everything is produced in a staging folder beside the destination and moved into place
only once it is complete; on any error the staging folder is removed and the destination
is as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


def check_destination(out_dir: Path) -> None:
    """Refuse to write into a folder that holds something other than a bundle."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; choose another -o")
    is_bundle = any((out_dir / f).exists() for f in ("mlc-chat-config.json", "tensor-cache.json"))
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_bundle:
        raise UserError(
            f"{out_dir} is not empty and is not a bundle; choose a new or empty -o directory"
        )


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """Yield a staging folder; on success its entries replace those of ``out_dir``."""
    out_dir = Path(out_dir).absolute()
    check_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        out_dir.mkdir(exist_ok=True)
        if (stage / "tensor-cache.json").exists():
            # New weights: shards of an older conversion must not linger.
            for old in out_dir.glob("params_shard_*.bin"):
                old.unlink()
        for entry in stage.iterdir():
            target = out_dir / entry.name
            if entry.is_dir() and target.is_dir():
                for sub in entry.iterdir():
                    os.replace(sub, target / sub.name)
            else:
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
