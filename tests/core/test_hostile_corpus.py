"""Every generated hostile input is refused by the core with its stable code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.checkpoint import check_relpath
from core.errors import SlimError
from core.evaluate import load_calibration
from core.reconstruct import reconstruct
from core.safetensors_io import read_header
from tests.hostile.corpus import Case, build


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return build(tmp_path_factory.mktemp("hostile"))


def test_corpus_is_large_enough(corpus: list[Case]) -> None:
    assert len(corpus) >= 40
    assert {c.kind for c in corpus} == {"safetensors", "delta", "calibration", "path"}


def test_every_case_gets_its_code(corpus: list[Case], tmp_path: Path) -> None:
    base = corpus[0].path.parent / "_base"
    for case in corpus:
        with pytest.raises(SlimError) as info:
            if case.kind == "safetensors":
                read_header(case.path)
            elif case.kind == "delta":
                reconstruct(base, case.path, tmp_path / case.name)
            elif case.kind == "calibration":
                load_calibration(case.path, need_labels=True)
            else:
                check_relpath(json.loads(case.path.read_text())[case.name])
        assert info.value.code == case.code, (case.name, info.value.detail)
