"""Alembic migrations of the run-metadata schema (script_location `forgerl.store:migrations`)."""
