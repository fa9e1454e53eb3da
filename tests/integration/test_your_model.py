"""Your own model through the real release: data and models made here, not the demo's churn.

One fleet (a module fixture) trains and registers the models, starts one gateway, and releases
them all concurrently, each release a real `model_release` run (`airflow dags test`) against a real
MLflow store (SQLite), with real traffic (`releasegate traffic --data`: the model's own rows
replayed, labels as feedback); the tests then read the outcomes from releasegate's database:

- `prices`, a regressor (k€), under a policy of the test's own folder (RELEASEGATE_POLICIES_DIR,
  a copy of examples/policies/regression.yaml with margins for its scale): a better candidate is
  promoted, then a worse one (trained on last year's market) is rolled back;
- `segments`, a three-class classifier, under the default policy: a better candidate is promoted;
- `segments-drop`: the candidate no longer declares a column the callers still send;
- `segments-optional`: the candidate declares an optional column (`required=False`) that no caller
  sends, and imputes it;
- `aa-0` … `aa-9`: A/A releases under the default policy, the champion's own model registered
  again. Re-registered rather than retrained with another seed: its answers are the champion's, so
  the true difference is exactly zero and any rollback is a false alarm of the statistics (a retrain
  differs by a little on some rows, and a rollback might then be a real, small, regression).

Why the data decides quickly: the default policy needs, at each canary step, 200 labelled requests
per arm and an always-valid lower bound of candidate − champion accuracy above −2 points. At a 5 %
step a request's contrast weighs 1/0.05, so the contrasts spread by about sqrt(p(1 − p) / 0.05): at
80 % accuracy, with the arms equal, the bound clears −2 points after ~120,000 requests (over ten
minutes at 150 requests/s, more than the step's 600 s window); at the 99.5 % of these well-separated
clusters after ~3,300, below the step's own minimum of 4,000 (in practice 4,000-18,000, as the
estimate wanders), and the later steps start from that evidence. So the A/A releases move through
every step on evidence, not at the end of the windows. The regressor's candidates are ~16 k€ better
and ~88 k€ worse in absolute error than the champion, against a 5 k€ margin: they decide on the
minimum samples.

The latency check compares the candidate's share of requests slower than 1.5 × (or + 5 ms over) the
champion's p99 with the champion's own share over that limit. The gateway runs at normal priority
and everything that merely drives it (the `dags test` processes, the traffic) niced, so that the
check times the models rather than the releases' imports.

Concurrency: releases of different models hold different release locks, so they run side by side,
each in its own Airflow home (a copy of the session's migrated SQLite database, so that no two
`dags test` processes write one SQLite file); releases of one model run in order. A model's traffic
runs while its releases do. RELEASEGATE_FLEET_CONCURRENCY (default 5) bounds the `dags test`
processes at once: each spends tens of seconds of CPU importing Airflow, MLflow, Great Expectations
and Evidently, and every one more lengthens the gateway's latency tail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from releasegate import registry, release
from releasegate.contract import Arm, Stage
from releasegate.release import State
from releasegate.verdict import Decision, MetricResult, Verdict
from tests import forkserver
from tests.integration import own_models as om
from tests.integration.conftest import Stack, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]

FLEET_CONCURRENCY = int(os.environ.get("RELEASEGATE_FLEET_CONCURRENCY", "5"))
# A deadline for a hang, not a speed target: on a machine found 2-3x slower (2026-12-01) the fleet needed ~25 min.
FLEET_DEADLINE_SECONDS = 2700
RELEASE_DEADLINE_SECONDS = 900
AA_MODELS = [f"aa-{i}" for i in range(10)]
RATE = 150  # requests/s of each model's traffic while its releases run


@dataclass
class Planned:
    """One release of the fleet: a candidate version of a model under a policy, and what became of it."""

    model: str
    role: str
    version: str
    policy: str
    log: Path | None = None
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    finished_line: str = ""
    outcome: release.Release | None = None

    @property
    def wall_seconds(self) -> float | None:
        return None if self.started is None or self.ended is None else self.ended - self.started


@dataclass
class Fleet:
    """The models, their releases in order per model, and the processes that serve and drive them."""

    stack: Stack
    champions: dict[str, str] = field(default_factory=dict)
    chains: dict[str, list[Planned]] = field(default_factory=dict)
    data: dict[str, tuple[Path, str]] = field(default_factory=dict)  # model -> (traffic rows, label column)
    timings: dict[str, float] = field(default_factory=dict)

    def planned(self, model: str, role: str) -> Planned:
        return next(p for p in self.chains[model] if p.role == role)

    def outcome(self, model: str, role: str) -> release.Release:
        planned = self.planned(model, role)
        assert planned.outcome is not None, (
            f"{model} {role} (v{planned.version}) left no release: exit "
            f"{planned.returncode}, {planned.finished_line or 'no DagRun line'}; "
            f"log {planned.log}:\n{_tail(planned.log)}"
        )
        return planned.outcome


def _tail(path: Path | None, chars: int = 3000) -> str:
    return path.read_text()[-chars:] if path and path.exists() else ""


# --- building the fleet ----------------------------------------------------------------------


def _register_models(fleet: Fleet, home: Path) -> None:
    """Train and register every model's champion and candidates; sign and tag the champions."""
    import pandas as pd

    from releasegate import signing

    segments_train, segments_holdout = om.segments(20_000, seed=1), om.segments(3_000, seed=2)
    features, label = om.SEGMENT_FEATURES, om.SEGMENT_LABEL
    x, y = segments_train[features], segments_train[label]
    holdout = segments_holdout[features + [label]]
    weak = om.segment_classifier(["a", "b", "d"]).fit(x, y)  # ignores c: 93 % accurate
    full = om.segment_classifier(om.SEGMENT_NUMERIC).fit(x, y)  # 99.5 %
    no_d = ["a", "b", "c", "region"]
    dropped = om.segment_classifier(["a", "b", "c"]).fit(segments_train[no_d], y)
    with_e = features + [om.OPTIONAL_FEATURE]
    optional = om.segment_classifier(om.SEGMENT_NUMERIC, [om.OPTIONAL_FEATURE]).fit(segments_train[with_e], y)

    prices_train, prices_holdout = om.prices(5_000, seed=1), om.prices(2_000, seed=2)
    stale_train, stale_holdout = om.prices(5_000, seed=3, concept="stale"), om.prices(2_000, seed=4, concept="stale")
    p_features, p_label = om.PRICE_FEATURES, om.PRICE_LABEL
    # The champion learnt from 16 months of sales, a quarter of them last year's (MAE ~26 k€ today); the
    # better candidate from this year's only (~10 k€); the worse one from last year's snapshot (~96 k€).
    mixed = pd.concat([prices_train.head(3_750), stale_train.head(1_250)])
    two_years = om.price_regressor().fit(mixed[p_features], mixed[p_label])
    this_year = om.price_regressor().fit(prices_train[p_features], prices_train[p_label])
    last_year = om.price_regressor().fit(stale_train[p_features], stale_train[p_label])

    def add(model: str, role: str, fitted, inputs, held, policy: str = "default", optional_columns=()) -> None:
        version = om.register(model, fitted, inputs, held, role=role, optional=list(optional_columns))
        if role == "champion":
            fleet.champions[model] = version
        else:
            fleet.chains.setdefault(model, []).append(Planned(model, role, version, policy))

    add("prices", "champion", two_years, mixed[p_features], prices_holdout)
    add("prices", "better", this_year, prices_train[p_features], prices_holdout, om.PRICE_POLICY)
    add("prices", "worse", last_year, stale_train[p_features], stale_holdout, om.PRICE_POLICY)
    add("segments", "champion", weak, x, holdout)
    add("segments", "better", full, x, holdout)
    add("segments-drop", "champion", full, x, holdout)
    # Its holdout is what callers send: d included, which the candidate's signature no longer declares.
    add("segments-drop", "drops_d", dropped, segments_train[no_d], holdout)
    add("segments-optional", "champion", full, x, holdout)
    # Its holdout has the new column where the candidate's own data has it; callers never send it.
    add(
        "segments-optional",
        "adds_e",
        optional,
        segments_train[with_e],
        segments_holdout[with_e + [label]],
        optional_columns=[om.OPTIONAL_FEATURE],
    )
    for model in AA_MODELS:
        add(model, "champion", full, x, holdout)
        add(model, "same", full, x, holdout)

    rows = home / "data"
    rows.mkdir()
    om.segments(20_000, seed=7)[features + [label]].to_parquet(rows / "segments.parquet")
    om.prices(20_000, seed=7).to_parquet(rows / "prices.parquet")
    for model, champion in fleet.champions.items():
        family = "prices" if model == "prices" else "segments"
        om.describe(model, suite=family, label=p_label if family == "prices" else label)
        registry.set_alias(model, "champion", champion)
        signing.sign_version(model, champion)
        fleet.data[model] = (rows / f"{family}.parquet", p_label if family == "prices" else label)


