"""One error tree, one code per condition, one table from code to HTTP status."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import service
import storage
import worker
from core.errors import IntegrityError, InvalidArgument, InvalidPath, SlimError
from service.errors import HTTP_ERROR, STATUS_BY_CODE

ROOT = Path(__file__).resolve().parents[2]
#: Packages whose errors can reach an API answer.
ANSWERING = ("core", "storage", "service")


def _import_all() -> None:
    """Import every module that may define an error class (so the tree below is complete)."""
    importlib.import_module("core.errors")
    for pkg in (storage, service, worker):
        for info in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."):
            importlib.import_module(info.name)


def _tree() -> list[type[SlimError]]:
    _import_all()
    found: list[type[SlimError]] = []
    todo: list[type[SlimError]] = [SlimError]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__.split(".")[0] in (*ANSWERING, "worker")]


def test_no_code_is_defined_twice() -> None:
    owners: dict[str, list[str]] = {}
    for cls in _tree():
        if "code" in vars(cls):
            owners.setdefault(vars(cls)["code"], []).append(f"{cls.__module__}.{cls.__name__}")
    twice = {code: names for code, names in owners.items() if len(names) > 1}
    assert not twice, twice


def test_every_code_that_reaches_the_api_has_one_status() -> None:
    missing = sorted(
        f"{cls.__module__}.{cls.__name__}: {cls.code}"
        for cls in _tree()
        if cls.__module__.split(".")[0] in ANSWERING and cls.code not in STATUS_BY_CODE
    )
    assert not missing
    assert all(isinstance(s, int) and 400 <= s < 600 for s in STATUS_BY_CODE.values())


def test_codes_the_handlers_write_themselves_are_in_the_table() -> None:
    """``error_response("code", ...)`` and the middleware's ``_answer(send, "code", ...)``."""
    pattern = re.compile(r'(?:error_response|_answer)\(\s*(?:send,\s*)?"([a-z_]+)"')
    written = set()
    for path in (ROOT / "service").rglob("*.py"):
        written |= set(pattern.findall(path.read_text()))
    assert written, "the pattern no longer finds the handlers' codes"
    assert written - set(STATUS_BY_CODE) == set()
    assert HTTP_ERROR not in STATUS_BY_CODE  # its status is Starlette's, whatever it raised


def test_one_class_per_shared_condition() -> None:
    from storage.errors import IntegrityError as StoredBytesMismatch
    from storage.errors import StorageError
    from storage.keys import InvalidNamespace

    assert issubclass(StoredBytesMismatch, IntegrityError)
    assert issubclass(StoredBytesMismatch, StorageError)
    assert StoredBytesMismatch.code == "integrity_error"
    assert issubclass(InvalidNamespace, InvalidArgument)
    assert InvalidNamespace.code == "invalid_argument"
    assert InvalidPath.code == "invalid_path"
    import storage.errors

    assert not hasattr(storage.errors, "InvalidPath")  # one path error: the core's
    assert not hasattr(importlib.import_module("service.errors"), "InvalidPath")


def test_statuses_the_api_promises() -> None:
    """The answers tests/service, tests/security and tests/hostile rely on."""
    expect = {
        "invalid_path": 400,
        "invalid_argument": 400,
        "checksum_mismatch": 400,
        "unauthorized": 401,
        "forbidden": 403,
        "not_found": 404,
        "options_differ": 409,
        "not_ready": 409,
        "blob_too_large": 413,
        "unsupported_file": 415,
        "range_not_satisfiable": 416,
        "validation_error": 422,
        "integrity_error": 500,
        "storage_unavailable": 503,
        "storage_full": 507,
    }
    assert {code: STATUS_BY_CODE[code] for code in expect} == expect
