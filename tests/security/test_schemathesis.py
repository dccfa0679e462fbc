"""Schemathesis against the service's own OpenAPI document: no input makes it answer 5xx.

Every operation gets a bounded number of generated requests (derandomised, so CI is
reproducible) with the admin key, against the embedded and the distributed stack; a base and a
ready checkpoint exist, so some generated ids are real.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from migrations.api import migrate
from tests.conftest import Models, Stack, run_stack
from tests.infra import AUTH_HEADERS, PostgresServer, commit_and_wait, make_base, make_checkpoint

pytestmark = pytest.mark.slow


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    """Hub commits (NDJSON): a generated string as it is, anything else as one JSON line."""
    return value.encode() if isinstance(value, str) else json.dumps(value).encode() + b"\n"


#: Generated requests per operation (about 20 operations, two stacks).
EXAMPLES = 12


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def live_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models: Models
) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp(f"schemathesis-{request.param}")
    extra: dict[str, Any] = {}
    db_url = None
    if request.param == "distributed":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        db_url = postgres.create()
        migrate(db_url)
        extra = {"pg": db_url, "s3": request.getfixturevalue("s3_endpoint")}
    try:
        with run_stack(request.param, tmp, **extra, max_file_bytes=1 << 20) as stack:
            base = make_base(stack.client, models.base)
            ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
            assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
            assert stack.client.post("/api/repos/create", json={"name": "hubrepo"}).is_success
            yield stack
    finally:
        if db_url is not None:
            request.getfixturevalue("postgres").drop(db_url)


def test_no_server_errors(live_api: Stack) -> None:
    document = live_api.client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(
                    base_url=live_api.url,
                    headers=AUTH_HEADERS,
                    checks=[not_a_server_error],
                    timeout=60,
                )

            try:
                call()
            except Unsatisfiable:  # nothing of this operation can be made invalid
                assert mode == GenerationMode.NEGATIVE, operation.label
