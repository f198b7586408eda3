"""Evaluation text: WikiText-2 raw test from `paths.data_dir`, else from `datasets` (cache or hub)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

WIKITEXT2_TEST = Path("wikitext-2-raw-v1") / "test.jsonl"
FALLBACK = "python_docs"  # metric suffix when the demo measured the fallback text
FALLBACK_SOURCE = "python-docs (pydoc_data.topics), not WikiText-2"


def wikitext2_test_text(data_dir: str | None, fallback: bool = False, cache_dir: str | None = None) -> tuple[str, str]:
    """The test split's rows joined with "\\n\\n", and where they came from.

    Local rows are cached (as Arrow) under `cache_dir`; hub rows in datasets' own cache.
    With `fallback` (the demo only), an offline machine without WikiText-2 gets real English text
    that ships with every Python: the standard library's documentation topics.
    """
    import datasets

    local = Path(data_dir) / WIKITEXT2_TEST if data_dir else None
    if local is not None and local.is_file():
        rows = datasets.load_dataset("json", data_files=str(local), split="train", cache_dir=cache_dir)
        return "\n\n".join(rows["text"]), str(local)
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(rows["text"]), "datasets:wikitext/wikitext-2-raw-v1/test"
    except Exception as error:  # offline, no cache: datasets raises several types
        if fallback:
            from pydoc_data.topics import topics

            log.warning("WikiText-2 is unavailable (%s); the demo falls back to %s", error, FALLBACK_SOURCE)
            return "\n\n".join(topics.values()), FALLBACK_SOURCE
        raise FileNotFoundError(
            f"WikiText-2 test split not found: {local or 'paths.data_dir is unset'} does not exist and "
            f"datasets could not load 'wikitext/wikitext-2-raw-v1' ({type(error).__name__}). Put the "
            f"split there as one {{\"text\": ...}} per line (paths.data_dir=DIR, laid out like "
            f"../shared/data), or run once with network access so datasets caches it."
        ) from error
