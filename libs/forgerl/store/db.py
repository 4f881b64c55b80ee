"""Engines and migrations: the run-metadata database is SQLite by default, PostgreSQL when configured."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event
from sqlalchemy import create_engine as _sa_create_engine
from sqlalchemy.engine import make_url

__all__ = [
    "DEFAULT_DB_FILE",
    "alembic_config",
    "create_engine",
    "current_revision",
    "default_url",
    "downgrade",
    "head_revision",
    "upgrade",
]

DEFAULT_DB_FILE = "forgerl.db"


def default_url(state_dir: str | os.PathLike[str] | None = None) -> str:
    """$FORGERL_DATABASE_URL, else SQLite at <state_dir>/forgerl.db (state_dir: $FORGERL_STATE_DIR or
    ./.forgerl)."""
    env = os.environ.get("FORGERL_DATABASE_URL")
    if env:
        return env
    base = Path(state_dir or os.environ.get("FORGERL_STATE_DIR") or ".forgerl")
    return f"sqlite:///{(base / DEFAULT_DB_FILE).resolve()}"


def _normalise_url(url: str) -> str:
    # `postgresql://` would pick psycopg2, which is not a dependency: use psycopg (3).
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An Engine for `url` (default_url() when None); SQLite gets its directory, foreign keys and a
    busy timeout, PostgreSQL the psycopg 3 driver."""
    url = _normalise_url(url or default_url())
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = _sa_create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return _sa_create_engine(url, **kwargs)


def alembic_config(engine_or_url: Engine | str | None = None) -> Config:
    """An Alembic Config for the migrations shipped in this package (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    if isinstance(engine_or_url, str):
        cfg.set_main_option("sqlalchemy.url", _normalise_url(engine_or_url).replace("%", "%%"))
    elif isinstance(engine_or_url, Engine):
        cfg.set_main_option(
            "sqlalchemy.url", engine_or_url.url.render_as_string(hide_password=False).replace("%", "%%")
        )
    return cfg


def _run(engine_or_url: Engine | str | None, fn: Any, revision: str) -> None:
    engine = engine_or_url if isinstance(engine_or_url, Engine) else create_engine(engine_or_url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(engine)
            cfg.attributes["connection"] = conn
            fn(cfg, revision)
    finally:
        if not isinstance(engine_or_url, Engine):
            engine.dispose()


def upgrade(engine_or_url: Engine | str | None = None, revision: str = "head") -> None:
    """Migrate the database up to `revision` (default: head). Idempotent."""
    _run(engine_or_url, command.upgrade, revision)


def downgrade(engine_or_url: Engine | str | None = None, revision: str = "base") -> None:
    """Migrate the database down to `revision` (default: base, i.e. an empty schema)."""
    _run(engine_or_url, command.downgrade, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
