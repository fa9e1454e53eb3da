"""Start a release through Airflow's REST API (v2) and follow it to its outcome: what `releasegate trigger` runs.

The outcome is the release's own state, read from the `finish` task's XCom (the `Summary` of
`pipeline.finish`), and maps to an exit code: 0 promoted; 1 rejected, rolled back, invalid or
aborted; 2 failed or any error on the way (docs/operations.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import httpx

from releasegate import results
from releasegate.release import EXIT_CODES

SUMMARY_TASK = "finish"
EXIT_ERROR = 2
_DONE = {"success", "failed", "skipped", "upstream_failed", "removed"}
_RUN_DONE = {"success", "failed"}
_WAITING_FOR_A_PERSON = {"awaiting_input", "deferred"}


class AirflowError(RuntimeError):
    """Airflow unreachable, credentials refused, or an answer that is not what the API promises."""


class AirflowUnavailable(AirflowError):
    """No answer, or a 5xx: the API server may be restarting, and a long wait should ride it out."""


class ApprovalRefused(AirflowError):
    """An answer releasegate refuses to send: the release's own triggerer approving it under separation of duties."""


def _detail(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    return detail if isinstance(detail, str) else json.dumps(detail)[:500]


class AirflowClient:
    """Airflow's public REST API v2 with a JWT: a given token, or one from `POST /auth/token`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        if not token and not (username and password):
            raise AirflowError(
                "no Airflow credentials: give a token (RELEASEGATE_AIRFLOW_TOKEN) or a user and "
                "password (RELEASEGATE_AIRFLOW_USER, RELEASEGATE_AIRFLOW_PASSWORD)"
            )
        self.base_url = base_url.rstrip("/")
        self.username, self.password = username, password
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)
        self._token = token or None  # an unset CI secret arrives as ""

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise AirflowUnavailable(f"Airflow at {self.base_url} is unreachable: {type(err).__name__}: {err}") from err

    def login(self) -> str:
        """A fresh JWT for the user and password."""
        resp = self._send("POST", "/auth/token", json={"username": self.username, "password": self.password})
        if resp.status_code in (400, 401, 403):
            raise AirflowError(
                f"Airflow at {self.base_url} refused the credentials of user {self.username!r} "
                f"({resp.status_code}: {_detail(resp)})"
            )
        if resp.status_code not in (200, 201) or "access_token" not in resp.text:
            raise AirflowError(
                f"POST {self.base_url}/auth/token answered {resp.status_code}: {_detail(resp)} "
                "(is this Airflow 3's API server?)"
            )
        self._token = resp.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call to /api/v2; a JWT that expired mid-wait is renewed once when a password is known."""
        if self._token is None:
            self.login()
        for attempt in (1, 2):
            resp = self._send(method, f"/api/v2{path}", headers={"Authorization": f"Bearer {self._token}"}, **kwargs)
            if resp.status_code == 401 and attempt == 1 and self.password:
                self.login()
                continue
            break
        if resp.status_code == 401:
            raise AirflowError(f"Airflow at {self.base_url} refused the token (401: {_detail(resp)})")
        if resp.status_code == 403:
            raise AirflowError(f"Airflow refused {method} {path}: the user may not do this (403: {_detail(resp)})")
        return resp

    def _json(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> dict[str, Any]:
        resp = self.request(method, path, **kwargs)
        if resp.status_code >= 500:
            raise AirflowUnavailable(f"{method} /api/v2{path} answered {resp.status_code}: {_detail(resp)}")
        if resp.status_code not in ok:
            raise AirflowError(f"{method} /api/v2{path} answered {resp.status_code}: {_detail(resp)}")
        return cast(dict[str, Any], resp.json())

    def dag(self, dag_id: str) -> dict[str, Any]:
        resp = self.request("GET", f"/dags/{quote(dag_id)}")
        if resp.status_code == 404:
            raise AirflowError(
                f"Airflow at {self.base_url} has no DAG {dag_id!r} (is dags/ in its DAGs folder, "
                "and has the DAG processor parsed it?)"
            )
        if resp.status_code != 200:
            raise AirflowError(f"GET /api/v2/dags/{dag_id} answered {resp.status_code}: {_detail(resp)}")
        return cast(dict[str, Any], resp.json())

    def unpause(self, dag_id: str) -> None:
        self._json("PATCH", f"/dags/{quote(dag_id)}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any], note: str | None = None) -> dict[str, Any]:
        """A new manual run; no logical date, so runs of the same DAG never collide on it."""
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if note:
            body["note"] = note
        resp = self.request("POST", f"/dags/{quote(dag_id)}/dagRuns", json=body)
        if resp.status_code == 400:  # e.g. the conf does not fit the DAG's params
            raise AirflowError(f"Airflow refused to start {dag_id}: {_detail(resp)}")
        if resp.status_code not in (200, 201):
            raise AirflowError(f"POST /api/v2/dags/{dag_id}/dagRuns answered {resp.status_code}: {_detail(resp)}")
        return cast(dict[str, Any], resp.json())

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self._json("GET", f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id, safe='')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        body = self._json(
            "GET", f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id, safe='')}/taskInstances", params={"limit": 1000}
        )
        return cast(list[dict[str, Any]], body["task_instances"])

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """A task's XCom value (JSON), None when the task pushed none."""
        resp = self.request(
            "GET",
            f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
            f"{quote(task_id)}/xcomEntries/{quote(key)}",
        )
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise AirflowError(f"reading the XCom of {task_id} answered {resp.status_code}: {_detail(resp)}")
        value = resp.json().get("value")
        if isinstance(value, str):  # stored serialized by some XCom backends
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def pending_approvals(self, dag_id: str, run_id: str = "~") -> list[dict[str, Any]]:
        """Human-in-the-loop requests of the run (`~`: of every run of the DAG) still waiting for an answer."""
        body = self._json(
            "GET",
            f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id, safe='')}/hitlDetails",
            params={"response_received": "false"},
        )
        return list(body.get("hitl_details", []))

    def respond(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        chosen_options: list[str],
        params_input: dict[str, Any] | None = None,
        map_index: int = -1,
    ) -> dict[str, Any]:
        """Answer a Human-in-the-loop request as the authenticated user (Airflow records who answered)."""
        resp = self.request(
            "PATCH",
            f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
            f"{quote(task_id)}/{map_index}/hitlDetails",
            json={"chosen_options": chosen_options, "params_input": params_input or {}},
        )
        if resp.status_code == 409:
            raise AirflowError(f"{task_id} of run {run_id} was already answered ({_detail(resp)})")
        if resp.status_code != 200:
            raise AirflowError(f"answering {task_id} of run {run_id} failed ({resp.status_code}: {_detail(resp)})")
        return cast(dict[str, Any], resp.json())

    def whoami(self) -> str | None:
        """The name Airflow knows the caller by (its UI's own `/ui/auth/me`), else the user logged in as."""
        if self._token is None:
            self.login()
        resp = self._send("GET", "/ui/auth/me", headers={"Authorization": f"Bearer {self._token}"})
        if resp.status_code == 200:
            name = resp.json().get("username")
            if isinstance(name, str) and name:
                return name
        return self.username

    def ui_url(self, dag_id: str, run_id: str, task_id: str | None = None) -> str:
        url = f"{self.base_url}/dags/{quote(dag_id)}/runs/{quote(run_id, safe=':+')}"  # as the UI writes it
        return f"{url}/tasks/{quote(task_id)}/required_actions" if task_id else url


