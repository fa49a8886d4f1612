"""Write outputs so a failure leaves nothing half-written behind.

Everything is produced in a staging folder ``.NAME.partial-PID`` beside the destination.
When it is complete, the entries of the old bundle that were not rewritten are
hard-linked into it, and the two folders are swapped in one atomic
``renameat2(RENAME_EXCHANGE)``: a process killed at any point leaves either the old
bundle or the new one, whole. On an error the staging folder is removed; one left by a
killed process (its PID gone) is removed by the next run that writes beside it.
Running out of space, a read-only or uncreatable ``-o`` are one line each.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from .layout import CHAT_CONFIG, TENSOR_CACHE, is_shard_file

_STAGE = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")
# Failures of a write that are the machine's state, not a bug: each gets one line.
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def check_destination(out_dir: Path) -> None:
    """Refuse to write into a folder that holds something other than a bundle."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; choose another -o")
    is_bundle = any((out_dir / f).exists() for f in (CHAT_CONFIG, TENSOR_CACHE))
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_bundle:
        raise UserError(
            f"{out_dir} is not empty and is not a bundle; choose a new or empty -o directory"
        )


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def write_error(err: OSError, out_dir: Path, needs_bytes: int | None = None) -> UserError:
    """One line for a failed write: the file, the reason, what to do."""
    where = err.filename or f"a file in {out_dir}"
    path = Path(where)
    if err.filename and _STAGE.match(path.parent.name):  # say where it was going
        where = f"{out_dir / path.name} (staged as {path})"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"; the bundle needs {_mib(needs_bytes)}" if needs_bytes else ""
        return UserError(
            f"cannot write {where}: no space left on the device{need}; free "
            f"some space or choose another -o (nothing was written to {out_dir})"
        )
    if err.errno == errno.EROFS:
        return UserError(f"cannot write {where}: the file system is read-only; choose another -o")
    return UserError(f"cannot write {where}: {err.strerror}; choose another -o")


def require_space(out_dir: Path, needs_bytes: int | None, folder: Path | None = None) -> None:
    """Refuse up front when the file system of ``folder`` (default: ``out_dir``) visibly
    lacks the space the bundle needs."""
    if not needs_bytes:
        return
    free = shutil.disk_usage(folder or out_dir).free
    if free < needs_bytes:
        raise UserError(
            f"no space left on the device for {out_dir}: the bundle needs "
            f"{_mib(needs_bytes)} and {_mib(free)} is free; free some space or "
            "choose another -o"
        )


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_stages(parent: Path) -> list[Path]:
    """Remove the staging folders in ``parent`` whose process is gone (killed runs)."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STAGE.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _make_dirs(out_dir: Path) -> None:
    """Create ``out_dir``'s parent, or say in one line why it cannot be."""
    for ancestor in out_dir.parents:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise UserError(
                    f"cannot create {out_dir}: {ancestor} is a file, not a "
                    "folder; choose another -o"
                )
            break
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create {err.filename or out_dir.parent}: {err.strerror}; choose another -o"
        ) from None


def _carry(src: Path, dst: Path) -> None:
    """Put an entry of the old bundle into the new one: a hard link (no copy, no space)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _complete_stage(stage: Path, out_dir: Path) -> None:
    """Make ``stage`` the whole new bundle: the old entries it does not replace join it
    (one level deep for folders such as ``lib/``); new weights drop the old shards."""
    new_weights = (stage / TENSOR_CACHE).exists()
    for entry in out_dir.iterdir():
        if new_weights and is_shard_file(entry.name):
            continue
        dest = stage / entry.name
        if entry.is_dir() and not entry.is_symlink() and dest.is_dir():
            for sub in entry.iterdir():
                if not (dest / sub.name).exists() and not (dest / sub.name).is_symlink():
                    _carry(sub, dest / sub.name)
        elif not dest.exists() and not dest.is_symlink():
            _carry(entry, dest)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2``); False where it is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    # Unsupported here, or -o is a mount point (EXDEV/EBUSY): move entry by entry.
    if code in (
        errno.EINVAL,
        errno.ENOSYS,
        errno.ENOTSUP,
        errno.EOPNOTSUPP,
        errno.EXDEV,
        errno.EBUSY,
    ):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace_entries(stage: Path, out_dir: Path) -> None:
    """Without an atomic swap (no renameat2, or -o is a mount point): move the complete
    stage's entries over the old ones one by one, then drop the old ones it replaces."""
    for entry in stage.iterdir():
        target = out_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        try:
            os.replace(entry, target)
        except OSError as err:
            if err.errno != errno.EXDEV:
                raise
            # Another file system: copy beside the target, then replace it in one step.
            part = target.with_name(f".{target.name}.partial-{os.getpid()}")
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, part, symlinks=True)
            else:
                shutil.copy2(entry, part, follow_symlinks=False)
            os.replace(part, target)
    for old in out_dir.iterdir():
        if not (stage / old.name).exists() and not (stage / old.name).is_symlink():
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()


@contextmanager
def staged(out_dir: Path, needs_bytes: int | None = None) -> Iterator[Path]:
    """Yield a staging folder; on success its entries replace those of ``out_dir``.

    ``needs_bytes`` (the weights' size, when known) is checked against the free space
    first and named if the disk fills up anyway.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.is_symlink():  # swap the folder it points to, not the link
        out_dir = out_dir.resolve()
    check_destination(out_dir)
    _make_dirs(out_dir)
    stale = remove_stale_stages(out_dir.parent)
    if stale:
        print(
            f"removed {len(stale)} staging folder(s) left by interrupted runs in {out_dir.parent}",
            file=sys.stderr,
        )
    stage = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
    except OSError as err:
        if err.errno == errno.EROFS:
            raise UserError(
                f"cannot write into {out_dir.parent}: the file system is "
                "read-only; choose another -o"
            ) from None
        raise UserError(
            f"cannot create {out_dir}: {err.strerror} (making a folder in "
            f"{out_dir.parent}); choose another -o"
        ) from None
    try:
        require_space(out_dir, needs_bytes, stage)
        yield stage
        if out_dir.is_dir():
            _complete_stage(stage, out_dir)
            if not _exchange(stage, out_dir):
                _replace_entries(stage, out_dir)
        else:
            os.rename(stage, out_dir)
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        raise write_error(err, out_dir, needs_bytes) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # after a swap: the old bundle
