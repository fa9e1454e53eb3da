"""Fixtures of the unit tests that several modules share."""

from tests.unit.mlflow_store import classifier, migrated_mlflow_db, store  # noqa: F401  (fixtures)
