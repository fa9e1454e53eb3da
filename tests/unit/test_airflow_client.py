"""releasegate trigger's REST client against a scripted Airflow API (httpx.MockTransport).

The real API server is exercised in tests/integration/test_trigger_cli.py; here each release
outcome is mapped to its exit code without running a release for each.
"""

from __future__ import annotations

import json

import httpx
import pytest

from releasegate import airflow_client as af
from releasegate import results
from releasegate.contract import Stage
from releasegate.release import TERMINAL, State
from releasegate.verdict import Decision

RUN = "manual__2026-11-29T10:00:00+00:00"


class FakeAirflow:
    """Airflow's /auth/token and /api/v2 endpoints for one model_release run that ends as `final`."""

    def __init__(self, final: str | None = "promoted", run_state: str = "success", approval: bool = False):
        self.final, self.run_state, self.approval = final, run_state, approval
        self.polls = 0
        self.triggered: dict | None = None
        self.tokens_issued = 0
        self.valid_token = None
        self.outages = 0  # polls of the run answered 503 before it answers again

    def tis(self) -> list[dict]:
        done = self.polls >= 2
        tis = [
            {
                "task_id": "open_release",
                "state": "success",
                "duration": 2.5,
                "map_index": -1,
                "end_date": "2026-11-29T10:00:03Z",
            },
            {
                "task_id": "decide",
                "state": "success" if done else ("deferred" if self.approval else "running"),
                "duration": 1.0,
                "map_index": -1,
                "end_date": "2026-11-29T10:01:00Z" if done else None,
            },
        ]
        if done:
            tis.append(
                {
                    "task_id": "finish",
                    "state": "success" if self.final else "failed",
                    "duration": 3.0,
                    "map_index": -1,
                    "end_date": "2026-11-29T10:01:05Z",
                }
            )
        return tis

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/auth/token":
            body = json.loads(request.content)
            if body != {"username": "ci", "password": "secret"}:
                return httpx.Response(401, json={"detail": "Invalid credentials"})
            self.tokens_issued += 1
            self.valid_token = f"jwt-{self.tokens_issued}"
            return httpx.Response(201, json={"access_token": self.valid_token})
        if request.headers.get("authorization") != f"Bearer {self.valid_token}":
            return httpx.Response(401, json={"detail": "Invalid JWT token"})
        base = f"/api/v2/dags/model_release/dagRuns/{RUN}"
        if request.method == "POST" and path == "/api/v2/dags/model_release/dagRuns":
            self.triggered = json.loads(request.content)
            return httpx.Response(200, json={"dag_run_id": RUN, "state": "queued"})
        if path == base and self.outages > 0:
            self.outages -= 1
            return httpx.Response(503, json={"detail": "api-server restarting"})
        if path == base:
            self.polls += 1
            return httpx.Response(
                200, json={"dag_run_id": RUN, "state": self.run_state if self.polls >= 2 else "running"}
            )
        if path == f"{base}/taskInstances":
            return httpx.Response(200, json={"task_instances": self.tis(), "total_entries": 3})
        if path == f"{base}/hitlDetails":
            pending = self.approval and self.polls < 2
            details = (
                [
                    {
                        "task_instance": {"task_id": "decide"},
                        "subject": "Promote churn v2 (champion v1)?",
                        "options": ["Promote", "Roll back"],
                    }
                ]
                if pending
                else []
            )
            return httpx.Response(200, json={"hitl_details": details, "total_entries": len(details)})
        if path == f"{base}/taskInstances/finish/xcomEntries/return_value" and self.final:
            summary = results.Summary(
                release_id="rel-1",
                model="churn",
                candidate="2",
                champion="1",
                state=State(self.final),
                decision=None,
                reasons=[f"the release ended {self.final}"],
                verdicts=[],
                policy="default",
                started_at=0.0,
                ended_at=1.0,
                duration_seconds=1.0,
            )
            return httpx.Response(200, json={"key": "return_value", "value": summary.model_dump(mode="json")})
        if path == f"{base}/taskInstances/open_release/xcomEntries/return_value":
            opened = results.Opened(
                release_id="rel-1", model="churn", candidate="2", champion="1", policy="default", policy_digest="0" * 64
            )
            return httpx.Response(200, json={"value": opened.model_dump(mode="json")})
        return httpx.Response(404, json={"detail": f"XCom entry with key: `return_value` not found ({path})"})


