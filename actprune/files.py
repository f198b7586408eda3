"""The one atomic file write: a reader (or a concurrent job) sees the whole file or nothing."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; once, at import, before any thread writes files
    os.umask(mask)
    return mask


UMASK = _read_umask()


def check_jsonl(path: Path, field: str = "text") -> None:
    """A JSON-lines file of rows with `field`, at least one; else an error naming file and line."""
    count = 0
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
            if not isinstance(row, dict) or field not in row:
                raise ValueError(f"{path}, line {number}: a row needs a {field!r} field, one JSON object per line")
            count += 1
    if count == 0:
        raise ValueError(f"{path} holds no rows: one {{{field!r}: ...}} JSON object per line")


def set_aside(path: Path, tag: str) -> Path | None:
    """Rename `path` (a file or a folder) to `<stem>.<tag>.<n><suffix>` beside it, never over another;
    None where a concurrent job moved it first."""
    path = Path(path)
    n = 1
    while (kept := path.with_name(f"{path.stem}.{tag}.{n}{path.suffix}")).exists():
        n += 1
    try:
        os.replace(path, kept)
    except FileNotFoundError:
        return None
    return kept


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call `write(staging_path)`, then rename the staging file to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(staging)
        os.chmod(staging, 0o666 & ~UMASK)  # mkstemp makes it 0600: a teammate could not read it
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise
    return path
