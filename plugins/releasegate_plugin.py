"""Registers releasegate with Airflow: the release dashboard (a FastAPI app in the API server), its nav entries
(Releases, Incidents) and run tab.

The package `releasegate_airflow` is imported from here (plugins/ is on Airflow's sys.path);
`.airflowignore` keeps Airflow's plugin scan from importing its files a second time as loose modules.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from releasegate_airflow.dashboard import MOUNT_PREFIX, create_app


class ReleasegatePlugin(AirflowPlugin):
    name = "releasegate"
    # AirflowPlugin types these as plain attributes, so a ClassVar here does not type-check (RUF012 wants one).
    fastapi_apps: list[dict[str, object]] = [  # noqa: RUF012
        {"app": create_app(), "url_prefix": MOUNT_PREFIX, "name": "releasegate release dashboard"}
    ]
    external_views: list[dict[str, object]] = [  # noqa: RUF012
        {
            "name": "Releases",
            "href": f"{MOUNT_PREFIX}/",  # served by the app above, shown in an iframe inside Airflow's UI
            "url_route": "releasegate",
            "destination": "nav",
            "category": "browse",
        },
        {
            "name": "Incidents",
            "href": f"{MOUNT_PREFIX}/incidents",
            "url_route": "releasegate-incidents",
            "destination": "nav",
            "category": "browse",
        },
        {
            "name": "Release",
            # A tab on every DAG run; Airflow fills in the placeholders. Runs of other DAGs get "no release".
            "href": f"{MOUNT_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}",
            "url_route": "releasegate-run",
            "destination": "dag_run",
        },
    ]
