"""
# Data-subject request

Answers a person's request about their data (UAE PDPL Art. 13-15, GDPR Art. 15 and 17), from the
trigger form:

1. **fulfil**: finds every logged row of the subject through the keyed hashes of their routing key
   (the key their requests were routed by) and the key's pseudonym in pseudonymised input columns;
   then either **exports** them (predictions with encrypted columns decrypted, their feedback,
   unpaired KServe events) to a JSON file readable only by the deployment's user, or **erases**
   them. The audit log gets `subject.exported` or `subject.erased` with the counts, the reference
   and a keyed digest of the key, never the key.

Airflow keeps a run's form values (its `conf`) with the run: to keep the key out of Airflow's
database, use `releasegate subject export|erase` instead, or delete the run afterwards.
"""

from __future__ import annotations

import re
from typing import Any

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from releasegate_airflow.operators import actor

FULFIL = "fulfil"


@dag(
    dag_id="data_subject_request",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["releasegate", "privacy"],
    params={
        "subject_key": Param(
            type="string",
            minLength=1,
            title="Subject's routing key",
            description="The key the person's requests were routed by (a customer id, a phone number).",
        ),
        "request_type": Param(
            "export",
            type="string",
            enum=["export", "erase"],
            title="Request",
            description="export: every logged row of the subject to a file; erase: delete them all.",
        ),
        "reference": Param(
            type="string",
            minLength=1,
            title="Reference",
            description="The request's ticket or reference, kept in the audit log.",
        ),
        "decrypt": Param(
            True,
            type="boolean",
            title="Decrypt encrypted columns (export)",
            description="The subject may see their own values; leave on unless told otherwise.",
        ),
    },
    default_args={"retries": 0},
)
def data_subject_request():
    @task(task_id=FULFIL)
    def fulfil() -> dict[str, Any]:
        """Export or erase the subject's rows; the counts (never the rows or the key) are the task's result."""
        import json

        from releasegate import subjects
        from releasegate.settings import get_settings

        params = get_current_context()["params"]
        key, reference = params["subject_key"], params["reference"]
        if params["request_type"] == subjects.RequestType.erase:
            return subjects.erase(key, reference=reference, actor=actor()).model_dump(mode="json")
        document = subjects.export(key, reference=reference, decrypt=bool(params["decrypt"]), actor=actor())
        folder = get_settings().home / "exports"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', reference)[:80]}-{document['subject'][:12]}.json"
        path.touch(mode=0o600)
        path.write_text(json.dumps(document, indent=2, default=str))
        return {
            "subject": document["subject"],
            "reference": reference,
            "file": str(path),
            "predictions": len(document["predictions"]),
            "feedback": len(document["feedback"]),
            "kserve_events": len(document["kserve_events"]),
        }

    fulfil()


data_subject_request()
