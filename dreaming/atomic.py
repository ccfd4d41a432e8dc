"""Atomic writes: a file or a directory appears whole at its path, or not at all.

Everything that writes results (manifests, cached dreams, corpora, windows, maxima, transcoders, exports,
checkpoints) goes through these two helpers, so a crash or a kill never leaves half a file where a reader
looks. The scratch copy is private to the writing process (`tempfile`), so two processes writing the same
path at once do not collide: the last rename wins, and both renames put a whole copy in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch path beside `path`; when the block ends without an error, rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        yield Path(scratch)
        os.replace(scratch, path)
    finally:
        Path(scratch).unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as scratch:
        scratch.write_text(text)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty scratch directory beside `path`; when the block ends without an error, it replaces `path`
    (an existing one is moved aside first and deleted after, so a crash in between leaves no directory at `path`,
    never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield scratch
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rename(path, old / path.name)
            os.rename(scratch, path)
            shutil.rmtree(old)
        else:
            os.rename(scratch, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
