"""The release dashboard: a FastAPI app that Airflow's API server mounts (see plugins/releasegate_plugin.py)."""

from releasegate_airflow.dashboard.app import MOUNT_PREFIX, create_app

__all__ = ["MOUNT_PREFIX", "create_app"]