def _start_gateway(fleet: Fleet, settings, port: int) -> None:
    from releasegate.backends.local import LocalBackend

    gateway = fleet.stack.start("gateway", [sys.executable, "-m", "releasegate.serving", "--port", str(port)])
    deadline = time.time() + 120
    while True:
        assert gateway.poll() is None, fleet.stack.log("gateway")
        try:
            if httpx.get(f"{settings.gateway_url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "gateway did not start:\n" + fleet.stack.log("gateway")
        time.sleep(0.3)
    backend = LocalBackend(settings=settings)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda item: backend.set_route(*item), fleet.champions.items()))


def _airflow_homes(source: Path, home: Path, n: int) -> list[Path]:
    """`n` copies of the session's migrated Airflow home: one SQLite metadata database per concurrent `dags test`."""
    homes = []
    for slot in range(n):
        target = home / f"airflow-{slot}"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("logs", "*.log", "*.pid"))
        homes.append(target)
    return homes


# --- running the releases --------------------------------------------------------------------


class Runner:
    """Runs each model's releases in order, at most len(homes) `dags test` processes at once."""

    def __init__(self, fleet: Fleet, homes: list[Path], api_key: str):
        self.fleet, self.homes, self.api_key = fleet, homes, api_key

    def _start_traffic(self, model: str) -> None:
        rows, label = self.fleet.data[model]
        # A seed of its own per model: the A/A releases are repetitions, not one draw of rows and customers ten times.
        seed = 100 + list(self.fleet.chains).index(model)
        # Niced, as the releases are: the gateway is what is measured, its load generators only feed it.
        self.fleet.stack.start(
            f"traffic-{model}",
            [
                "nice",
                "-n",
                "5",
                sys.executable,
                "-m",
                "releasegate.cli",
                "traffic",
                "--model",
                model,
                "--data",
                str(rows),
                "--label",
                label,
                "--rps",
                str(RATE),
                "--duration",
                "0",
                "--feedback-delay",
                "1",
                "--seed",
                str(seed),
                "--api-key",
                self.api_key,
            ],
        )

    def _launch(self, planned: Planned, airflow_home: Path) -> forkserver.Process:
        env = dict(
            self.fleet.stack.env,
            AIRFLOW_HOME=str(airflow_home),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{airflow_home}/airflow.db",
        )
        conf = json.dumps({"model_name": planned.model, "version": planned.version, "policy": planned.policy})
        planned.log = self.fleet.stack.home / f"release-{planned.model}-v{planned.version}.log"
        planned.started = time.time()
        # Niced: a release is batch work beside the gateway it measures (on a shared two-core machine the
        # latency check would otherwise time the releases' imports, not the models).
        return forkserver.start(
            ["airflow", "dags", "test", "model_release", "-c", conf], env=env, output=planned.log, nice=10
        )

    def _collect(self, planned: Planned, proc: forkserver.Process) -> None:
        planned.ended, planned.returncode = time.time(), proc.returncode
        lines = [line for line in planned.log.read_text().splitlines() if "DagRun Finished" in line]
        planned.finished_line = lines[-1].strip() if lines else ""
        ours = [
            r
            for r in release.list_releases(planned.model)
            if r.candidate_version == planned.version and r.started_at >= planned.started - 1
        ]
        planned.outcome = ours[0] if ours else None

    def run(self, deadline_seconds: float) -> None:
        queue = sorted(self.fleet.chains, key=lambda m: -len(self.fleet.chains[m]))  # longest chains first
        free = list(self.homes)
        running: dict[str, tuple[Path, int, forkserver.Process]] = {}  # model -> (home, index, process)
        deadline = time.time() + deadline_seconds
        while queue or running:
            while free and queue:
                model, home = queue.pop(0), free.pop(0)
                self._start_traffic(model)
                running[model] = (home, 0, self._launch(self.fleet.chains[model][0], home))
            for model, (home, index, proc) in list(running.items()):
                planned = self.fleet.chains[model][index]
                if proc.poll() is None:
                    if time.time() - planned.started > RELEASE_DEADLINE_SECONDS:
                        os.killpg(proc.pid, signal.SIGKILL)  # collected at the next turn, with no outcome
                        proc.wait()
                    continue
                self._collect(planned, proc)
                if index + 1 < len(self.fleet.chains[model]):
                    running[model] = (home, index + 1, self._launch(self.fleet.chains[model][index + 1], home))
                else:
                    del running[model]
                    self.fleet.stack.stop(f"traffic-{model}")
                    free.append(home)
            if time.time() > deadline:
                for _, _, proc in running.values():
                    os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"releases still running after {deadline_seconds} s: {sorted(running)}; queued: {queue}")
            time.sleep(0.5)


