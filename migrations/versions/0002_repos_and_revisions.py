"""Repositories and revisions: ``repos``, ``revisions``, ``refs``; checkpoint names repeat.

A repository owns the name users see; each of its revisions points at one stored object (a
base or a checkpoint), so several checkpoints now share a name: the unique constraint
``uq_checkpoints_namespace_name`` becomes the index ``ix_checkpoints_namespace_name``.

Backfill, for the rows already there:

- every checkpoint → a repository of its name (stored against its base); a ready one also
  → that repository's revision 1, with ``main`` on it. A checkpoint not ready yet is the
  repository's push in flight and becomes its revision when it is published.
- every base → a repository stored whole (no base); a ready one also → its revision 1.
- a base and a checkpoint of the same name in one namespace: the checkpoint's repository
  keeps the name (it is what users pull by that name) and the base's repository is named
  ``<name>.base`` (``<name>.base-2``, … if that is taken too). The base row keeps its own
  name, so ``--base <name>`` and ``/v1/bases/<name>`` go on working.

Downgrade drops the three tables and puts the unique constraint back; it refuses (and changes
nothing) while a name has more than one checkpoint: delete the older revisions first.

Written out by hand, like 0001, so it keeps describing this revision's schema.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "repos",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("base_id", sa.String(36), nullable=True),
        sa.Column("policy", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["base_id"], ["bases.id"], name=op.f("fk_repos_base_id_bases"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_repos")),
        sa.UniqueConstraint("namespace", "name", name=op.f("uq_repos_namespace_name")),
    )
    op.create_index(op.f("ix_repos_base_id"), "repos", ["base_id"])
    op.create_table(
        "revisions",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("repo_id", sa.String(36), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("commit_id", sa.String(40), nullable=False),
        sa.Column("parent_commit", sa.String(40), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("base_id", sa.String(36), nullable=True),
        sa.Column("checkpoint_id", sa.String(36), nullable=True),
        _timestamp("created_at"),
        sa.CheckConstraint(
            "(base_id IS NULL AND checkpoint_id IS NOT NULL)"
            " OR (base_id IS NOT NULL AND checkpoint_id IS NULL)",
            name=op.f("ck_revisions_one_object"),
        ),
        sa.CheckConstraint("length(commit_id) = 40", name=op.f("ck_revisions_commit_id_length")),
        sa.ForeignKeyConstraint(
            ["repo_id"], ["repos.id"], name=op.f("fk_revisions_repo_id_repos"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["base_id"], ["bases.id"], name=op.f("fk_revisions_base_id_bases"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoints.id"],
            name=op.f("fk_revisions_checkpoint_id_checkpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revisions")),
        sa.UniqueConstraint("commit_id", name=op.f("uq_revisions_commit_id")),
        sa.UniqueConstraint("repo_id", "number", name=op.f("uq_revisions_repo_id_number")),
        sa.UniqueConstraint("base_id", name=op.f("uq_revisions_base_id")),
        sa.UniqueConstraint("checkpoint_id", name=op.f("uq_revisions_checkpoint_id")),
    )
    op.create_table(
        "refs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("repo_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("revision_id", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(
            ["repo_id"], ["repos.id"], name=op.f("fk_refs_repo_id_repos"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["revision_id"],
            ["revisions.id"],
            name=op.f("fk_refs_revision_id_revisions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refs")),
        sa.UniqueConstraint("repo_id", "name", name=op.f("uq_refs_repo_id_name")),
    )
    op.create_index(op.f("ix_refs_revision_id"), "refs", ["revision_id"])
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint("uq_checkpoints_namespace_name", type_="unique")
        batch.create_index("ix_checkpoints_namespace_name", ["namespace", "name"])
    _backfill(op.get_bind())


def downgrade() -> None:
    bind = op.get_bind()
    checkpoints = sa.table("checkpoints", sa.column("namespace"), sa.column("name"))
    repeated = bind.execute(
        sa.select(checkpoints.c.namespace, checkpoints.c.name)
        .group_by(checkpoints.c.namespace, checkpoints.c.name)
        .having(sa.func.count() > 1)
    ).all()
    if repeated:
        names = ", ".join(f"{ns}/{name}" for ns, name in repeated[:10])
        raise RuntimeError(
            f"cannot downgrade: {len(repeated)} name(s) hold more than one checkpoint "
            f"(revisions): {names}; delete the older revisions first"
        )
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_index("ix_checkpoints_namespace_name")
        batch.create_unique_constraint("uq_checkpoints_namespace_name", ["namespace", "name"])
    for table in ("refs", "revisions", "repos"):
        op.drop_table(table)


# -- backfill --------------------------------------------------------------------------------

_bases = sa.table(
    "bases",
    sa.column("id"),
    sa.column("namespace"),
    sa.column("name"),
    sa.column("state"),
    sa.column("total_bytes"),
    sa.column("manifest_sha256"),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
_checkpoints = sa.table(
    "checkpoints",
    sa.column("id"),
    sa.column("namespace"),
    sa.column("name"),
    sa.column("base_id"),
    sa.column("state"),
    sa.column("method"),
    sa.column("stored_bytes"),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
_files = sa.table("files", sa.column("base_id"), sa.column("checkpoint_id"), sa.column("path"),
                  sa.column("sha256"))  # fmt: skip
_repos = sa.table(
    "repos",
    sa.column("id"),
    sa.column("namespace"),
    sa.column("name"),
    sa.column("base_id"),
    sa.column("policy", sa.JSON()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
_revisions = sa.table(
    "revisions",
    sa.column("id"),
    sa.column("repo_id"),
    sa.column("number"),
    sa.column("commit_id"),
    sa.column("parent_commit"),
    sa.column("message"),
    sa.column("manifest_sha256"),
    sa.column("base_id"),
    sa.column("checkpoint_id"),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
_refs = sa.table(
    "refs", sa.column("id"), sa.column("repo_id"), sa.column("name"), sa.column("revision_id")
)


def _manifest(bind: sa.Connection, owner: sa.ColumnElement[bool]) -> str:
    """core.files.manifest_sha256 as of this revision: sha256 over sorted ``path\\0sha\\n``."""
    h = hashlib.sha256()
    rows = bind.execute(sa.select(_files.c.path, _files.c.sha256).where(owner)).all()
    for path, digest in sorted(rows):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()


def _commit_id(repo_id: str, manifest: str, message: str, when: datetime) -> str:
    text = "\n".join([repo_id, "", manifest, message, when.isoformat()])
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _add_repo(
    bind: sa.Connection,
    *,
    namespace: str,
    name: str,
    base_id: str | None,
    created_at: datetime,
    revision: tuple[str, str, str | None, str | None] | None,
) -> None:
    """A repository and, if ``revision`` = (manifest, message, base_id, checkpoint_id), its
    revision 1 with ``main`` on it."""
    repo_id = str(uuid.uuid4())
    bind.execute(
        _repos.insert().values(
            id=repo_id,
            namespace=namespace,
            name=name,
            base_id=base_id,
            policy={},
            created_at=created_at,
        )
    )
    if revision is None:
        return
    manifest, message, object_base, object_ckpt = revision
    revision_id = str(uuid.uuid4())
    bind.execute(
        _revisions.insert().values(
            id=revision_id,
            repo_id=repo_id,
            number=1,
            commit_id=_commit_id(repo_id, manifest, message, created_at),
            parent_commit=None,
            message=message,
            manifest_sha256=manifest,
            base_id=object_base,
            checkpoint_id=object_ckpt,
            created_at=created_at,
        )
    )
    bind.execute(
        _refs.insert().values(
            id=str(uuid.uuid4()), repo_id=repo_id, name="main", revision_id=revision_id
        )
    )


def _backfill(bind: sa.Connection) -> None:
    taken: set[tuple[str, str]] = set()
    for ckpt in bind.execute(sa.select(_checkpoints).order_by(_checkpoints.c.created_at)).all():
        taken.add((ckpt.namespace, ckpt.name))
        revision = None
        if ckpt.state == "ready":
            manifest = _manifest(bind, _files.c.checkpoint_id == ckpt.id)
            message = f"{ckpt.name}: {ckpt.method}, {ckpt.stored_bytes} bytes stored"
            revision = (manifest, message, None, ckpt.id)
        _add_repo(
            bind,
            namespace=ckpt.namespace,
            name=ckpt.name,
            base_id=ckpt.base_id,
            created_at=ckpt.created_at,
            revision=revision,
        )
    for base in bind.execute(sa.select(_bases).order_by(_bases.c.created_at)).all():
        name, n = base.name, 1
        while (base.namespace, name) in taken:
            name = f"{base.name}.base" + ("" if n == 1 else f"-{n}")
            n += 1
        taken.add((base.namespace, name))
        revision = None
        if base.state == "ready":
            manifest = base.manifest_sha256 or _manifest(bind, _files.c.base_id == base.id)
            message = f"base {base.name}: {base.total_bytes} bytes stored whole"
            revision = (manifest, message, base.id, None)
        _add_repo(
            bind,
            namespace=base.namespace,
            name=name,
            base_id=None,
            created_at=base.created_at,
            revision=revision,
        )
