"""Initial schema: blobs, bases, checkpoints, files, jobs, api_keys.

Written out by hand (not imported from storage.models) so it keeps describing the schema of
revision 0001 when the models move on. Constraint and index names follow
storage.models.NAMING_CONVENTION; state columns are VARCHAR(16) with CHECK constraints.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _state(
    column: str, table: str, check_name: str, values: Sequence[str]
) -> list[sa.schema.SchemaItem]:
    allowed = ", ".join(f"'{value}'" for value in values)
    return [
        sa.Column(column, sa.String(16), nullable=False),
        sa.CheckConstraint(f"{column} IN ({allowed})", name=op.f(f"ck_{table}_{check_name}")),
    ]


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("key_prefix", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(64), nullable=False),
        *_state("role", "api_keys", "api_key_role", ["read", "write", "admin"]),
        sa.Column("name", sa.String(255), nullable=False),
        _timestamp("created_at"),
        _timestamp("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_prefix", name=op.f("uq_api_keys_key_prefix")),
    )
    op.create_table(
        "bases",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        *_state("state", "bases", "base_state", ["uploading", "ready"]),
        sa.Column("num_params", sa.BigInteger(), nullable=True),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bases")),
        sa.UniqueConstraint("namespace", "name", name=op.f("uq_bases_namespace_name")),
    )
    op.create_index(op.f("ix_bases_namespace"), "bases", ["namespace"])
    op.create_table(
        "blobs",
        sa.Column("key", sa.String(160), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_blobs")),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("namespace", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("base_id", sa.String(36), nullable=False),
        *_state(
            "state",
            "checkpoints",
            "checkpoint_state",
            ["uploading", "queued", "compressing", "ready", "failed"],
        ),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("delta_blob_key", sa.String(160), nullable=True),
        sa.Column("original_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=True),
        sa.Column("num_params", sa.BigInteger(), nullable=True),
        sa.Column("bits_per_param", sa.Float(), nullable=True),
        sa.Column("ratio", sa.Float(), nullable=True),
        sa.Column("fitness", sa.JSON(), nullable=True),
        sa.Column("trace", sa.JSON(), nullable=True),
        sa.Column("search_seconds", sa.Float(), nullable=True),
        sa.Column("derived_from", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["base_id"],
            ["bases.id"],
            name=op.f("fk_checkpoints_base_id_bases"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["delta_blob_key"],
            ["blobs.key"],
            name=op.f("fk_checkpoints_delta_blob_key_blobs"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("namespace", "name", name=op.f("uq_checkpoints_namespace_name")),
    )
    op.create_index(op.f("ix_checkpoints_base_id"), "checkpoints", ["base_id"])
    op.create_index(op.f("ix_checkpoints_delta_blob_key"), "checkpoints", ["delta_blob_key"])
    op.create_index(op.f("ix_checkpoints_namespace"), "checkpoints", ["namespace"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("base_id", sa.String(36), nullable=True),
        sa.Column("checkpoint_id", sa.String(36), nullable=True),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob_key", sa.String(160), nullable=True),
        *_state("role", "files", "file_role", ["weights", "aux"]),
        sa.Column("recon_sha256", sa.String(64), nullable=True),
        _timestamp("created_at"),
        sa.CheckConstraint(
            "(base_id IS NULL AND checkpoint_id IS NOT NULL)"
            " OR (base_id IS NOT NULL AND checkpoint_id IS NULL)",
            name=op.f("ck_files_one_owner"),
        ),
        sa.ForeignKeyConstraint(
            ["base_id"], ["bases.id"], name=op.f("fk_files_base_id_bases"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["blob_key"], ["blobs.key"], name=op.f("fk_files_blob_key_blobs"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoints.id"],
            name=op.f("fk_files_checkpoint_id_checkpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
        sa.UniqueConstraint("base_id", "path", name=op.f("uq_files_base_id_path")),
        sa.UniqueConstraint("checkpoint_id", "path", name=op.f("uq_files_checkpoint_id_path")),
    )
    op.create_index(op.f("ix_files_blob_key"), "files", ["blob_key"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        *_state("kind", "jobs", "job_kind", ["compress", "merge"]),
        sa.Column("checkpoint_id", sa.String(36), nullable=False),
        *_state(
            "state", "jobs", "job_state", ["queued", "running", "succeeded", "failed", "cancelled"]
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        _timestamp("lease_expires_at", nullable=True),
        _timestamp("heartbeat_at", nullable=True),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        _timestamp("created_at"),
        _timestamp("started_at", nullable=True),
        _timestamp("finished_at", nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoints.id"],
            name=op.f("fk_jobs_checkpoint_id_checkpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_checkpoint_id"), "jobs", ["checkpoint_id"])
    op.create_index(op.f("ix_jobs_state_lease_expires_at"), "jobs", ["state", "lease_expires_at"])
    op.create_index(op.f("ix_jobs_state_created_at"), "jobs", ["state", "created_at"])


def downgrade() -> None:
    for table in ("jobs", "files", "checkpoints", "blobs", "bases", "api_keys"):
        op.drop_table(table)