def summary(fleet: Fleet) -> str:
    """One line per release (and one per stage): outcome, durations, the reason."""
    lines = [
        f"fleet: {fleet.timings.get('setup', 0):.0f} s set-up, {fleet.timings.get('releases', 0):.0f} s "
        f"releases, {FLEET_CONCURRENCY} at once"
    ]
    for chain in fleet.chains.values():
        for p in chain:
            rel = p.outcome
            state = rel.state.value if rel else f"none (exit {p.returncode})"
            duration = f"{rel.ended_at - rel.started_at:.0f}" if rel and rel.ended_at else "?"
            lines.append(
                f"{p.model:18s} v{p.version:3s} {p.role:8s} {state:12s} process {p.wall_seconds or 0:5.0f} s,"
                f" release {duration} s: {(rel.reasons[-1] if rel and rel.reasons else '')[:400]}"
            )
            for v in rel.verdicts if rel else []:
                window = v.window
                lines.append(
                    f"    {window.stage!s:16s} {v.decision.value:9s} {window.end - window.start:5.0f} s "
                    f"{sum(a.requests for a in v.samples.values()):7d} requests  {v.reason[:200]}"
                )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, airflow_env):
    """Every model registered and its champion served; every release run; the outcomes read back."""
    from tests.conftest import _point_env_at

    started = time.time()
    home = tmp_path_factory.mktemp("fleet")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in airflow_env.items():
            if key.startswith("AIRFLOW") or key in ("PYTHONPATH", "PATH"):
                mp.setenv(key, value)
        _point_env_at(home, mp)
        mp.setenv("RELEASEGATE_GATEWAY_URL", f"http://127.0.0.1:{port}")
        # The user's own folders, searched before include/policies and include/expectations.
        mp.setenv("RELEASEGATE_POLICIES_DIR", str(home / "policies"))
        mp.setenv("RELEASEGATE_EXPECTATIONS_DIR", str(home / "expectations"))
        om.write_price_policy(home / "policies")
        om.write_suites(home / "expectations")
        from releasegate import signing, storage
        from releasegate.settings import get_settings

        settings = get_settings()
        signing.ensure_keys(settings)
        fleet = Fleet(Stack(home, dict(os.environ)))
        try:
            _register_models(fleet, home)
            _start_gateway(fleet, settings, port)
            homes = _airflow_homes(Path(airflow_env["AIRFLOW_HOME"]), home, FLEET_CONCURRENCY)
            fleet.timings["setup"] = time.time() - started
            Runner(fleet, homes, settings.admin_api_key).run(FLEET_DEADLINE_SECONDS)
            fleet.timings["releases"] = time.time() - started - fleet.timings["setup"]
            (home / "summary.txt").write_text(summary(fleet))
            print("\n" + summary(fleet), flush=True)
            yield fleet
        finally:
            for name in list(fleet.stack.procs):
                fleet.stack.stop(name)
            storage.dispose_all()


