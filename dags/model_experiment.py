"""
# Model experiment (A/B/n)

Which of several registered versions of a model is best for the business, at what cost: the
champion (the control) and 1-5 arms share live traffic, judged on the metrics of an experiment
design (include/policies/experiments/, or RELEASEGATE_POLICIES_DIR's `experiments/` folders).

1. **open_experiment**: resolve the arms and the champion; take the model's release lock (no
   release and no other experiment moves its traffic meanwhile); plan the deciding metric at the
   champion's baseline and traffic over the last hour (the task's log and its XCom `plan`: the
   requests and hours of the fixed-horizon and the sequential designs at the form's weights).
2. **sign_arms**: OpenSSF model-signing of every arm (or verification of its signature).
3. **start**: the gateway routes the arms their weights, sticky by routing key, salted by the
   experiment's id; the champion takes the rest.
4. **run**: every poll, each arm against the control with always-valid bounds at α/(k−1); an arm
   a guard metric shows clearly worse is stopped (its traffic back to the control). Ends when the
   deciding metric names a winner, every arm is stopped or futile, the split is broken (SRM), or
   the duration is up.
5. **conclude**: the champion alone again; the result is an audit event and an MLflow artifact
   (JSON and a chart); the winner becomes the `challenger` alias.
6. **release_winner**: where there is a winner and the form asks, `model_release` is triggered
   for it under the design's release policy (its own shadow and canary follow).

`releasegate plan` computes the sample size and duration for the design's deciding metric.
"""

from __future__ import annotations

import logging
from typing import Any

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, TriggerRule, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from releasegate_airflow.operators import ExperimentWaitOperator, actor

OPEN = "open_experiment"
SIGN = "sign_arms"
START = "start"
RUN = "run"
CONCLUDE = "conclude"
RELEASE_WINNER = "release_winner"


def _designs() -> list[str]:
    from releasegate import policy

    return policy.experiment_designs() or ["default"]


def _experiment_id(opened: dict[str, Any]) -> str:
    return str(opened["experiment_id"])


@dag(
    dag_id="model_experiment",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["releasegate", "experiment"],
    params={
        "model_name": Param(
            "churn", type="string", minLength=1, title="Model", description="Registered model name in MLflow."
        ),
        "arms": Param(
            "",
            type="string",
            minLength=1,
            title="Arms",
            description="Versions or aliases besides the champion (the control), comma separated: 1 to 5.",
        ),
        "weights": Param(
            "",
            type="string",
            title="Weights",
            description="Each arm's percent of the traffic, comma separated (the champion gets the rest); "
            "empty: an equal share for every arm and the champion.",
        ),
        "design": Param(
            "default",
            type="string",
            enum=_designs(),
            title="Design",
            description="The experiment design: its metrics (deciding and guarding), alpha, duration and sample "
            "size. `releasegate plan` computes a sample size for its deciding metric at the model's traffic.",
        ),
        "max_seconds": Param(
            0, type="integer", minimum=0, title="Duration (s)", description="0: the design's max_seconds."
        ),
        "sample_size": Param(
            0,
            type="integer",
            minimum=0,
            title="Sample size",
            description="Requests (all arms) the bounds are planned for; 0: the design's.",
        ),
        "release_winner": Param(
            True, type="boolean", title="Release the winner", description="Trigger model_release for the winner."
        ),
    },
    default_args={"retries": 0},
)
def model_experiment():
    @task(task_id=OPEN)
    def open_experiment() -> dict[str, Any]:
        """Resolve arms and champion, take the model's release lock, store the design."""
        from releasegate import experiments, pipeline
        from releasegate_airflow.run_state import run_alive

        ctx = get_current_context()
        params = ctx["params"]
        opened = experiments.open_experiment(
            params["model_name"],
            experiments.parse_arms(params["arms"], params["weights"]),
            params["design"],
            airflow_run_id=ctx["run_id"],
            actor=actor(),
            is_run_alive=run_alive,
            close_stale=pipeline.close_stale,
            sample_size=int(params["sample_size"] or 0) or None,
            max_seconds=float(params["max_seconds"] or 0) or None,
        )
        if opened.plan is not None:
            logging.getLogger("releasegate.experiments").info("%s; plan: %s", opened.describe(), opened.plan.note)
        return opened.model_dump(mode="json")

    @task(task_id=SIGN)
    def sign_arms(opened: dict[str, Any]) -> list[str]:
        """Sign every arm, or verify the signature it has, before anything loads it."""
        from releasegate import experiments

        return experiments.sign_arms(_experiment_id(opened), actor=actor())

    @task(task_id=START)
    def start(opened: dict[str, Any], signed: list[str]) -> dict[str, Any]:
        """Route the arms their weights (sticky, salted by the experiment), the champion the rest."""
        from releasegate import experiments

        return experiments.start(_experiment_id(opened), actor=actor()).model_dump(mode="json")

    @task(task_id=CONCLUDE, trigger_rule=TriggerRule.ALL_DONE)
    def conclude(opened: dict[str, Any] | None, last: dict[str, Any] | None) -> dict[str, Any]:
        """The champion alone again; the result audited and stored in MLflow; the winner made the challenger."""
        from releasegate import experiments

        if not opened:
            raise AirflowFailException("no experiment was opened: see the open_experiment task for why")
        experiment_id = _experiment_id(opened)
        if not last:
            experiments.fail(experiment_id, "the experiment's run failed before its result", actor=actor())
            raise AirflowFailException(f"experiment {experiment_id} failed before its result")
        look = experiments.Look.model_validate(last)
        return experiments.conclude(experiment_id, look, actor=actor()).model_dump(mode="json")

    @task(task_id="winner_conf")
    def winner_conf(concluded: dict[str, Any]) -> dict[str, Any]:
        """What model_release gets: the winner under the design's release policy (skipped: no winner)."""
        params = get_current_context()["params"]
        if not concluded.get("winner"):
            raise AirflowSkipException(f"no winner: {concluded.get('reason')}")
        if not params["release_winner"]:
            raise AirflowSkipException(f"v{concluded['winner']} won; the form asked not to release it")
        return {
            "model_name": concluded["model"],
            "version": concluded["winner"],
            "policy": concluded["release_policy"],
            "experiment_id": concluded["experiment_id"],
        }

    opened = open_experiment()
    started = start(opened, sign_arms(opened))
    last = ExperimentWaitOperator(
        task_id=RUN,
        started=started,
        doc_md="Deferred: looks at the evidence every poll, stops arms a guard shows worse, ends on a result.",
    )
    concluded = conclude(opened, last.output)
    conf = winner_conf(concluded)
    # `conf` is an XComArg: the trigger waits on winner_conf, and is skipped with it when there is no winner.
    TriggerDagRunOperator(
        task_id=RELEASE_WINNER,
        trigger_dag_id="model_release",
        conf=conf,
        doc_md="The winner's release: model_release under the design's release policy.",
    )


model_experiment()
