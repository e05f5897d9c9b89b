"""One way to write a file: through a temporary file beside it, renamed into place when complete.

A kill or a full disk never leaves a partial file, and the previous file stays intact until the new
one is whole. A full disk is one line naming the file and the space it needed, not a traceback.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import UserError

FULL = (errno.ENOSPC, errno.EDQUOT)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in FULL:
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        free = shutil.disk_usage(path.parent).free
        raise UserError(f"cannot write {path}: the disk is full ({free / 1e6:.1f} MB free; the file needed more than "
                        f"the {written / 1e6:.1f} MB written when it filled); free some space and run again "
                        f"(nothing was replaced{': the previous ' + path.name + ' is intact' if path.exists() else ''})"
                        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`write_atomically` for UTF-8 text."""
    return write_atomically(path, lambda f: f.write(text.encode("utf-8")))
