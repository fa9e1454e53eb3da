"""
# Model release

Takes one registered MLflow model version from the registry to production, or back out:

1. **open_release**: resolve the candidate (default: the `challenger` alias) and the
   `champion`, store the resolved policy; one release per model at a time.
2. **sign**: OpenSSF model-signing of the candidate's artifacts (or verification of an
   existing signature: a changed artifact is rejected), before anything loads the model.
3. **validate**: Great Expectations data contract on the candidate's holdout data, input
   schema compatibility with the champion, offline comparison (a paired test against the
   margins) run on the verified bytes.
4. **shadow**: the candidate gets a mirror of live traffic; the wait polls the always-valid
   analysis until it decides, without holding a worker slot.
5. **canary_N**: the policy's steps (e.g. 5 → 25 → 50 %), each with the same wait. The winner of an
   experiment (`experiment_id`) skips both where the policy says so (`experiment_winner`).
6. **decide**: branch to **promote** or **rollback**; where the policy requires it (or the
   evidence stays inconclusive under `inconclusive: approve`), first ask a person through
   Airflow's Human-in-the-loop (Required Actions), showing the verdicts: a rejection or no
   answer before the policy's timeout rolls back.
7. **watch**: where the policy sets `watch.seconds`, the promoted version is watched against what its
   own canary showed, with the previous champion kept loaded; a crossed limit rolls back ("after
   promotion"). **finish** stores the reports and the signed audit head in MLflow, and marks a run
   that errored as `failed`.

How the release ended, and an approval request, are sent to the notification targets
(`RELEASEGATE_NOTIFY_WEBHOOK`, Apprise URLs) as the run ends and as `decide` asks.

Every task is one call into `releasegate.pipeline`, so the CLI and the tests run the same code.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import Param, TriggerRule, chain, dag, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException

from releasegate.contract import NotificationEvent
from releasegate_airflow import xcom
from releasegate_airflow.kubernetes import ReadinessWaitOperator
from releasegate_airflow.notifier import RunNotifier
from releasegate_airflow.operators import (
    AnalysisWaitOperator,
    PostPromotionWatchOperator,
    ReleaseDecisionOperator,
    actor,
)

OPEN_RELEASE = "open_release"
VALIDATE = "validate"
SIGN = "sign"
SHADOW = "shadow"
DECIDE = "decide"
PROMOTE = "promote"
WATCH = "watch"
ROLLBACK = "rollback"
FINISH = "finish"


def _policies() -> list[str]:
    """Policies on the search path (RELEASEGATE_POLICIES_DIR's folders, then include/policies)."""
    from releasegate import policy

    return policy.available() or ["default"]


def _max_canary_steps() -> int:
    """The DAG has one canary group per step of the longest policy; shorter policies skip the rest."""
    from releasegate import policy

    steps = []
    for name in policy.available():
        try:
            steps.append(len(policy.load(name).canary.steps))
        except policy.PolicyError:  # a broken policy fails its own release, not the whole DAG
            continue
    return max(steps, default=3)


def _release_id(release: dict[str, Any]) -> str:
    from releasegate.results import Opened

    return xcom.pull(Opened, release).release_id


@dag(
    dag_id="model_release",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["releasegate", "release"],
    params={
        "model_name": Param(
            "churn", type="string", minLength=1, title="Model", description="Registered model name in MLflow."
        ),
        "version": Param(
            "",
            type="string",
            title="Version",
            description="Version number or alias to release; empty means the `challenger` alias.",
        ),
        "policy": Param(
            "default",
            type="string",
            enum=_policies(),
            title="Policy",
            description="Release policy: a file of RELEASEGATE_POLICIES_DIR or include/policies/.",
        ),
        "experiment_id": Param(
            "",
            type="string",
            title="Experiment",
            description="The concluded experiment this version won against the champion (model_experiment sets it). "
            "Under a policy with `experiment_winner.skip_shadow_and_canary`, its result stands for shadow and "
            "canary. Empty: none.",
        ),
    },
    default_args={"retries": 0},
    on_success_callback=RunNotifier(NotificationEvent.release_outcome),
    on_failure_callback=RunNotifier(NotificationEvent.release_outcome, failed=True),
)
def model_release():
    @task(task_id=OPEN_RELEASE)
    def open_release() -> dict[str, Any]:
        """Resolve candidate and champion, take the model's release lock, store the policy."""
        from releasegate import pipeline
        from releasegate_airflow.run_state import run_alive

        ctx = get_current_context()
        params = ctx["params"]
        return xcom.push(
            pipeline.start(
                params["model_name"],
                params["version"] or None,
                params["policy"],
                airflow_run_id=ctx["run_id"],
                actor=actor(),
                is_run_alive=run_alive,
                experiment_id=params.get("experiment_id") or None,
            )
        )

    @task(task_id=VALIDATE)
    def validate(release: dict[str, Any], signature: dict[str, Any]) -> dict[str, Any]:
        """Data contract, schema compatibility and offline comparison with the champion."""
        from releasegate import pipeline

        return xcom.push(pipeline.validate(_release_id(release), actor=actor()))

    @task(task_id=SIGN)
    def sign(release: dict[str, Any]) -> dict[str, Any]:
        """Sign the candidate, or verify the signature it already has, before anything loads it."""
        from releasegate import pipeline

        return xcom.push(pipeline.sign(_release_id(release), actor=actor()))

    @task
    def route(release: dict[str, Any], step: int) -> dict[str, Any]:
        """Point the stage's share of traffic at the candidate (step 0: the shadow)."""
        from releasegate import pipeline

        # No waiting here for a slow backend (kserve): the `ready` task defers on what it returns.
        return xcom.push(pipeline.route(_release_id(release), step, actor=actor(), wait_ready=False))

    def stage_group(group_id: str, step: int, release: Any) -> Any:
        @task_group(group_id=group_id)
        def stage_tasks() -> None:
            routed = route.override(task_id="route")(release, step)
            ready = ReadinessWaitOperator(
                task_id="ready",
                release=release,
                route=routed,
                doc_md="Wait, deferred, until the serving platform serves the new split.",
            )
            # A retry re-defers the same wait, and the verdict is recorded once (docs/architecture.md, "Deferral").
            AnalysisWaitOperator(
                task_id="wait", release=release, route=ready.output, retries=2, retry_delay=pendulum.duration(seconds=5)
            )

        return stage_tasks()

    @task(task_id=PROMOTE)
    def promote(release: dict[str, Any]) -> dict[str, Any]:
        """All traffic to the candidate; champion alias moves, previous kept for rollback."""
        from releasegate import pipeline

        return xcom.push(pipeline.promote(_release_id(release), actor=actor()))

    @task(task_id=ROLLBACK)
    def rollback(release: dict[str, Any]) -> dict[str, Any]:
        """All traffic back to the champion; the candidate is tagged with the reasons."""
        from releasegate import pipeline

        return xcom.push(pipeline.rollback(_release_id(release), actor=actor()))

    @task(task_id=FINISH, trigger_rule=TriggerRule.ALL_DONE)
    def finish(release: dict[str, Any] | None) -> dict[str, Any]:
        """Store the reports and the signed audit head; a release left open by a failure ends as failed."""
        from releasegate import pipeline
        from releasegate import release as releases

        if not release:  # open_release failed (e.g. another release of the model is running): the run fails
            raise AirflowFailException("no release was opened: see the open_release task for why")
        release_id = _release_id(release)
        was_open = not releases.get(release_id).terminal
        summary = pipeline.finish(release_id, actor=actor(), pipeline_failed=was_open)
        if was_open:
            raise AirflowFailException(f"release {release_id} failed: {summary.reasons[-1]}")
        return xcom.push(summary)

    release = open_release()
    signed = sign(release)
    validated = validate(release, signed)
    stages = [stage_group(SHADOW, 0, release)]
    stages += [stage_group(f"canary_{n}", n, release) for n in range(1, _max_canary_steps() + 1)]
    decision = ReleaseDecisionOperator(
        task_id=DECIDE,
        release=release,
        promote_task_id=PROMOTE,
        rollback_task_id=ROLLBACK,
        finish_task_id=FINISH,
        trigger_rule=TriggerRule.NONE_FAILED,
        doc_md="Promote, roll back, or (where the policy asks) wait for a person's "
        "approval: a rejection or no answer in time rolls back.",
    )
    promoted, rolled_back, finished = promote(release), rollback(release), finish(release)
    watched = PostPromotionWatchOperator(
        task_id=WATCH,
        release=release,
        doc_md="Deferred: the promoted version against its own canary for the policy's watch; "
        "a crossed limit rolls back to the previous champion.",
    )

    chain(validated, *stages, decision, [promoted, rolled_back], finished)
    chain(promoted, watched, finished)
    decision >> finished


model_release()
