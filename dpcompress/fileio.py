"""Atomic file output: write to a temporary file beside the target, then rename.

A crash or an error halfway never leaves a partial output file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file owner-only; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staged_beside(path: PathLike) -> Iterator[Path]:
    """Yield ``path``'s name in a hidden folder beside it; on success every file written into that folder
    (the output and any it refers to by name, such as ONNX weights saved apart) moves beside ``path``,
    ``path`` itself last. On failure the folder goes, and nothing reaches ``path``'s folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as folder:
        staged = Path(folder) / target.name
        yield staged
        for file in sorted(Path(folder).iterdir(), key=lambda f: f.name == target.name):
            os.replace(file, target.parent / file.name)


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
