"""Initial run-metadata schema: runs, step metrics, checkpoints, policy versions, scaffold versions,
evolution iterations and evaluations.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from forgerl.store.models import UTCDateTime

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("policy_version", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_state"), "runs", ["state"])

    op.create_table(
        "step_metrics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("time", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_step_metrics_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_step_metrics")),
        sa.UniqueConstraint("run_id", "stage", "step", "name", name="uq_step_metrics_key"),
    )
    op.create_index("ix_step_metrics_run_name_step", "step_metrics", ["run_id", "name", "step"])

    op.create_table(
        "checkpoints",
        sa.Column("checkpoint_id", sa.String(128), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("policy_version", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_checkpoints_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("checkpoint_id", name=op.f("pk_checkpoints")),
    )
    op.create_index("ix_checkpoints_run_step", "checkpoints", ["run_id", "step"])

    op.create_table(
        "policy_versions",
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("checkpoint_id", sa.String(128), nullable=True),
        sa.Column("published_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoints.checkpoint_id"],
            name=op.f("fk_policy_versions_checkpoint_id_checkpoints"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_policy_versions_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "version", name=op.f("pk_policy_versions")),
    )

    op.create_table(
        "scaffold_versions",
        sa.Column("scaffold_id", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("parent", sa.String(256), nullable=False),
        sa.Column("config_yaml", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("scaffold_id", "version", name=op.f("pk_scaffold_versions")),
    )

    op.create_table(
        "evolution_iterations",
        sa.Column("iteration_id", sa.String(128), nullable=False),
        sa.Column("index", sa.BigInteger(), nullable=False),
        sa.Column("base_scaffold", sa.String(256), nullable=False),
        sa.Column("candidate_scaffolds", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(40), nullable=False),
        sa.Column("diagnosis", sa.Text(), nullable=False),
        sa.Column("selected_scaffold", sa.String(256), nullable=False),
        sa.Column("approved_by", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("iteration_id", name=op.f("pk_evolution_iterations")),
        sa.UniqueConstraint("index", name=op.f("uq_evolution_iterations_index")),
    )

    op.create_table(
        "evaluations",
        sa.Column("evaluation_id", sa.String(128), nullable=False),
        sa.Column("iteration_id", sa.String(128), nullable=True),
        sa.Column("scaffold_version", sa.String(256), nullable=False),
        sa.Column("suite", sa.String(128), nullable=False),
        sa.Column("split", sa.String(64), nullable=False),
        sa.Column("episodes", sa.Integer(), nullable=False),
        sa.Column("success_rate", sa.Float(), nullable=False),
        sa.Column("mean_reward", sa.Float(), nullable=False),
        sa.Column("mean_wall_clock_s", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["iteration_id"],
            ["evolution_iterations.iteration_id"],
            name=op.f("fk_evaluations_iteration_id_evolution_iterations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("evaluation_id", name=op.f("pk_evaluations")),
    )
    op.create_index(op.f("ix_evaluations_iteration_id"), "evaluations", ["iteration_id"])
    op.create_index("ix_evaluations_scaffold_suite", "evaluations", ["scaffold_version", "suite", "split"])


def downgrade() -> None:
    op.drop_index("ix_evaluations_scaffold_suite", table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_iteration_id"), table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_table("evolution_iterations")
    op.drop_table("scaffold_versions")
    op.drop_table("policy_versions")
    op.drop_index("ix_checkpoints_run_step", table_name="checkpoints")
    op.drop_table("checkpoints")
    op.drop_index("ix_step_metrics_run_name_step", table_name="step_metrics")
    op.drop_table("step_metrics")
    op.drop_index(op.f("ix_runs_state"), table_name="runs")
    op.drop_table("runs")