def client_for(fake: FakeAirflow, **kwargs) -> af.AirflowClient:
    kwargs.setdefault("username", "ci")
    kwargs.setdefault("password", "secret")
    return af.AirflowClient("http://airflow.test", transport=httpx.MockTransport(fake.handler), **kwargs)


def run_release(fake: FakeAirflow) -> tuple[af.Outcome, list[str]]:
    lines: list[str] = []
    with client_for(fake) as client:
        run = client.trigger("model_release", af.release_conf("churn", "2", "default"))
        outcome = af.follow(client, "model_release", run["dag_run_id"], echo=lines.append, sleep=lambda s: None)
    return outcome, lines


@pytest.mark.parametrize("state", sorted(TERMINAL, key=str))
def test_each_release_outcome_gives_the_designed_exit_code(state):
    expected = {State.promoted: 0, State.concluded: 0, State.failed: 2}.get(state, 1)  # concluded: an experiment
    outcome, _lines = run_release(FakeAirflow(final=state.value))
    assert outcome.exit_code == expected
    assert outcome.message == f"rel-1 {state.value}: the release ended {state.value}"


def test_trigger_sends_the_release_params_with_no_logical_date():
    fake = FakeAirflow()
    run_release(fake)
    assert fake.triggered == {
        "logical_date": None,
        "conf": {"model_name": "churn", "version": "2", "policy": "default"},
    }


def test_steps_are_streamed_once_each_with_the_release_they_opened():
    _outcome, lines = run_release(FakeAirflow())
    assert [line.split()[0] for line in lines] == ["open_release", "decide", "finish"]
    assert "release rel-1: churn v2 over v1 (policy default)" in lines[0]
    assert "2.5s" in lines[0]


def test_a_run_that_failed_before_a_release_summary_exits_2_naming_the_failed_task():
    outcome, _ = run_release(FakeAirflow(final=None, run_state="failed"))
    assert outcome.exit_code == 2
    assert "failed tasks: finish" in outcome.message


def test_a_pending_approval_is_announced_with_where_to_answer():
    _, lines = run_release(FakeAirflow(approval=True))
    waiting = [line for line in lines if "waiting for approval" in line]
    assert len(waiting) == 1
    assert "Promote churn v2 (champion v1)?" in waiting[0]
    assert f"http://airflow.test/dags/model_release/runs/{RUN}/tasks/decide/required_actions" in waiting[0]


def test_bad_password_is_a_clear_error():
    with client_for(FakeAirflow(), password="wrong") as client, pytest.raises(af.AirflowError) as err:
        client.dag_run("model_release", RUN)
    assert "refused the credentials of user 'ci'" in str(err.value)


def test_an_expired_token_is_renewed_once_with_the_password():
    fake = FakeAirflow()
    with client_for(fake) as client:
        client.login()
        fake.valid_token = "rotated-by-the-server"
        assert client.dag_run("model_release", RUN)["dag_run_id"] == RUN
    assert fake.tokens_issued == 2


def test_a_given_token_that_is_refused_is_not_retried():
    with (
        client_for(FakeAirflow(), token="stale", username=None, password=None) as client,
        pytest.raises(af.AirflowError, match="refused the token"),
    ):
        client.dag_run("model_release", RUN)


def test_missing_credentials_and_model_are_refused_before_any_call():
    with pytest.raises(af.AirflowError, match="no Airflow credentials"):
        af.AirflowClient("http://airflow.test")
    with pytest.raises(af.AirflowError, match="model name is required"):
        af.release_conf(" ", None, None)


