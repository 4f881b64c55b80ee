"""Run metadata in SQL: SQLAlchemy 2 models, Alembic migrations shipped in the package, repositories.

SQLite under the state dir is the default (`default_url()`); PostgreSQL works through psycopg 3
(`postgresql://user@host/db`). The trainer and self-evolution use `Store.open(url)`.
"""

from forgerl.store.db import (
    alembic_config,
    create_engine,
    current_revision,
    default_url,
    downgrade,
    head_revision,
    upgrade,
)
from forgerl.store.repository import AlreadyExistsError, NotFoundError, Store, StoreError

__all__ = [
    "AlreadyExistsError",
    "NotFoundError",
    "Store",
    "StoreError",
    "alembic_config",
    "create_engine",
    "current_revision",
    "default_url",
    "downgrade",
    "head_revision",
    "open_store",
    "upgrade",
]


def open_store(url: str | None = None, *, migrate: bool = True) -> Store:
    """Store.open(url): connect (default_url() when None) and migrate to head."""
    return Store.open(url, migrate=migrate)
