"""Every generated hostile input is refused by the core with its stable code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.compress import compress
from core.errors import SlimError
from core.evaluate import load_calibration
from core.files import check_path
from core.reconstruct import reconstruct
from core.safetensors_io import read_header
from tests.hostile.corpus import Case, build

#: Kinds the core alone can refuse (the others need the service: limits, stored state).
CORE_KINDS = {"safetensors", "delta", "calibration", "path", "model"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return build(tmp_path_factory.mktemp("hostile"))


def test_corpus_is_large_enough(corpus: list[Case]) -> None:
    assert len(corpus) >= 40
    assert {c.kind for c in corpus} == CORE_KINDS | {"limit", "stored"}


def test_every_case_gets_its_code(corpus: list[Case], tmp_path: Path) -> None:
    base = next(c.path for c in corpus if c.path is not None).parent / "_base"
    for case in corpus:
        if case.kind not in CORE_KINDS:
            continue
        assert case.path is not None
        with pytest.raises(SlimError) as info:
            if case.kind == "safetensors":
                read_header(case.path)
            elif case.kind == "delta":
                reconstruct(base, case.path, tmp_path / case.name)
            elif case.kind == "calibration":
                load_calibration(case.path, need_labels=True)
            elif case.kind == "model":
                ft = tmp_path / case.name
                ft.mkdir()
                shutil.copy(case.path, ft / "model.safetensors")
                compress(base, ft, tmp_path / f"{case.name}.slim", method="magnitude", keep=0.2)
            else:
                check_path(json.loads(case.path.read_text())[case.name])
        assert info.value.code == case.code, (case.name, info.value.detail)