def test_waiting_gives_up_after_the_timeout_with_exit_2():
    fake = FakeAirflow()
    fake.polls = -100  # the run stays running
    with client_for(fake) as client:
        outcome = af.follow(client, "model_release", RUN, echo=lambda line: None, sleep=lambda s: None, timeout=0)
    assert outcome.exit_code == 2 and "still running" in outcome.message


def test_approve_finds_the_release_by_id_and_answers_with_the_release_options_and_comment():
    sent = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v2/dags/model_release/dagRuns/~/hitlDetails":
            return httpx.Response(
                200,
                json={
                    "hitl_details": [
                        {
                            "task_instance": {"task_id": "decide", "dag_run_id": RUN, "map_index": -1},
                            "subject": "Promote churn v2 (champion v1)?",
                            "body": "**Release** `rel-1`: ...",
                            "options": ["Promote", "Roll back"],
                            "params": {"comment": {"value": ""}},
                        }
                    ]
                },
            )
        sent["path"], sent["body"] = request.url.path, json.loads(request.content)
        return httpx.Response(
            200, json={"chosen_options": sent["body"]["chosen_options"], "responded_by": {"id": "ci", "name": "ci"}}
        )

    with af.AirflowClient("http://airflow.test", token="jwt", transport=httpx.MockTransport(handler)) as client:
        request = af.find_approval(client, "model_release", "rel-1", model="churn")
        af.answer(client, "model_release", request, approve=False, comment="latency too close to the limit")
        assert sent["path"] == f"/api/v2/dags/model_release/dagRuns/{RUN}/taskInstances/decide/-1/hitlDetails"
        assert sent["body"] == {
            "chosen_options": ["Roll back"],
            "params_input": {"comment": "latency too close to the limit"},
        }
        with pytest.raises(af.AirflowError, match="no approval of model_release waits for 'rel-2'"):
            af.find_approval(client, "model_release", "rel-2")
        with pytest.raises(af.AirflowError, match="no approval"):
            af.find_approval(client, "model_release", "rel-1", model="fraud")


@pytest.mark.parametrize(
    "result, shown",
    [
        (
            results.Routed(stage=Stage.canary(1, 25), since=0.0, window_seconds=600, max_extensions=0, poll_seconds=5),
            "canary 1 (25 %): 25% of traffic",
        ),
        (
            results.Validated(passed=False, reasons=["accuracy 0.81 below the champion's 0.84 - 0.01"]),
            "failed: accuracy 0.81",
        ),
        (
            results.Recorded(stage=Stage.shadow(), decision=Decision.rollback, reason="error rate +2.1 pt", drift={}),
            "rollback: error rate +2.1 pt",
        ),
        (results.Skipped(reason="release rel-1 ended as rejected", state=State.rejected), "release rel-1 ended"),
    ],
)
def test_each_step_shows_what_it_decided(result, shown):
    assert af._describe(result.model_dump(mode="json")).startswith(shown)
    assert af._describe({"release_id": "rel-1", "state": "promoted"}) is None  # not a step's result: not guessed


def test_a_short_api_outage_during_the_wait_is_ridden_out_and_a_long_one_is_an_error():
    fake = FakeAirflow()
    fake.outages = 2
    lines: list[str] = []
    with client_for(fake) as client:
        outcome = af.follow(client, "model_release", RUN, echo=lines.append, sleep=lambda s: None)
    assert outcome.exit_code == 0 and sum("did not answer" in line for line in lines) == 2

    fake = FakeAirflow()
    fake.outages = 10**6
    with client_for(fake) as client, pytest.raises(af.AirflowUnavailable, match="503"):
        af.follow(client, "model_release", RUN, echo=lambda line: None, sleep=lambda s: None, outage_grace=-1)


