"""Migrations build the schema from empty on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from migrations.api import downgrade, migrate, schema_is_current
from storage.db import make_engine
from storage.models import Model

TABLES = {
    "api_keys",
    "bases",
    "blobs",
    "checkpoints",
    "files",
    "jobs",
    "repos",
    "revisions",
    "refs",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    url: str = request.getfixturevalue("empty_pg_url")
    return url


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    migrate(empty_url)
    assert table_names(empty_url) == TABLES | {"alembic_version"}
    downgrade(empty_url, "base")
    assert table_names(empty_url) == {"alembic_version"}
    migrate(empty_url)
    assert table_names(empty_url) == TABLES | {"alembic_version"}
    migrate(empty_url)  # already at head: nothing to do


def test_schema_is_current_after_migrate(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        assert not schema_is_current(engine)
        migrate(empty_url)
        assert schema_is_current(engine)
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(empty_url: str) -> None:
    migrate(empty_url)
    engine = make_engine(empty_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Model.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_constraint_names_follow_the_convention(empty_url: str) -> None:
    migrate(empty_url)
    engine = make_engine(empty_url)
    try:
        insp = inspect(engine)
        assert insp.get_pk_constraint("jobs")["name"] in ("pk_jobs", None)  # SQLite: unnamed
        assert {ix["name"] for ix in insp.get_indexes("jobs")} == {
            "ix_jobs_checkpoint_id",
            "ix_jobs_state_lease_expires_at",
            "ix_jobs_state_created_at",
        }
        uniques = {uq["name"] for uq in insp.get_unique_constraints("files")}
        assert uniques == {"uq_files_base_id_path", "uq_files_checkpoint_id_path"}
        checks = {ck["name"] for ck in insp.get_check_constraints("files")}
        assert {"ck_files_one_owner", "ck_files_file_role"} <= checks
    finally:
        engine.dispose()
