"""Data-subject requests: every logged row of one person, found through the keyed hashes, exported or erased.

The subject is named by the key the gateway routed their requests by (the routing key: a customer id, a phone
number). The log never holds that key, only keyed hashes of it, so the rows are found the same way they were
written: the routing-key hash of the key for every model in the log, and the key's pseudonym in any
pseudonymised input column (a customer id sent as a feature). A column classified `encrypt` cannot be searched
(its ciphertexts are randomised): a subject's rows are found by their routing key. Feedback goes with its
request; the KServe sink's unpaired events are found by the routing key they carry.

Neither the export's audit event nor the erasure's holds the key: they hold the subject's digest (an HMAC under
the routing secret), by which the same key can later be shown to have been erased. See docs/operations.md,
"Data-subject requests".
"""

from __future__ import annotations

import hashlib
import hmac
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa
from pydantic import BaseModel

from releasegate import audit, storage
from releasegate.contract import AuditAction
from releasegate.privacy import ENCRYPTED_PREFIX, ClassificationError, Protector, open_truths
from releasegate.serving import routing

if TYPE_CHECKING:
    from releasegate.settings import Settings


class RequestType(StrEnum):
    export = "export"
    erase = "erase"


class Erased(BaseModel):
    """What an erasure deleted (the subject by digest only)."""

    subject: str
    reference: str
    predictions: int
    feedback: int
    sink_events: int


def digest(key: str, settings: Settings) -> str:
    """The subject's name in the audit log: HMAC-SHA256 of the key under the routing secret (32 hex digits)."""
    return hmac.new(routing.routing_secret(settings), b"subject:" + key.encode(), hashlib.sha256).hexdigest()[:32]


def _matching(conn: sa.Connection, key: str, settings: Settings, protector: Protector) -> sa.ColumnElement[bool]:
    """The predictions rows of the subject: their routing-key hash, or the key's pseudonym among their inputs."""
    p = storage.predictions
    secret = routing.routing_secret(settings)
    models = list(conn.execute(sa.select(p.c.model).distinct()).scalars())
    by_key = [sa.and_(p.c.model == m, p.c.routing_key_hash == routing.routing_key_hash(m, key, secret)) for m in models]
    values: list[Any] = [key]
    if key.lstrip("-").isdigit():
        values.append(int(key))  # a numeric id sent as a number has its own token
    as_input = [p.c.inputs.contains(f'"{protector.pseudonym(v)}"') for v in values]  # tokens: hex, no wildcards
    return sa.or_(*by_key, *as_input)


def _label(text: str, protector: Protector | None) -> str:
    """A logged label (JSON) opened when `protector` is given and holds its key; else as stored."""
    if protector is None:
        return text
    try:
        return open_truths([text], protector)[0]
    except ClassificationError:  # a key no longer held: exported as stored, as the document's note says
        return text


def export(
    key: str,
    *,
    reference: str,
    decrypt: bool = True,
    actor: str = "cli",
    engine: sa.Engine | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """The subject's predictions (inputs decrypted where `decrypt` and the key is held), their feedback and any
    unpaired KServe events, as one JSON-ready document; audited as `subject.exported`."""
    from releasegate.settings import get_settings

    settings = settings or get_settings()
    eng = engine or storage.engine(settings.db_url)
    protector = Protector.of(settings)
    p, f, s = storage.predictions, storage.feedback, storage.sink_pairs
    with eng.connect() as conn:
        rows = conn.execute(
            sa.select(p).where(_matching(conn, key, settings, protector)).order_by(p.c.time, p.c.id)
        ).mappings()
        predictions = [_readable(dict(row), protector if decrypt else None) for row in rows]
        request_ids = sorted({row["request_id"] for row in predictions})
        feedback = [
            dict(row) | {"ground_truth": orjson.loads(_label(row["ground_truth"], protector if decrypt else None))}
            for row in conn.execute(sa.select(f).where(f.c.request_id.in_(request_ids)).order_by(f.c.time)).mappings()
        ]
        events = [
            {k: row[k] for k in ("request_id", "model", "version", "request_time", "request_body", "response_body")}
            for row in conn.execute(sa.select(s).where(s.c.routing_key == key)).mappings()
        ]
    document = {
        "subject": digest(key, settings),
        "reference": reference,
        "exported_at": time.time(),
        "note": "Values starting 'p:' are one-way tokens of the original values (pseudonymised); values "
        + (
            "starting 'e:' are encrypted under a data key this deployment no longer holds."
            if decrypt
            else "starting 'e:' are encrypted (exported without decryption)."
        ),
        "predictions": predictions,
        "feedback": feedback,
        "kserve_events": events,
    }
    counts = {"predictions": len(predictions), "feedback": len(feedback), "kserve_events": len(events)}
    audit.append(
        actor,
        AuditAction.subject_exported,
        details={"subject": document["subject"], "reference": reference, "decrypted": decrypt, **counts},
        engine=eng,
    )
    return document


def _readable(row: dict[str, Any], protector: Protector | None) -> dict[str, Any]:
    row.pop("key_id", None)  # which API key called: the deployment's, not the subject's
    for field in ("inputs", "outputs"):
        if row[field] is not None:
            row[field] = orjson.loads(row[field])
    if protector is not None and isinstance(row["inputs"], dict):
        for name, value in row["inputs"].items():
            if isinstance(value, str) and value.startswith(ENCRYPTED_PREFIX):
                try:
                    row["inputs"][name] = protector.decrypt(value)
                except KeyError:
                    pass  # a retired data key: the value stays as it is stored (the note says so)
    return row


def erase(
    key: str,
    *,
    reference: str,
    actor: str = "cli",
    batch: int = 1000,
    engine: sa.Engine | None = None,
    settings: Settings | None = None,
) -> Erased:
    """Delete every row of the subject (predictions, their feedback, unpaired KServe events), `batch` predictions
    per transaction so the log writer is never held long; audited as `subject.erased` with the counts."""
    from releasegate.settings import get_settings

    settings = settings or get_settings()
    eng = engine or storage.engine(settings.db_url)
    protector = Protector.of(settings)
    p, f, s = storage.predictions, storage.feedback, storage.sink_pairs
    done = Erased(subject=digest(key, settings), reference=reference, predictions=0, feedback=0, sink_events=0)
    while True:
        with eng.begin() as conn:
            found = conn.execute(
                sa.select(p.c.id, p.c.request_id).where(_matching(conn, key, settings, protector)).limit(batch)
            ).all()
            if not found:
                break
            request_ids = sorted({row.request_id for row in found})
            done.feedback += conn.execute(f.delete().where(f.c.request_id.in_(request_ids))).rowcount
            done.predictions += conn.execute(p.delete().where(p.c.id.in_([row.id for row in found]))).rowcount
    with eng.begin() as conn:
        done.sink_events = conn.execute(s.delete().where(s.c.routing_key == key)).rowcount
    audit.append(actor, AuditAction.subject_erased, details=done.model_dump(mode="json"), engine=eng)
    return done
