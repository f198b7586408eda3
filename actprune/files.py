"""The one atomic file write: a reader (or a concurrent job) sees the whole file or nothing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; once, at import, before any thread writes files
    os.umask(mask)
    return mask


UMASK = _read_umask()


def check_jsonl(path: Path, field: str = "text") -> None:
    """A JSON-lines file of rows with `field`, at least one; else an error naming file and line."""
    count = 0
    for number, line in enumerate(read_text(path).split("\n"), 1):  # JSON lines end in \n only
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


@contextmanager
def quiet_datasets():
    """datasets without its progress bars: reading a local JSON-lines file prints `Generating train
    split` otherwise, which is no news. Errors and warnings still show."""
    import datasets

    if datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def jsonl_text(path: Path, cache_dir: str | None = None) -> str:
    """The rows of a local JSON-lines file of `{"text": ...}` joined with "\n\n", checked first,
    read through datasets (cached as Arrow under `cache_dir`)."""
    import datasets

    check_jsonl(path)
    with quiet_datasets():
        rows = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    return "\n\n".join(rows["text"])


def read_text(path: Path, name: str | None = None) -> str:
    """A UTF-8 text file's content; a binary (or otherwise encoded) file is an error naming it (`name`:
    the setting that gave it, else the path)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{name or path}: not UTF-8 text (byte {error.start}: {error.reason}); a binary file?"
        ) from None


_DIGESTS: dict[tuple, str] = {}


def file_version(path: Path) -> str:
    """A file's inode, size, modification and change times: a rewrite changes the change time even
    where the size and modification time were kept (`cp -p`, `touch -r`), a replacement the inode."""
    stat = Path(path).stat()
    return f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"


def digest(path: Path) -> str:
    """The sha256 of a file's content; read once per process for a given version (`file_version`)."""
    path = Path(path).resolve()
    key = (str(path), file_version(path))
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                sha.update(block)
        _DIGESTS[key] = sha.hexdigest()
    return _DIGESTS[key]


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


def cache_write(path: Path, write: Callable[[BinaryIO], None]) -> bool:
    """`atomic_write` of a cache file through `write(file)`; where it fails (a full or read-only disk)
    a warning, and False: a cache is optional, the job goes on without it. Written through a Python
    file so that a full disk is an OSError, not the writing library's own error."""

    def staged(staging: str) -> None:
        with open(staging, "wb") as file:
            write(file)

    try:
        atomic_write(path, staged)
    except OSError as error:
        log.warning("cache file %s not written (%s): going on without it", path, error)
        return False
    return True
