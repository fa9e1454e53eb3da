"""`releasegate demo`: the whole release story on one machine, with progress and a summary.

Starts MLflow's store (SQLite), the gateway and traffic on loopback, registers a champion, a
better and a worse candidate, runs a short A/B/n experiment of all three (the `model_experiment`
DAG, design `quick`) whose winner becomes the challenger, runs the real `model_release` DAG for
both candidates under the default policy, prints a summary table, and stops everything it started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import httpx

from releasegate.contract import AuditAction, Stage
from releasegate.verdict import Verdict

if TYPE_CHECKING:
    from releasegate.audit import ChainReport
    from releasegate.release import Release

REPO = Path(__file__).resolve().parents[3]
MODEL = "churn"


class ReleaseRun(TypedDict):
    """One candidate's release as the demo ran it: the release, its wall time and the DAG run's log."""

    label: str
    release: Release
    wall: float
    log: Path
    returncode: int | None


class Demo:
    def __init__(self, workdir: Path, port: int):
        self.workdir = workdir.resolve()
        self.port = port
        self.t0 = time.time()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env: dict[str, str] = {}
        self.seen: set[int] = set()  # audit events already printed, across releases

    # --- output -------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {text}", flush=True)

    def step(self, text: str) -> None:
        print(f"\n[{time.time() - self.t0:6.1f}s] == {text}", flush=True)

    # --- set-up -------------------------------------------------------------------------
    def environment(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        home = self.workdir
        self.env = {
            "RELEASEGATE_HOME": str(home),
            "RELEASEGATE_DB_URL": f"sqlite:///{home}/releasegate.db",
            "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
            "RELEASEGATE_MLFLOW_ARTIFACTS": str(home / "mlartifacts"),
            "RELEASEGATE_ADMIN_KEY": "rg-demo-admin-" + secrets.token_urlsafe(24),
            "RELEASEGATE_GATEWAY_URL": f"http://127.0.0.1:{self.port}",
            "AIRFLOW_HOME": str(home / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "plugins"), os.environ.get("PYTHONPATH")])),
            "GIT_PYTHON_REFRESH": "quiet",
        }
        os.environ.update(self.env)
        bin_dir = str(Path(sys.executable).parent)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        self.env["PATH"] = os.environ["PATH"]

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_healthy(self, url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}; see {self.workdir / 'gateway.log'}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"gateway did not become healthy in {timeout:.0f}s")

    # --- the story ----------------------------------------------------------------------
    def release(self, version: str, label: str) -> ReleaseRun:
        from releasegate import release as releases

        self.step(f"release of the {label} candidate: {MODEL} v{version} (Airflow DAG model_release)")
        conf = json.dumps({"model_name": MODEL, "version": version, "policy": "default"})
        log_path = self.workdir / f"airflow-release-v{version}.log"
        started = time.time()
        returncode = self.dag_run("model_release", conf, log_path)
        rel = next((r for r in releases.list_releases(MODEL) if r.candidate_version == version), None)
        if rel is None:
            raise RuntimeError(f"the DAG run did not open a release; see {log_path}")
        return {
            "label": label,
            "release": rel,
            "wall": time.time() - started,
            "log": log_path,
            "returncode": returncode,
        }

    def experiment(self, arms: list[str]) -> Release:
        """A 3-arm experiment (the champion and `arms`, a third of the traffic each) run to its result."""
        from releasegate import experiments
        from releasegate import release as releases

        self.step(f"experiment: {MODEL}'s champion against v{', v'.join(arms)} (Airflow DAG model_experiment)")
        # release_winner off: without a scheduler the triggered run would only queue; the demo releases it next.
        conf: dict[str, Any] = {"model_name": MODEL, "arms": ",".join(arms), "weights": "33,33", "design": "quick"}
        conf["release_winner"] = False
        self.dag_run("model_experiment", json.dumps(conf), self.workdir / "airflow-experiment.log")
        found = next((r for r in releases.list_releases(MODEL) if experiments.is_experiment(r)), None)
        if found is None:
            raise RuntimeError(f"the DAG run did not open an experiment; see {self.workdir / 'airflow-experiment.log'}")
        return found

    def dag_run(self, dag_id: str, conf: str, log_path: Path) -> int | None:
        """`airflow dags test` of one DAG run, printing its audit events as they happen."""
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "airflow"), "dags", "test", dag_id, "-c", conf],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
                start_new_session=True,
            )
            self.procs.append(proc)
            last_status = 0.0
            while proc.poll() is None:
                self.print_new_events(self.seen)
                if time.time() - last_status > 15:
                    last_status = time.time()
                    self.say(f"   … {self.traffic_status()}")
                time.sleep(1)
            self.print_new_events(self.seen)
        return proc.returncode

    def print_new_events(self, seen: set[int]) -> None:
        from releasegate import audit

        for event in audit.events(model=MODEL):
            if event["seq"] in seen:
                continue
            seen.add(event["seq"])
            details, action = event["details"], event["action"]
            if action == AuditAction.route and details.get("via"):
                continue  # the gateway's own record of the same change the pipeline records
            if action == AuditAction.verdict:
                verdict = Verdict.model_validate(details)
                text = f"verdict {verdict.window.stage} {verdict.decision.value}: {verdict.reason}"
            elif action == AuditAction.route and details.get("arms"):
                arms = ", ".join(
                    f"v{a['version']} {'stopped' if a.get('stopped') else str(a['weight']) + ' %'}"
                    for a in details["arms"]
                )
                text = f"traffic: experiment, the champion and {arms}"
            elif action == AuditAction.route:
                text = f"traffic: {details.get('mode')} (candidate weight {details.get('candidate_weight')} %)"
            elif action == AuditAction.experiment_arm_stopped:
                text = f"arm v{event['version']} stopped (its traffic back to the champion): {details.get('reason')}"
            elif action == AuditAction.experiment_decided:
                text = f"experiment decided: {_experiment_numbers(details['result'])}"
            elif action == AuditAction.release_opened:
                text = f"release {event['release_id']} opened (champion v{details.get('champion')}, policy {details.get('policy')})"
            elif action.startswith("release."):
                text = f"state {details.get('from')} → {details.get('to')}" + (
                    f": {details['reason']}" if details.get("reason") else ""
                )
            elif action == AuditAction.drift:
                inputs = details.get("input_drift")
                text = (
                    f"Evidently reports for {Stage.model_validate(details['stage'])}: "
                    + (
                        f"{inputs['drifted_share']:.0%} of input columns drifted {inputs['drifted_columns']} "
                        f"on {inputs['rows_current']:,} requests"
                        if inputs
                        else "no candidate traffic"
                    )
                    + (f"; error: {details['error']}" if details.get("error") else "")
                )
            elif action == AuditAction.incident_opened:
                text = f"incident #{details['incident']} opened ({details['severity']}): {details['title']}"
            elif action == AuditAction.validation:
                text = "validation " + (
                    "passed" if details.get("passed") else "failed: " + "; ".join(details.get("reasons", []))
                )
            else:
                text = event["action"]
            self.say(f"   {text}")

    def traffic_status(self) -> str:
        path = self.workdir / "traffic.log"
        lines = path.read_text().strip().splitlines() if path.exists() else []
        return lines[-1] if lines else "traffic starting"


def _experiment_numbers(result: dict[str, Any]) -> str:
    """The result's reason, then per arm its status, requests and the deciding metric's bounds."""
    parts = [result["reason"]]
    for arm in result["arms"]:
        deciding = next((m for m in arm["metrics"] if m["role"] == "decide"), None)
        bounds = ""
        if deciding and deciding["difference"] is not None and deciding["lower"] is not None:
            bounds = (
                f", {deciding['name']} {deciding['difference']:+.4f} "
                f"[{deciding['lower']:+.4f}, {deciding['upper']:+.4f}] against the champion"
            )
        parts.append(f"v{arm['arm']} {arm['status']} on {arm['requests']:,} requests{bounds}")
    return "; ".join(parts)


def _numbers(verdict: Verdict) -> str:
    parts = []
    for m in verdict.metrics:
        if m.estimate is None:
            continue
        bounds = (
            f"[{m.lower:+.3f}, {m.upper:+.3f}]" if m.lower is not None and m.upper is not None else "(not bounded yet)"
        )
        parts.append(f"{m.name} {m.estimate:+.3f} {bounds}")
    return "; ".join(parts)


def _summary(demo: Demo, experiment: Release, results: list[ReleaseRun], audit_report: ChainReport) -> str:
    from releasegate import audit, pipeline

    lines = ["", "=" * 100, "SUMMARY", "=" * 100]
    decided = audit.events(release_id=experiment.release_id, action=AuditAction.experiment_decided)
    duration = f"{(experiment.ended_at or time.time()) - experiment.started_at:.0f}s"
    lines.append(
        f"experiment {experiment.release_id}: v{experiment.champion_version} (champion) against "
        f"v{experiment.candidate_version.replace(',', ', v')}: {experiment.state.value} in {duration}"
    )
    if decided:
        lines.append(f"   {_experiment_numbers(decided[-1]['details']['result'])}")
    lines.append("")
    header = f"{'release':<18}{'candidate':<14}{'outcome':<13}{'duration':>9}  reasons"
    lines += [header, "-" * 100]
    for res in results:
        rel = res["release"]
        duration = f"{(rel.ended_at or time.time()) - rel.started_at:.0f}s"
        lines.append(
            f"{rel.release_id:<18}{'v' + rel.candidate_version + ' (' + res['label'] + ')':<14}"
            f"{rel.state.value:<13}{duration:>9}  {rel.reasons[-1] if rel.reasons else ''}"
        )
        for verdict in rel.verdicts:
            lines.append(
                f"{'':<18}  {verdict.window.stage!s:<16} {verdict.decision.value:<9} "
                f"{sum(a.requests for a in verdict.samples.values()):>6} requests  {_numbers(verdict)}"
            )
        try:
            lines.append(f"{'':<18}  reports: {pipeline.report_uri(rel)}")
        except Exception as err:  # the summary must still print
            lines.append(f"{'':<18}  reports: unavailable ({err})")
    from releasegate import incidents

    for incident in incidents.list_incidents(model=MODEL):
        lines.append(
            f"incident #{incident.id} ({incident.severity.value}, {incident.state.value}): {incident.title[:120]}"
            f"   see: releasegate incidents show {incident.id}"
        )
    lines += [
        "-" * 100,
        f"reports (MLflow artifacts): {demo.workdir / 'mlartifacts'}   MLflow store: {demo.workdir / 'mlflow.db'}",
        f"audit log: {demo.workdir / 'releasegate.db'} (table audit): {audit_report.message}",
        f"logs: {demo.workdir}/*.log   total wall time: {time.time() - demo.t0:.0f}s",
    ]
    return "\n".join(lines)


def main(workdir: Path, port: int) -> int:
    demo = Demo(workdir, port)
    try:
        return _story(demo)
    finally:
        demo.stop_all()
        print("stopped the gateway and the traffic; nothing left running", flush=True)


def _story(demo: Demo) -> int:
    demo.step(f"set-up in {demo.workdir}")
    demo.environment()
    from releasegate import audit, policy, signing
    from releasegate.settings import get_settings

    settings = get_settings()
    pol = policy.load("default")
    demo.say(f"policy: {pol.name} (digest {pol.digest[:12]}), the one every release gets by default:")
    policy_path = policy.find("default", settings.policy_dirs)
    assert policy_path is not None  # policy.load just read it from there
    print(policy_path.read_text(), flush=True)
    signing.ensure_keys(settings)
    demo.say(f"signing keys: {settings.signing_key} (+ .pub, trusted)")
    from releasegate import storage

    storage.engine()  # create releasegate's tables now, before the gateway and Airflow both reach for them
    airflow = demo.start("airflow-db", [str(Path(sys.executable).parent / "airflow"), "db", "migrate"])

    demo.step("registering the demo models in MLflow (champion, better candidate, worse candidate)")
    from releasegate.demo import models

    versions = models.register_demo_models(settings, model_name=MODEL)
    demo.say(f"registered: {versions}")
    signing.sign_version(MODEL, versions["champion"])
    demo.say(f"champion v{versions['champion']} signed (it was released before the demo starts)")

    demo.step(f"starting the gateway on 127.0.0.1:{demo.port}")
    gateway = demo.start("gateway", [sys.executable, "-m", "releasegate.serving", "--port", str(demo.port)])
    demo.wait_healthy(f"{settings.gateway_url}/healthz", gateway)
    from releasegate.backends.local import LocalBackend

    LocalBackend(settings=settings).set_route(MODEL, versions["champion"])
    demo.say(f"serving {MODEL} v{versions['champion']} (signature verified at load)")

    demo.step("sending traffic (300 requests/s, labels 1 s later)")
    demo.start(
        "traffic",
        [
            sys.executable,
            "-m",
            "releasegate.cli",
            "traffic",
            "--model",
            MODEL,
            "--rps",
            "300",
            "--duration",
            "0",
            "--feedback-delay",
            "1",
        ],
    )
    if airflow.wait() != 0:
        raise RuntimeError(f"airflow db migrate failed; see {demo.workdir / 'airflow-db.log'}")
    time.sleep(3)
    demo.say(demo.traffic_status())

    from releasegate import registry

    experiment = demo.experiment([versions["good"], versions["bad"]])
    winner = registry.get_alias(MODEL, "challenger")
    demo.say(f"experiment {experiment.state.value}; the challenger (what model_release takes) is now v{winner}")
    results = [demo.release(versions["good"], "better"), demo.release(versions["bad"], "worse")]
    report = audit.verify()
    print(_summary(demo, experiment, results, report), flush=True)
    good, bad = results[0]["release"].state.value, results[1]["release"].state.value
    ok = good == "promoted" and bad == "rolled_back" and report.ok and winner == versions["good"]
    print(
        (
            "DEMO OK: the experiment found the better candidate, which was promoted; the worse one rolled back"
            if ok
            else f"DEMO FAILED: experiment winner v{winner}, better candidate {good}, worse candidate {bad}"
        ),
        flush=True,
    )
    return 0 if ok else 1
