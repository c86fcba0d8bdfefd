"""Committed SA1 vectors must be reproduced byte for byte."""

from __future__ import annotations

import json

import pytest

from tests.make_vectors import VECTOR_DIR, run

FILES = sorted(VECTOR_DIR.glob("*.json"))


def test_vectors_exist() -> None:
    assert {f.stem for f in FILES} >= {"sa1-tagged", "sa1-sealed"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_vector_reproduced(path) -> None:  # type: ignore[no-untyped-def]
    committed = json.loads(path.read_text())
    again = run(committed)
    assert again["encapsulations"] == committed["encapsulations"]  # replayed, none new
    for key in ("msg1", "msg2", "session_id"):
        assert again["outputs"][key] == committed["outputs"][key], key
    for got, want in zip(
        again["outputs"]["messages"], committed["outputs"]["messages"], strict=True
    ):
        assert got == want