@dataclass
class Outcome:
    """How a followed run ended: the exit code, one line that says why, and the release summary if there is one."""

    exit_code: int
    message: str
    run_state: str | None = None
    summary: results.Summary | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)


def release_conf(
    model: str, version: str | None, policy: str | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `model_release` conf: its form's params, plus any extra keys the caller adds."""
    if not model or not model.strip():
        raise AirflowError("a model name is required")
    conf = dict(extra or {})
    conf.update({"model_name": model.strip(), "version": (version or "").strip()})
    if policy:
        conf["policy"] = policy
    return conf


def exit_code_for(summary: results.Summary | None, run_state: str | None) -> tuple[int, str]:
    """Exit code and a sentence for a finished run, from the release's state when the run produced one."""
    if summary is not None:
        reason = summary.reasons[-1] if summary.reasons else ""
        code = EXIT_CODES.get(summary.state, EXIT_ERROR)  # a non-terminal state here means the run lost track of it
        return code, f"{summary.release_id} {summary.state.value}" + (f": {reason}" if reason else "")
    if run_state == "success":
        return 0, "run succeeded"
    return EXIT_ERROR, f"run {run_state or 'ended'} without a release outcome"


def _step_line(ti: dict[str, Any], detail: str | None) -> str:
    name = ti["task_id"] + (f"[{ti['map_index']}]" if ti.get("map_index", -1) not in (-1, None) else "")
    duration = f"{ti['duration']:.1f}s" if isinstance(ti.get("duration"), (int, float)) else "-"
    return f"  {name:<22} {ti['state']:<16} {duration:>8}" + (f"  {detail}" if detail else "")


def _describe(value: Any) -> str | None:
    """The part of a task's XCom a person wants in the stream: what the step decided and why."""
    result = results.parse(value)
    return result.describe() if result is not None else None


def follow(
    client: AirflowClient,
    dag_id: str,
    run_id: str,
    *,
    echo: Callable[[str], None] = print,
    poll_seconds: float = 5.0,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    summary_task: str = SUMMARY_TASK,
    outage_grace: float = 300.0,
) -> Outcome:
    """Poll the run until it ends, printing each task as it finishes and each approval it waits for.

    The release goes on without us, so an API server that stops answering for less than
    `outage_grace` seconds (a restart, a deploy) is waited out rather than failing the job.
    """
    started = time.monotonic()
    unavailable_since: float | None = None
    printed: set[tuple[str, int]] = set()
    asked: set[str] = set()
    steps: list[dict[str, Any]] = []
    while True:
        try:
            run = client.dag_run(dag_id, run_id)
            tis = client.task_instances(dag_id, run_id)
        except AirflowUnavailable as err:
            unavailable_since = unavailable_since or time.monotonic()
            if time.monotonic() - unavailable_since > outage_grace:
                raise
            echo(f"  (Airflow did not answer, retrying: {err})")
            sleep(poll_seconds)
            continue
        unavailable_since = None
        tis = sorted(tis, key=lambda t: (t.get("end_date") or "~", t["task_id"]))
        for ti in tis:
            key = (ti["task_id"], ti.get("map_index", -1))
            if ti.get("state") in _DONE and key not in printed:
                printed.add(key)
                value = client.xcom(dag_id, run_id, ti["task_id"]) if ti["state"] == "success" else None
                steps.append(
                    {"task_id": ti["task_id"], "state": ti["state"], "duration": ti.get("duration"), "value": value}
                )
                echo(_step_line(ti, _describe(value)))
        if any(ti.get("state") in _WAITING_FOR_A_PERSON for ti in tis):
            for request in client.pending_approvals(dag_id, run_id):
                task_id = request["task_instance"]["task_id"]
                if task_id not in asked:
                    asked.add(task_id)
                    echo(
                        f"  {task_id:<22} waiting for approval: {request.get('subject')}\n"
                        f"  {'':<22} answer in the Airflow UI: {client.ui_url(dag_id, run_id, task_id)}\n"
                        f"  {'':<22} options: {', '.join(request.get('options') or [])}"
                    )
        if run["state"] in _RUN_DONE:
            break
        if timeout is not None and time.monotonic() - started > timeout:
            return Outcome(
                EXIT_ERROR,
                f"run {run_id} still {run['state']} after {timeout:.0f} s; "
                f"follow it at {client.ui_url(dag_id, run_id)}",
                run["state"],
                None,
                steps,
            )
        sleep(poll_seconds)
    summary = next(
        (
            r
            for s in steps
            if s["task_id"] == summary_task
            for r in [results.parse(s["value"])]
            if isinstance(r, results.Summary)
        ),
        None,
    )
    code, message = exit_code_for(summary, run["state"])
    if summary is None and run["state"] == "failed":
        failed = [s["task_id"] for s in steps if s["state"] == "failed"]
        message += f" (failed tasks: {', '.join(failed) or 'none recorded'}; logs at {client.ui_url(dag_id, run_id)})"
    return Outcome(code, message, run["state"], summary, steps)


EXPERIMENT_SUMMARY_TASK = "conclude"  # model_experiment's task whose XCom is experiments.Concluded


def experiment_conf(
    model: str, arms: str, weights: str, design: str | None, release_winner: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `model_experiment` conf: its form's params, plus any extra keys the caller adds."""
    if not model or not model.strip():
        raise AirflowError("a model name is required")
    if not arms or not arms.strip():
        raise AirflowError("at least one arm (a version besides the champion) is required")
    conf = dict(extra or {})
    conf.update({"model_name": model.strip(), "arms": arms.strip(), "weights": (weights or "").strip()})
    conf["release_winner"] = release_winner
    if design:
        conf["design"] = design
    return conf


def experiment_outcome(outcome: Outcome) -> tuple[int, str]:
    """Exit code and a sentence for a followed model_experiment run: 0 with a winner, 1 concluded without one (or
    invalid), 2 when the run failed before its result."""
    concluded = next(
        (s["value"] for s in outcome.steps if s["task_id"] == EXPERIMENT_SUMMARY_TASK and isinstance(s["value"], dict)),
        None,
    )
    if concluded is None:
        return EXIT_ERROR, f"the experiment's run ended {outcome.run_state or 'unfollowed'} without its result"
    experiment = concluded.get("experiment_id", "?")
    if concluded.get("winner"):
        return 0, f"{experiment} {concluded.get('state')}: v{concluded['winner']} won ({concluded.get('reason')})"
    return 1, f"{experiment} {concluded.get('state')}: {concluded.get('reason')}"


# The answers a release's approval offers (pipeline's decide task), then Airflow's ApprovalOperator's.
_YES, _NO = ("Promote", "Approve"), ("Roll back", "Reject")


def find_approval(client: AirflowClient, dag_id: str, ref: str, model: str | None = None) -> dict[str, Any]:
    """The one pending approval `ref` names: a run id, or a release id that its request's text mentions."""
    pending = client.pending_approvals(dag_id)
    found = [
        r
        for r in pending
        if ref in (r["task_instance"].get("dag_run_id"), r["task_instance"].get("run_id"))
        or ref in (r.get("body") or "")
        or ref in (r.get("subject") or "")
    ]
    if model:
        found = [r for r in found if model in (r.get("subject") or "") + (r.get("body") or "")]
    if not found:
        waiting = ", ".join(sorted({r["task_instance"].get("dag_run_id", "?") for r in pending})) or "none"
        raise AirflowError(
            f"no approval of {dag_id} waits for {ref!r}"
            + (f" (model {model})" if model else "")
            + f"; runs waiting for one: {waiting}"
        )
    if len(found) > 1:
        raise AirflowError(f"{len(found)} approvals match {ref!r}: give the run id")
    return found[0]


# The XCom key under which the release's decide task (plugins/releasegate_airflow/operators.py) stores its request.
APPROVAL_REQUEST_XCOM = "approval_request"


def self_approval(request_info: dict[str, Any] | None, me: str | None) -> str | None:
    """Why `me` may not approve the release `request_info` (the decide task's XCom) describes, or None if they may."""
    if not request_info or not request_info.get("separate_duties"):
        return None
    triggered_by = request_info.get("triggered_by")
    if not me or me != triggered_by:
        return None
    return (
        f"{me} triggered this release and its policy requires someone else to approve it "
        "(approval.separate_duties); ask another person, or roll it back with --reject"
    )


# How long a request must have waited before releasegate answers it. Airflow 3.3 races an early
# answer: the worker that parked the task reports its exit to the scheduler after the answer has
# already re-queued the task, and the scheduler, seeing a queued or running task "finish", fails it
# as killed externally (SchedulerJobRunner._process_executor_events only forgives that for a task
# still `scheduled`). A person in the UI is slower than that; a CI job answering on the spot is not.
SETTLE_SECONDS = 10.0


def settle(
    request: dict[str, Any],
    seconds: float = SETTLE_SECONDS,
    *,
    now: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Wait until the request is `seconds` old (by its `created_at`); return how long it waited.

    Never waits more than `seconds`, whatever the clocks' skew.
    """
    from datetime import datetime

    created = request.get("created_at")
    if created is None:  # Airflow before 3.1 (no created_at) parks no task, so has no such race
        return 0.0
    try:
        age = now() - datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
    except ValueError:
        age = 0.0  # no readable time: wait the whole period
    wait = min(seconds, max(0.0, seconds - age))
    if wait > 0:
        sleep(wait)
    return wait


def answer(
    client: AirflowClient,
    dag_id: str,
    request: dict[str, Any],
    *,
    approve: bool,
    comment: str | None = None,
    settle_seconds: float = SETTLE_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Approve or reject one pending request, with the comment where the request takes one.

    An approval by the release's own triggerer, where its policy separates the duties, is refused
    here with ApprovalRefused (the decide task refuses it too, should it arrive another way).
    A request younger than `settle_seconds` is answered once it is that old (SETTLE_SECONDS says why).
    """
    options = request.get("options") or []
    chosen = next((o for o in (_YES if approve else _NO) if o in options), None)
    if chosen is None:
        raise AirflowError(f"the request offers {options}, none of which means {'approve' if approve else 'reject'}")
    ti = request["task_instance"]
    if approve:
        info = client.xcom(dag_id, ti["dag_run_id"], ti["task_id"], key=APPROVAL_REQUEST_XCOM)
        if isinstance(info, dict) and info.get("separate_duties"):
            refused = self_approval(info, client.whoami())
            if refused is not None:
                raise ApprovalRefused(refused)
    params = {"comment": comment} if comment and "comment" in (request.get("params") or {}) else {}
    settle(request, settle_seconds, sleep=sleep)
    return client.respond(dag_id, ti["dag_run_id"], ti["task_id"], [chosen], params, ti.get("map_index", -1))
