"""docker-compose.yaml runs what the system test runs; Prometheus and Grafana query metrics the gateway exports.

No Docker engine runs here, so the compose file is parsed and checked against `SERVICES` in
tests/system/stack.py (the processes the system test really starts), and the monitoring files
against the gateway's own metrics registry (promtool runs the alert rules in tests/integration).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.system.stack import SERVICES, extract

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
DEPLOY = ROOT / "deploy"
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
ALERTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "releasegate-gateway.json").read_text())
DATASOURCES = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
DUMB_INIT = ["/usr/bin/dumb-init", "--"]


def _interpolate(value: object) -> str:
    """Compose's `${VAR:-default}` as it comes out with nothing set (the file's own defaults)."""

    def default(m: re.Match) -> str:
        if m.group(2) is None:
            raise AssertionError(f"{m.group(0)} has no default: `docker compose up` would need it set")
        return m.group(2)

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", default, str(value))


def _argv(service: dict) -> list[str]:
    """What the container runs: Airflow's image entrypoint runs its arguments as `airflow ...`."""
    command = [str(part) for part in service["command"]]
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        return ["airflow", *command]
    assert entrypoint == DUMB_INIT, f"unexpected entrypoint {entrypoint}"
    return command


def _port_of(name: str) -> str:
    """The port the compose service listens on, read from its command where SERVICES puts it."""
    spec = SERVICES[name]
    return _argv(COMPOSE["services"][name])[spec.argv.index("{" + spec.port + "}")]


def _fields(name: str) -> dict[str, str]:
    """Every `{field}` value of one compose service (argv and environment) against SERVICES' templates."""
    spec, service = SERVICES[name], COMPOSE["services"][name]
    found: dict[str, str] = {}
    for template, value in zip(spec.argv, _argv(service)):
        found.update(extract(template, value) or {})
    env = {k: _interpolate(v) for k, v in (service.get("environment") or {}).items()}
    for var, template in spec.env.items():
        found.update(extract(template, env.get(var, "")) or {})
    return found


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_service_runs_the_command_and_environment_the_system_test_runs(name):
    spec = SERVICES[name]
    assert name in COMPOSE["services"], f"docker-compose.yaml has no service {name!r}"
    service = COMPOSE["services"][name]
    argv = _argv(service)
    assert len(argv) == len(spec.argv) and all(extract(t, v) is not None for t, v in zip(spec.argv, argv)), (
        f"{name}: compose runs {argv}, the system test {list(spec.argv)}"
    )
    env = {k: _interpolate(v) for k, v in (service.get("environment") or {}).items()}
    for var, template in spec.env.items():
        assert var in env, f"{name}: compose does not set {var}"
        assert extract(template, env[var]) is not None, f"{name}: {var}={env[var]!r}, the system test {template!r}"
    if spec.port:
        port = _port_of(name)
        published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
        assert port in published, f"{name} listens on {port} but publishes {published}"
        assert f"localhost:{port}{spec.health}" in " ".join(service["healthcheck"]["test"]), (
            f"{name}: the healthcheck does not probe {spec.health} on {port}"
        )


def test_compose_urls_point_at_the_services_that_listen_there():
    """Each URL in a service's environment names the compose service and the port that service listens on."""
    services = COMPOSE["services"]
    databases = {services["postgres"]["environment"]["POSTGRES_DB"]} | set(
        re.findall(r"CREATE DATABASE (\w+)", (DEPLOY / "postgres" / "init.sql").read_text())
    )
    targets = {"airflow": "airflow-apiserver", "mlflow": "mlflow", "gateway": "gateway"}
    for name in SERVICES:
        fields = _fields(name)
        for prefix, target in targets.items():
            if f"{prefix}_host" in fields and target in SERVICES:
                assert fields[f"{prefix}_host"] == target, f"{name}: {prefix} URL names {fields[f'{prefix}_host']}"
                assert fields[f"{prefix}_port"] == _port_of(target), f"{name}: wrong port for {target}"
        for db_field in ("airflow_db", "mlflow_db", "releasegate_db"):
            if db_field in fields:
                host_port, _, database = fields[db_field].rpartition("@")[2].partition("/")
                assert host_port.split(":")[0] == "postgres", f"{name}: {db_field} is not on the postgres service"
                assert database in databases, f"{name}: database {database!r} is never created"


def test_dockerfile_builds_on_the_airflow_version_requirements_pin():
    pinned = re.search(r"^apache-airflow==([\d.]+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    base = re.search(r"^FROM apache/airflow:([\d.]+)-python3\.11$", (ROOT / "Dockerfile").read_text(), re.M)
    assert base, "the Dockerfile must build on apache/airflow:<version>-python3.11"
    assert base.group(1) == pinned


# --- monitoring ------------------------------------------------------------------------------------


def _exported() -> dict[str, set[str]]:
    """Sample name -> label names, from the gateway's real metrics registry with one child per metric."""
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from releasegate.serving.metrics import Metrics

    metrics = Metrics()
    for metric in vars(metrics).values():
        # Labelled metrics export nothing until a child exists; `_labelnames` is how to make one of each.
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def _check_query(expr: str, exported: dict[str, set[str]], where: str) -> None:
    names = set(re.findall(r"\b(releasegate_gateway_\w+)", expr))
    assert names, f"{where}: {expr!r} queries no gateway metric"
    for metric in names:
        assert metric in exported, f"{where}: the gateway exports no {metric} (it has {sorted(exported)})"
    labels = set().union(*(exported[m] for m in names))
    used = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
    used |= set(re.findall(r"(\w+)\s*=~?\s*\"", expr))
    assert used <= labels, f"{where}: {expr!r} uses labels {sorted(used - labels)} the metrics do not have"


def test_prometheus_scrapes_the_gateway_service_on_its_port():
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    gateway = jobs["releasegate-gateway"]
    assert gateway.get("metrics_path", "/metrics") == "/metrics"
    assert gateway["static_configs"][0]["targets"] == [f"gateway:{_port_of('gateway')}"]
    mounted = " ".join(COMPOSE["services"]["prometheus"]["volumes"])
    for rule_file in PROMETHEUS["rule_files"]:
        assert f":{rule_file}:" in mounted, f"{rule_file} is not mounted into the prometheus service"


def test_alert_rules_and_dashboard_query_metrics_the_gateway_exports():
    exported = _exported()
    rules = [rule for group in ALERTS["groups"] for rule in group["rules"]]
    assert {"ReleasegateModelErrorRateHigh", "ReleasegateModelLatencyP99High"} <= {r["alert"] for r in rules}
    for rule in rules:
        if "releasegate_gateway_" in rule["expr"]:
            _check_query(rule["expr"], exported, f"alert {rule['alert']}")
    assert DASHBOARD["panels"], "the dashboard has no panels"
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            _check_query(target["expr"], exported, f"panel {panel['title']!r}")
    for variable in DASHBOARD["templating"]["list"]:
        _check_query(variable["query"]["query"], exported, f"variable {variable['name']}")


def test_grafana_provisions_the_prometheus_datasource_the_dashboard_uses():
    (source,) = DATASOURCES["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in COMPOSE["services"]["prometheus"]["ports"]
    uids = {panel["datasource"]["uid"] for panel in DASHBOARD["panels"]}
    assert uids == {source["uid"]}
    mounts = COMPOSE["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "releasegate.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