# --- the behaviours --------------------------------------------------------------------------


def _stages(rel: release.Release) -> list[Stage]:
    return [v.window.stage for v in rel.verdicts]


def _assert_promoted_through_every_step(rel: release.Release) -> None:
    assert rel.state is State.promoted, rel.reasons
    decisions = [v.decision for v in rel.verdicts]
    assert _stages(rel) == [Stage.shadow(), Stage.canary(1, 5), Stage.canary(2, 25), Stage.canary(3, 50)], _stages(rel)
    assert decisions[0] is decisions[-1] is Decision.promote, decisions
    assert set(decisions[1:-1]) <= {Decision.promote, Decision.continue_}, decisions


def _metric(verdict: Verdict, name: str) -> MetricResult:
    return next(m for m in verdict.metrics if m.name == name)


def test_better_regressor_is_promoted_under_a_policy_from_the_users_own_folder(fleet):
    rel = fleet.outcome("prices", "better")
    assert rel.policy["name"] == om.PRICE_POLICY and rel.policy["primary"]["margin"] == 5.0
    _assert_promoted_through_every_step(rel)
    shadow = rel.verdicts[0]
    assert [m.name for m in shadow.metrics] == ["error_rate", "latency_p99", "absolute_error", "agreement"]
    error = _metric(shadow, "absolute_error")
    assert error.upper < 0, error  # the candidate's error in k€ is clearly the smaller
    assert "absolute error" in rel.reasons[-1]


