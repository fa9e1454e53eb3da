"""Pages of the release dashboard; data from `releasegate.dashboard`, identity from Airflow's own token.

Airflow mounts plugin apps without authentication, so every page resolves the caller the
way Airflow's REST API does: an `Authorization: Bearer` JWT, else the `_token` cookie the
Airflow UI sets, validated by the auth manager; then it asks the auth manager whether that
user may read the `model_release` DAG.
"""

from __future__ import annotations

import functools
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import quote, urlencode

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates

if TYPE_CHECKING:
    from releasegate.incidents import IncidentState

MOUNT_PREFIX = "/releasegate"
_templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
_templates.env.filters["timestamp"] = lambda ts: datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
_templates.env.filters["minute"] = lambda ts: datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")
_templates.env.filters["clock"] = lambda ts: datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")
_bearer = HTTPBearer(auto_error=False)

# The dashboard's own pages are server-rendered HTML with inline SVG and styles, and run no script at all.
PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
# An Evidently report carries values from logged traffic (any predict-key holder's category strings) inside its
# own inline <script> blocks, so it is served sandboxed. Its scripts (they draw the charts) run, but without
# allow-same-origin the page gets an opaque origin: no Airflow session cookie, no same-origin storage, no
# authenticated calls to Airflow or to this dashboard. connect-src, img-src and form-action leave it no requests
# either; at most it can navigate its own tab away, taking only what the report itself holds.
REPORT_CSP = (
    "sandbox allow-scripts allow-downloads; default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data: blob:; font-src data:; connect-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)


async def airflow_user(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> BaseUser:
    """The Airflow user behind the request's token; 401 without one, 403 for a bad one or no access to the DAG."""
    # Imported here: the plugin module is loaded while Airflow builds its API app.
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.api_fastapi.core_api.security import get_user

    from releasegate.dashboard import DAG_ID

    user = await get_user(request, None, credentials)
    if not get_auth_manager().is_authorized_dag(method="GET", details=DagDetails(id=DAG_ID), user=user):
        raise HTTPException(status_code=403, detail=f"{user.get_name()} may not read the {DAG_ID} DAG")
    return user


def _airflow_base(request: Request) -> str:
    """Airflow's own root as the browser sees it: the app's mount path without our prefix."""
    root_path: str = request.scope.get("root_path", "")
    return root_path.removesuffix(MOUNT_PREFIX)


def _page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    # `base`: this app's own root as the browser sees it, for the navigation that every page has.
    base = request.scope.get("root_path", "")
    return _templates.TemplateResponse(
        request, template, {"airflow": _airflow_base(request), "base": base, **context}, status_code=status_code
    )


def _incident_state(state: str | None) -> IncidentState | None:
    """The `state` filter of the incidents page as its enum; 400 for one the lifecycle does not have."""
    from releasegate.incidents import IncidentState

    if not state:
        return None
    try:
        return IncidentState(state)
    except ValueError:
        known = ", ".join(s.value for s in IncidentState)
        raise HTTPException(status_code=400, detail=f"no incident state {state!r} (one of {known})") from None


def _filter_href(base: str, state: str | None, model: str | None) -> str:
    """The incidents page with these filters (None: that filter off)."""
    query = urlencode({k: v for k, v in (("state", state), ("model", model)) if v})
    return f"{base}/incidents" + (f"?{query}" if query else "")


def _refresh(running: bool) -> int | None:
    """While a release runs, its page reloads itself: watching a canary needs no clicking."""
    return 15 if running else None


class _Charts(TypedDict):
    """The release page's two SVGs; None where there is nothing to draw yet."""

    traffic_svg: str | None
    metrics_svg: str | None


def _charts(page: dict[str, Any]) -> _Charts:
    """The release page's SVGs; an ended release's are drawn once (matplotlib takes about a second)."""
    end = page["ended_at"] if page["ended_at"] is not None else time.time()
    key = json.dumps([page["traffic"], page["verdicts"], page["started_at"], end], sort_keys=True)
    return _drawn(key) if page["ended_at"] is not None else _draw(key)


def _draw(key: str) -> _Charts:
    from releasegate_airflow.dashboard import charts

    traffic, verdicts, started_at, end = json.loads(key)
    return {"traffic_svg": charts.traffic_svg(traffic, started_at, end), "metrics_svg": charts.metrics_svg(verdicts)}


# Keyed by the charts' own inputs, so an edited row is drawn anew rather than served stale.
_drawn = functools.lru_cache(maxsize=64)(_draw)


def _experiment_chart(page: dict[str, Any]) -> str | None:
    """The experiment page's SVG; an ended experiment's is drawn once."""
    key = json.dumps(page["metrics"], sort_keys=True)
    return _drawn_experiment(key) if page["terminal"] else _draw_experiment(key)


def _draw_experiment(key: str) -> str | None:
    from releasegate_airflow.dashboard import charts

    return charts.experiment_svg(json.loads(key))


_drawn_experiment = functools.lru_cache(maxsize=64)(_draw_experiment)


def _artifacts(request: Request, release_id: str, user: BaseUser) -> Response:
    """Where a release's or an experiment's artifacts are in MLflow: its UI when it has one, else the runs:/ URI."""
    from releasegate import dashboard

    try:
        location = dashboard.report_location(release_id)
    except dashboard.NotFound as err:
        raise HTTPException(status_code=404, detail=str(err)) from err
    if location["ui"]:
        return RedirectResponse(location["ui"], status_code=307)
    return _page(request, "artifacts.html", user=user.get_name(), release_id=release_id, location=location)


def create_app() -> FastAPI:
    app = FastAPI(title="releasegate dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)  # a report sets its own
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> Response:
        # A person in a browser gets a page that says what to do; API clients get Airflow's JSON shape.
        if "text/html" in request.headers.get("accept", ""):
            return _page(
                request, "refused.html", status_code=exc.status_code, detail=exc.detail, status=exc.status_code
            )
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/", response_class=HTMLResponse)
    def releases_list(request: Request, user: BaseUser = Depends(airflow_user)) -> HTMLResponse:
        from releasegate import dashboard

        releases = dashboard.releases()
        return _page(
            request,
            "releases.html",
            user=user.get_name(),
            section="releases",
            releases=releases,
            chain=dashboard.chain_status(),
            dag_id=dashboard.DAG_ID,
            quote=quote,
            refresh_seconds=_refresh(any(not r["terminal"] for r in releases)),
        )

    @app.get("/releases/{release_id}", response_class=HTMLResponse)
    def release_detail(request: Request, release_id: str, user: BaseUser = Depends(airflow_user)) -> Response:
        from releasegate import dashboard

        try:
            page = dashboard.release_page(release_id)
        except dashboard.NotFound as err:
            raise HTTPException(status_code=404, detail=str(err)) from err
        if page["experiment"]:
            return RedirectResponse(f"../experiments/{quote(release_id, safe='')}", status_code=307)
        return _page(
            request,
            "release.html",
            user=user.get_name(),
            section="releases",
            r=page,
            chain=dashboard.chain_status(),
            refresh_seconds=_refresh(not page["terminal"]),
            dag_id=dashboard.DAG_ID,
            quote=quote,
            **_charts(page),
        )

    @app.get("/releases/{release_id}/reports/{stage}/{name}.html")
    def report(release_id: str, stage: str, name: str, user: BaseUser = Depends(airflow_user)) -> HTMLResponse:
        from releasegate import dashboard

        try:
            return HTMLResponse(
                dashboard.report_html(release_id, stage, name), headers={"Content-Security-Policy": REPORT_CSP}
            )
        except dashboard.NotFound as err:
            raise HTTPException(status_code=404, detail=str(err)) from err

    @app.get("/releases/{release_id}/mlflow", response_class=HTMLResponse)
    def artifacts(request: Request, release_id: str, user: BaseUser = Depends(airflow_user)) -> Response:
        """Where the release's artifacts are in MLflow: its UI when it has one, else the runs:/ URI to fetch them."""
        return _artifacts(request, release_id, user)

    @app.get("/experiments/{experiment_id}", response_class=HTMLResponse)
    def experiment_detail(request: Request, experiment_id: str, user: BaseUser = Depends(airflow_user)) -> HTMLResponse:
        """An experiment: its arms, their exposures and status, each metric's interval per arm against control."""
        from releasegate import dashboard

        try:
            page = dashboard.experiment_page(experiment_id)
        except dashboard.NotFound as err:
            raise HTTPException(status_code=404, detail=str(err)) from err
        return _page(
            request,
            "experiment.html",
            user=user.get_name(),
            section="releases",
            e=page,
            chain=dashboard.chain_status(),
            refresh_seconds=_refresh(not page["terminal"]),
            quote=quote,
            experiment_svg=_experiment_chart(page),
        )

    @app.get("/experiments/{experiment_id}/mlflow", response_class=HTMLResponse)
    def experiment_artifacts(request: Request, experiment_id: str, user: BaseUser = Depends(airflow_user)) -> Response:
        """Where the experiment's report is in MLflow (on the control's run)."""
        return _artifacts(request, experiment_id, user)

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse)
    def run_release(
        request: Request, dag_id: str, run_id: str, user: BaseUser = Depends(airflow_user)
    ) -> RedirectResponse:
        """The "Release" tab of a DAG run in Airflow's UI: that run's release (or experiment) page, if it opened one."""
        from releasegate import dashboard

        pages = {dashboard.DAG_ID: "releases", dashboard.EXPERIMENT_DAG_ID: "experiments"}
        release_id = dashboard.release_of_run(run_id) if dag_id in pages else None
        if release_id is None:
            raise HTTPException(status_code=404, detail=f"run {run_id} of {dag_id} opened no release")
        return RedirectResponse(f"../../{pages[dag_id]}/{release_id}", status_code=307)

    @app.get("/incidents", response_class=HTMLResponse)
    def incidents_list(
        request: Request, state: str | None = None, model: str | None = None, user: BaseUser = Depends(airflow_user)
    ) -> HTMLResponse:
        """Incidents, open first; read-only (they are moved with `releasegate incidents`, which audits it)."""
        from releasegate import dashboard

        page = dashboard.incidents_page(_incident_state(state), model or None)
        base = request.scope.get("root_path", "")
        return _page(
            request,
            "incidents.html",
            user=user.get_name(),
            section="incidents",
            p=page,
            href=functools.partial(_filter_href, base),
        )

    @app.get("/incidents/{incident_id}", response_class=HTMLResponse)
    def incident_detail(request: Request, incident_id: int, user: BaseUser = Depends(airflow_user)) -> HTMLResponse:
        from releasegate import dashboard

        try:
            page = dashboard.incident_page(incident_id)
        except dashboard.NotFound as err:
            raise HTTPException(status_code=404, detail=str(err)) from err
        return _page(request, "incident.html", user=user.get_name(), section="incidents", i=page)

    # response_model=None: the JSON goes out as FastAPI encodes any dict, not through a schema built from the hint.
    @app.get("/api/releases", response_model=None)
    def releases_json(user: BaseUser = Depends(airflow_user)) -> dict[str, Any]:
        from releasegate import dashboard

        return {"releases": dashboard.releases(), "audit_chain": dashboard.chain_status()}

    @app.get("/api/releases/{release_id}", response_model=None)
    def release_json(release_id: str, user: BaseUser = Depends(airflow_user)) -> dict[str, Any]:
        from releasegate import dashboard

        try:
            return dashboard.release_page(release_id)
        except dashboard.NotFound as err:
            raise HTTPException(status_code=404, detail=str(err)) from err

    @app.get("/api/experiments/{experiment_id}", response_model=None)
    def experiment_json(experiment_id: str, user: BaseUser = Depends(airflow_user)) -> dict[str, Any]:
        from releasegate import dashboard

        try:
            return dashboard.experiment_page(experiment_id)
        except dashboard.NotFound as err:
            raise HTTPException(status_code=404, detail=str(err)) from err

    @app.get("/api/incidents", response_model=None)
    def incidents_json(
        state: str | None = None, model: str | None = None, user: BaseUser = Depends(airflow_user)
    ) -> dict[str, Any]:
        from releasegate import dashboard

        return dashboard.incidents_page(_incident_state(state), model or None)

    @app.get("/api/incidents/{incident_id}", response_model=None)
    def incident_json(incident_id: int, user: BaseUser = Depends(airflow_user)) -> dict[str, Any]:
        from releasegate import dashboard

        try:
            return dashboard.incident_page(incident_id)
        except dashboard.NotFound as err:
            raise HTTPException(status_code=404, detail=str(err)) from err

    return app
