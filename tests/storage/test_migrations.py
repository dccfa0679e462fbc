"""Migrations build the schema from empty on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from core.files import manifest_sha256
from migrations.api import downgrade, migrate, schema_is_current
from storage import repo, revisions
from storage.db import make_engine, session_factory
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


# -- 0002: repositories and revisions, backfilled from the rows already there ----------------

NOW = "2026-01-02 03:04:05"


def _insert(conn: Any, table: str, **row: Any) -> None:
    cols = ", ".join(row)
    conn.execute(
        text(f"INSERT INTO {table} ({cols}) VALUES ({', '.join(':' + c for c in row)})"), row
    )


def _seed_0001(url: str) -> None:
    """Rows as revision 0001 knew them: a base, two ready checkpoints (one named like the
    base), one still uploading, each with a file."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            common = {"namespace": "default", "created_at": NOW, "updated_at": NOW}
            _insert(conn, "bases", id="b1", name="minilm", state="ready", num_params=1,
                    total_bytes=4, manifest_sha256="e" * 64, **common)  # fmt: skip
            for cid, name, state in (("c1", "sst2", "ready"), ("c2", "minilm", "ready"),
                                     ("c3", "wip", "uploading")):  # fmt: skip
                _insert(conn, "checkpoints", id=cid, name=name, base_id="b1", state=state,
                        method="lossless", params="{}", original_bytes=4, stored_bytes=2,
                        **common)  # fmt: skip
                _insert(conn, "files", id=f"f{cid}", checkpoint_id=cid, path="model.safetensors",
                        size=4, sha256=cid * 32, role="weights", created_at=NOW)  # fmt: skip
    finally:
        engine.dispose()


def test_0002_backfills_repos_and_downgrades(empty_url: str) -> None:
    migrate(empty_url, "0001")
    _seed_0001(empty_url)
    migrate(empty_url)
    engine = make_engine(empty_url)
    try:
        with engine.connect() as conn:
            repos = dict(conn.execute(text("SELECT name, base_id FROM repos")).tuples().all())
            assert repos == {"sst2": "b1", "minilm": "b1", "wip": "b1", "minilm.base": None}
            rows = conn.execute(
                text(
                    "SELECT r.name, v.number, v.commit_id, v.parent_commit, v.checkpoint_id,"
                    " v.base_id, v.manifest_sha256 FROM revisions v JOIN repos r"
                    " ON r.id = v.repo_id"
                )
            ).all()
            by_repo = {row[0]: row for row in rows}
            assert set(by_repo) == {"sst2", "minilm", "minilm.base"}  # wip is not ready
            assert by_repo["sst2"][4] == "c1" and by_repo["minilm"][4] == "c2"
            assert by_repo["minilm.base"][5] == "b1"
            assert by_repo["sst2"][6] == manifest_sha256([("model.safetensors", "c1" * 32)])
            assert all(r[1] == 1 and r[3] is None and len(r[2]) == 40 for r in rows)
            assert len({r[2] for r in rows}) == 3
            mains = conn.execute(text("SELECT count(*) FROM refs WHERE name = 'main'")).scalar()
            assert mains == 3
        factory = session_factory(engine)
        with factory() as s:  # the names mean what they meant
            assert repo.get_checkpoint(s, "minilm", namespace="default").id == "c2"
            assert repo.get_base(s, "minilm", namespace="default").id == "b1"
            assert repo.get_checkpoint(s, "wip", namespace="default").id == "c3"
            assert revisions.resolve_revision(s, "default", "sst2").checkpoint_id == "c1"
    finally:
        engine.dispose()

    downgrade(empty_url, "0001")
    assert "repos" not in table_names(empty_url)
    engine = make_engine(empty_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM checkpoints")).scalar() == 3
            assert conn.execute(text("SELECT count(*) FROM files")).scalar() == 3  # no cascade
    finally:
        engine.dispose()

    migrate(empty_url)  # and a name with two revisions cannot go back
    engine = make_engine(empty_url)
    try:
        with engine.begin() as conn:
            _insert(conn, "checkpoints", id="c4", namespace="default", name="sst2", base_id="b1",
                    state="uploading", method="lossless", params="{}", original_bytes=0,
                    created_at=NOW, updated_at=NOW)  # fmt: skip
    finally:
        engine.dispose()
    with pytest.raises(RuntimeError, match="more than one checkpoint"):
        downgrade(empty_url, "0001")
    assert "repos" in table_names(empty_url)