class FakeExperimentAirflow:
    """Airflow's API for one model_experiment run whose `conclude` task returns `concluded` (None: it failed)."""

    def __init__(self, concluded: dict | None):
        self.concluded = concluded
        self.triggered: dict | None = None
        self.polls = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        path, base = request.url.path, f"/api/v2/dags/model_experiment/dagRuns/{RUN}"
        if path == "/auth/token":
            return httpx.Response(201, json={"access_token": "jwt"})
        if path == "/api/v2/dags/model_experiment":
            return httpx.Response(200, json={"dag_id": "model_experiment", "is_paused": False})
        if request.method == "POST" and path == "/api/v2/dags/model_experiment/dagRuns":
            self.triggered = json.loads(request.content)
            return httpx.Response(200, json={"dag_run_id": RUN, "state": "queued"})
        if path == base:
            self.polls += 1
            state = "running" if self.polls < 2 else ("success" if self.concluded else "failed")
            return httpx.Response(200, json={"dag_run_id": RUN, "state": state})
        if path == f"{base}/taskInstances":
            ti = {"task_id": "conclude", "map_index": -1, "duration": 1.0, "end_date": "2026-12-02T10:00:00Z"}
            ti["state"] = "success" if self.concluded else "failed"
            return httpx.Response(200, json={"task_instances": [ti] if self.polls >= 2 else [], "total_entries": 1})
        if path == f"{base}/hitlDetails":
            return httpx.Response(200, json={"hitl_details": [], "total_entries": 0})
        if path == f"{base}/taskInstances/conclude/xcomEntries/return_value" and self.concluded:
            return httpx.Response(200, json={"key": "return_value", "value": self.concluded})
        return httpx.Response(404, json={"detail": f"not found ({path})"})


@pytest.mark.parametrize(
    "concluded, code, says",
    [
        (
            {"experiment_id": "rel-e", "state": "concluded", "winner": "2", "reason": "2 wins on conversion"},
            0,
            "v2 won",
        ),
        (
            {"experiment_id": "rel-e", "state": "concluded", "winner": None, "reason": "no winner: futile"},
            1,
            "no winner",
        ),
        (None, 2, "without its result"),
    ],
)
def test_releasegate_experiment_exits_with_the_experiments_outcome(monkeypatch, concluded, code, says):
    """`releasegate experiment --wait` from CI: 0 when an arm won, 1 when none did, 2 when the run failed."""
    from click.testing import CliRunner

    from releasegate import cli

    fake = FakeExperimentAirflow(concluded)
    real = af.AirflowClient
    monkeypatch.setattr(
        af, "AirflowClient", lambda url, **kw: real(url, transport=httpx.MockTransport(fake.handler), **kw)
    )
    args = ["experiment", "--model", "churn", "--arms", "2,3", "--weights", "30,30", "--design", "quick"]
    args += ["--wait", "--poll-seconds", "0", "--user", "ci", "--password", "secret", "--airflow-url", "http://af.test"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == code, result.output
    assert says in result.output
    assert fake.triggered["conf"] == {
        "model_name": "churn",
        "arms": "2,3",
        "weights": "30,30",
        "release_winner": True,
        "design": "quick",
    }


def test_an_answer_waits_until_the_request_is_old_enough_for_airflow_to_take_it():
    """Airflow 3.3 fails a task answered before the scheduler has seen it park (af.SETTLE_SECONDS)."""
    from datetime import UTC, datetime

    now = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC).timestamp()
    waits: list[float] = []

    def waited(created_at: str | None) -> float:
        request = {} if created_at is None else {"created_at": created_at}
        return af.settle(request, 10.0, now=lambda: now, sleep=waits.append)

    assert waited("2026-12-02T11:59:57Z") == pytest.approx(7.0)  # asked 3 s ago
    assert waited("2026-12-02T11:50:00.123456Z") == 0.0  # waiting for minutes: answer at once
    assert waited("2026-12-02T12:05:00+00:00") == 10.0  # the server's clock ahead: never more than the period
    assert waited("not a time") == 10.0
    assert waited(None) == 0.0
    assert waits == pytest.approx([7.0, 10.0, 10.0])
