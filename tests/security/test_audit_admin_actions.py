"""Hole 8 (beside the anchored head): who changed traffic, who holds a key, and which key asked for a prediction.

At 674b38f a route changed through the gateway's admin API left no audit event, creating or revoking an
API key left none either, and `predictions` did not record which key called. So an insider could mint an
admin key, move all traffic to a version of their choosing, revoke the key and leave no trace of any of it.
The attack here is that insider's sequence; each step now leaves an event (or a row) naming the key.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from releasegate import audit, storage
from releasegate.serving import auth
from tests.integration.test_gateway import MODEL, rows
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def _known(gw, key: str, role: str) -> bool:
    """Whether the gateway's poller has read the key (a key it does not know is a 401)."""
    headers = {"authorization": f"Bearer {key}"}
    if role == "admin":
        return httpx.get(f"{gw.url}/admin/routes", headers=headers).status_code != 401
    body = {"dataframe_records": rows(1)}
    return httpx.post(f"{gw.url}/models/{MODEL}/invocations", json=body, headers=headers).status_code != 401


def _live_key(gw, role: str) -> tuple[str, str]:
    key_id, key = auth.create_key(role, gw.settings)
    wait_until(lambda: _known(gw, key, role), timeout=30, what=f"the {role} key known to the gateway")
    return key_id, key


def _events_after(engine, seq: int, **where) -> list[dict]:
    return [e for e in audit.events(engine=engine, **where) if e["seq"] > seq]


def _last_seq(engine) -> int:
    return max((e["seq"] for e in audit.events(engine=engine)), default=0)


def test_a_route_change_through_the_admin_api_is_audited_naming_the_key(security_gateway):
    gw = security_gateway
    engine = storage.engine(gw.settings.db_url)
    key_id, key = _live_key(gw, "admin")
    before = _last_seq(engine)

    body = {"champion_version": gw.versions["candidate"], "candidate_version": None, "mode": "single"}
    try:
        resp = httpx.put(
            f"{gw.url}/admin/routes/{MODEL}", json=body, headers={"authorization": f"Bearer {key}"}, timeout=120
        )
        assert resp.status_code == 200, resp.text
    finally:
        assert gw.put_route(champion_version=gw.versions["champion"], mode="single").status_code == 200

    changes = [e for e in _events_after(engine, before, model=MODEL) if e["action"] == "route"]
    assert changes, "the route change left no audit event"
    first = changes[0]
    assert first["actor"] == f"apikey:{key_id}" and first["details"]["key_id"] == key_id, first
    assert first["version"] == gw.versions["candidate"] and first["details"]["champion_version"] == first["version"]
    assert changes[1]["actor"] == f"apikey:{auth.ADMIN_KEY_ID}"  # the restore, by the environment's admin key


def test_creating_and_revoking_a_key_from_the_command_line_is_audited(settings):
    from releasegate.cli import main

    engine = storage.engine(settings.db_url)
    before = _last_seq(engine)
    created = CliRunner().invoke(main, ["apikeys", "create", "--role", "admin"])
    assert created.exit_code == 0, created.output
    made = json.loads(created.output)
    revoked = CliRunner().invoke(main, ["apikeys", "revoke", made["key_id"]])
    assert revoked.exit_code == 0, revoked.output

    events = [e for e in _events_after(engine, before) if e["action"].startswith("apikey.")]
    assert [(e["action"], e["details"]) for e in events] == [
        ("apikey.created", {"key_id": made["key_id"], "role": "admin"}),
        ("apikey.revoked", {"key_id": made["key_id"], "role": "admin"}),
    ]
    assert all(e["actor"].startswith("cli") for e in events), events
    assert made["key"] not in json.dumps(audit.events(engine=engine))  # the secret itself is never written


def test_a_prediction_records_the_key_that_asked_for_it(security_gateway):
    gw = security_gateway
    assert gw.put_route(champion_version=gw.versions["champion"], mode="single").status_code == 200
    key_id, key = _live_key(gw, "predict")
    request_id = f"which-key-{uuid.uuid4().hex[:12]}"

    resp = httpx.post(
        f"{gw.url}/models/{MODEL}/invocations",
        json={"dataframe_records": rows(2)},
        headers={"authorization": f"Bearer {key}", "x-request-id": request_id},
    )
    assert resp.status_code == 200, resp.text

    table = storage.predictions

    def logged() -> list:
        with storage.engine(gw.settings.db_url).connect() as conn:
            return conn.execute(sa.select(table).where(table.c.request_id == request_id)).all()

    found = wait_until(logged, timeout=20, what="the prediction logged")
    assert {row._mapping.get("key_id") for row in found} == {key_id}