def test_worse_regressor_is_rolled_back_in_shadow(fleet):
    rel = fleet.outcome("prices", "worse")
    better = fleet.planned("prices", "better").version
    assert rel.champion_version == better  # released against the champion the first release promoted
    assert rel.state is State.rolled_back, rel.reasons
    last = rel.verdicts[-1]
    assert last.window.stage.is_shadow and last.decision is Decision.rollback, last.reason
    # Whichever check shows it first: the error in k€ (once labels arrive) or the answers' agreement within
    # 60 k€ (at once, no labels needed); the error is far above the policy's 5 k€ margin either way.
    failed = {m.name for m in last.metrics if m.passed is False}
    assert failed & {"absolute_error", "agreement"}, last.reason
    assert rel.reasons[-1].startswith(
        ("rollback: absolute error of candidate − champion is +", "rollback: the arms agree on")
    ), rel.reasons[-1]
    error = _metric(last, "absolute_error")
    assert error.estimate is None or error.estimate > 5.0, error
    assert registry.get_alias("prices", "champion") == better


def test_better_three_class_classifier_is_promoted_under_the_default_policy(fleet):
    rel = fleet.outcome("segments", "better")
    assert rel.policy["name"] == "default"
    _assert_promoted_through_every_step(rel)
    accuracy = _metric(rel.verdicts[0], "accuracy")
    assert accuracy.lower > 0, accuracy  # in shadow, on the same requests, clearly more accurate
    # The promotion cites the gain it rests on: accuracy up, with its lower bound above zero.
    assert re.search(r"accuracy \+\d\.\d{3} \(\+\d", rel.reasons[-1]), rel.reasons[-1]
    # The default policy's slices: every region judged on its own, under its token (text is pseudonymised in the
    # log by default; the same region always has the same token).
    from releasegate.privacy import Protector
    from releasegate.settings import get_settings

    regions = {s.value for s in rel.verdicts[0].slices if s.feature == "region"}
    assert regions == {Protector.of(get_settings()).pseudonym(r) for r in om.REGIONS}
    assert registry.get_alias("segments", "champion") == fleet.planned("segments", "better").version


def _candidate_errors(rel: release.Release) -> int:
    return sum(v.samples[Arm.candidate].errors for v in rel.verdicts)


def test_candidate_that_drops_a_column_callers_still_send_is_released(fleet):
    rel = fleet.outcome("segments-drop", "drops_d")
    _assert_promoted_through_every_step(rel)
    assert _candidate_errors(rel) == 0  # the gateway gave it only the columns it declares
    import pandas as pd
    from mlflow.models import get_model_info

    inputs = get_model_info(f"models:/segments-drop/{rel.candidate_version}").signature.inputs.input_names()
    assert "d" not in inputs and "d" in pd.read_parquet(fleet.data["segments-drop"][0]).columns


def test_candidate_with_an_optional_column_nobody_sends_is_released(fleet):
    rel = fleet.outcome("segments-optional", "adds_e")
    _assert_promoted_through_every_step(rel)
    assert _candidate_errors(rel) == 0  # every request answered although `e` never arrives
    from mlflow.models import get_model_info

    spec = next(
        s
        for s in get_model_info(f"models:/segments-optional/{rel.candidate_version}").signature.inputs.inputs
        if s.name == om.OPTIONAL_FEATURE
    )
    assert spec.required is False


def test_aa_releases_under_the_default_policy_are_promoted_with_at_most_one_false_alarm(fleet):
    outcomes = [fleet.outcome(model, "same") for model in AA_MODELS]
    assert all(rel.policy["name"] == "default" for rel in outcomes)
    # A false alarm ends a release rejected, rolled back or invalid (SRM); a failed run is no alarm but a fault.
    assert all(rel.state is not State.failed for rel in outcomes), {
        rel.model: (rel.state.value, rel.reasons[-1:]) for rel in outcomes
    }
    alarms = [(rel.model, rel.state.value, rel.reasons[-1]) for rel in outcomes if rel.state is not State.promoted]
    assert len(alarms) <= 1, alarms
    for rel in outcomes:
        if rel.state is State.promoted:
            _assert_promoted_through_every_step(rel)
