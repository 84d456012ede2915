"""Atomic file and folder writes, so that a crash never leaves a half-written artifact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces `path` only when the block finishes without error.

    An existing folder at `path` is kept until the new one is complete, then swapped out.
    """
    # The renames below need a folder name, and an absolute path has one even for "." or "out/..".
    # abspath keeps a symbolic link as the link that the caller named.
    path = Path(os.path.abspath(path))
    if not path.name:
        raise ValueError(f"cannot write a folder in place of {path}; choose a folder below it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_folder(path: str | os.PathLike, markers: tuple[str, ...], kind: str, overwrite: bool = False) -> None:
    """Raise ValueError unless a new output may be written at `path`.

    `path` may be missing or an empty folder. A folder that contains one of the `markers` files
    is an earlier output of the same kind, which is replaced only with `overwrite`. Anything
    else (a file, or a folder with other contents) is never replaced, because the replacement
    removes the whole folder.
    """
    path = Path(os.path.abspath(path))
    if not path.name:
        raise ValueError(f"--out {path} is the root folder; choose a folder below it")
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder; choose another --out")
    if not any(path.iterdir()):
        return
    if not any((path / marker).is_file() for marker in markers):
        raise ValueError(f"--out {path} exists, is not empty and does not contain a synthgen {kind}; choose an "
                         "empty or new folder (writing the output would remove every file in it)")
    if not overwrite:
        raise ValueError(f"--out {path} already contains a {kind}; pass --overwrite to replace it, or choose "
                         "another --out")


def sweep_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove temporary files and folders that a killed process left in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not entry.name.startswith("."):
            continue
        if ".old-" in entry.name:
            # A kill between the two renames of atomic_directory leaves only the old copy:
            # put it back rather than lose it.
            original = folder / entry.name[1:].rsplit(".old-", 1)[0]
            if not original.exists():
                os.replace(entry, original)
                continue
        elif not entry.name.endswith(".tmp"):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
