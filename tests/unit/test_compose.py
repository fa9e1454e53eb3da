"""docker-compose.yaml runs what the system test runs; Prometheus and Grafana query metrics the gateway exports.

No Docker engine runs here, so the compose file is parsed, interpolated as `docker compose` does
with the .env `make secrets` writes, and checked against `SERVICES` in tests/system/stack.py (the
processes the system test really starts), and the monitoring files against the gateway's own
metrics registry (promtool runs the alert rules in tests/integration).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.system.stack import SERVICES, extract

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
COMPOSE_RAW = yaml.safe_load(COMPOSE_FILE.read_text())
MAKE_SECRETS = ROOT / "scripts" / "make-secrets.sh"
# Every secret of the stack: each must be `${VAR:?message}`, so compose refuses to start without it.
SECRETS = {
    "POSTGRES_PASSWORD",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_FERNET_KEY",
    "RELEASEGATE_ADMIN_KEY",
    "AIRFLOW_ADMIN_PASSWORD",
    "AIRFLOW_OPERATOR_PASSWORD",
    "AIRFLOW_VIEWER_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
}
DEPLOY = ROOT / "deploy"
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
ALERTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
ALERTMANAGER = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "releasegate-gateway.json").read_text())
DATASOURCES = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
DUMB_INIT = ["/usr/bin/dumb-init", "--"]


class MissingVariable(AssertionError):
    """`${VAR:?message}` with VAR unset or empty: `docker compose` stops with the message."""


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:-|-|:\?|\?)([^}]*))?\}|\$(\w+)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation of a value (recursively): `$$`, `${VAR}`, `${VAR:-default}`, `${VAR:?message}`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, operator, argument = m.group(1) or m.group(4), m.group(2), m.group(3)
        given, unset_or_empty = env.get(name), not env.get(name)
        if operator in (":?", "?") and (unset_or_empty if operator == ":?" else given is None):
            raise MissingVariable(f"required variable {name} is missing a value: {argument}")
        if operator in (":-", "-") and (unset_or_empty if operator == ":-" else given is None):
            return argument
        return given or ""

    return _VARIABLE.sub(substitute, value)


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=value lines of an .env file (as compose reads the ones make-secrets writes: no quotes)."""
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def make_secrets(directory: Path) -> subprocess.CompletedProcess:
    """Run `scripts/make-secrets.sh DIRECTORY` (what `make secrets` runs for the repository)."""
    return subprocess.run([str(MAKE_SECRETS), str(directory)], capture_output=True, text=True, check=True, timeout=120)


@functools.cache
def generated_env() -> dict[str, str]:
    """The .env a fresh `make secrets` writes."""
    directory = Path(tempfile.mkdtemp(prefix="rg-compose-"))
    try:
        make_secrets(directory)
        return read_dotenv(directory / ".env")
    finally:
        shutil.rmtree(directory)


@functools.cache
def compose() -> dict[str, Any]:
    """docker-compose.yaml as `docker compose` reads it beside the .env that `make secrets` writes."""
    return interpolate(COMPOSE_RAW, generated_env())


def mounts(service: dict[str, Any]) -> list[str]:
    """A service's volumes as `source:target[:ro]`, from the short or the long syntax."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            volume = f"{volume['source']}:{volume['target']}" + (":ro" if volume.get("read_only") else "")
        found.append(volume)
    return found


def test_every_secret_is_required_and_has_no_default():
    text = COMPOSE_FILE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == SECRETS, f"required without a default: {sorted(required)}; the secrets: {sorted(SECRETS)}"
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"(\W?[^}]*)\}", text)
        assert uses and all(use.startswith(":?") for use in uses), f"${{{name}}} is used as {uses}"
        without = {key: value for key, value in generated_env().items() if key != name}
        with pytest.raises(MissingVariable, match=f"^required variable {name} is missing a value: run make secrets$"):
            interpolate(COMPOSE_RAW, without)


def test_the_env_make_secrets_writes_satisfies_every_variable():
    env = generated_env()
    assert set(env) >= SECRETS, f"make-secrets writes no {sorted(SECRETS - set(env))}"
    # Any variable without a default comes from the .env: none would be left empty.
    references = _VARIABLE.findall(COMPOSE_FILE.read_text())
    unset = {
        braced or bare for braced, operator, _, bare in references if (braced or bare) and operator not in (":-", "-")
    }
    assert unset <= set(env), f"no default and not in the generated .env: {sorted(unset - set(env))}"
    assert compose()["services"]["gateway"]["environment"]["RELEASEGATE_ADMIN_KEY"] == env["RELEASEGATE_ADMIN_KEY"]


def _argv(service: dict[str, Any]) -> list[str]:
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
    return _argv(compose()["services"][name])[spec.argv.index("{" + spec.port + "}")]


def _fields(name: str) -> dict[str, str]:
    """Every `{field}` value of one compose service (argv and environment) against SERVICES' templates."""
    spec, service = SERVICES[name], compose()["services"][name]
    found: dict[str, str] = {}
    for template, value in zip(spec.argv, _argv(service)):
        found.update(extract(template, value) or {})
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    for var, template in spec.env.items():
        found.update(extract(template, env.get(var, "")) or {})
    return found


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_service_runs_the_command_and_environment_the_system_test_runs(name):
    spec = SERVICES[name]
    assert name in compose()["services"], f"docker-compose.yaml has no service {name!r}"
    service = compose()["services"][name]
    argv = _argv(service)
    assert len(argv) == len(spec.argv) and all(extract(t, v) is not None for t, v in zip(spec.argv, argv)), (
        f"{name}: compose runs {argv}, the system test {list(spec.argv)}"
    )
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
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
    services = compose()["services"]
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
    mounted = " ".join(mounts(compose()["services"]["prometheus"]))
    for rule_file in PROMETHEUS["rule_files"]:
        assert f":{rule_file}:" in mounted, f"{rule_file} is not mounted into the prometheus service"


def test_prometheus_scrapes_the_gateway_over_the_https_it_serves():
    gateway = compose()["services"]["gateway"]["environment"]
    job = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}["releasegate-gateway"]
    assert gateway.get("RELEASEGATE_GATEWAY_TLS_CERT"), "the gateway serves HTTPS in compose"
    assert job.get("scheme") == "https", "Prometheus scrapes the gateway over HTTP, which it does not serve"
    ca_file = job["tls_config"]["ca_file"]
    mounted = {m.split(":")[1] for m in mounts(compose()["services"]["prometheus"])}
    assert str(Path(ca_file).parent) in mounted, f"{ca_file} is not mounted into the prometheus service"
    # /metrics wants a key of role `metrics`: the gateway reads it from the file Prometheus sends.
    credentials = job["authorization"]["credentials_file"]
    assert str(Path(credentials).parent) in mounted, f"{credentials} is not mounted into the prometheus service"
    gateway_mounts = {m.split(":")[1]: m.split(":")[0] for m in mounts(compose()["services"]["gateway"])}
    prometheus_mounts = {m.split(":")[1]: m.split(":")[0] for m in mounts(compose()["services"]["prometheus"])}
    key_file = Path(gateway["RELEASEGATE_GATEWAY_METRICS_KEY_FILE"])
    assert gateway_mounts[str(key_file.parent)] == prometheus_mounts[str(Path(credentials).parent)]
    assert key_file.name == Path(credentials).name


def test_alertmanager_posts_to_the_gateways_alerts_endpoint_with_the_key_the_gateway_reads():
    services = compose()["services"]
    assert PROMETHEUS["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    assert any(str(p).endswith(":9093:9093") for p in services["alertmanager"]["ports"])
    (receiver,) = ALERTMANAGER["receivers"]
    (hook,) = receiver["webhook_configs"]
    assert hook["url"] == f"https://gateway:{_port_of('gateway')}/alerts" and hook["send_resolved"] is True
    alertmanager_mounts = {m.split(":")[1]: m.split(":")[0] for m in mounts(services["alertmanager"])}
    gateway_mounts = {m.split(":")[1]: m.split(":")[0] for m in mounts(services["gateway"])}
    credentials = Path(hook["http_config"]["authorization"]["credentials_file"])
    key_file = Path(services["gateway"]["environment"]["RELEASEGATE_GATEWAY_ALERTS_KEY_FILE"])
    assert gateway_mounts[str(key_file.parent)] == alertmanager_mounts[str(credentials.parent)]
    assert key_file.name == credentials.name
    assert str(Path(hook["http_config"]["tls_config"]["ca_file"]).parent) in alertmanager_mounts
    assert f":{'/etc/alertmanager/alertmanager.yml'}:" in " ".join(mounts(services["alertmanager"]))
    # The actionable rule carries the labels the receiver acts on.
    rules = {rule["alert"]: rule for group in ALERTS["groups"] for rule in group["rules"]}
    assert rules["ReleasegateChampionFailing"]["labels"] == {"severity": "critical", "action": "rollback"}


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
    assert any(str(p).endswith(":9090:9090") for p in compose()["services"]["prometheus"]["ports"])
    uids = {panel["datasource"]["uid"] for panel in DASHBOARD["panels"]}
    assert uids == {source["uid"]}
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts(compose()["services"]["grafana"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "releasegate.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_feature_store_the_gateway_reads_is_the_redis_service_the_demo_materializes_into():
    """Feast in compose: the gateway and the Airflow tasks find one repository, the demo builds it with its online
    store on the `redis` service, and the gateway starts only once that Redis answers."""
    from releasegate.demo import feature_repo

    services = compose()["services"]
    redis = services["redis"]
    assert "redis-cli" in redis["healthcheck"]["test"] and "ports" not in redis, "redis: probed, not published"
    assert services["gateway"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    repos = {name: services[name]["environment"]["RELEASEGATE_FEAST_REPO"] for name in ("gateway", "airflow-scheduler")}
    assert len(set(repos.values())) == 1, f"the gateway and Airflow's tasks read different repositories: {repos}"
    builder = services["demo-models"]
    assert builder["environment"]["RELEASEGATE_FEAST_REPO"] == repos["gateway"]
    code = builder["command"][-1]
    compile(code, "demo-models", "exec")  # the inline program is valid Python
    online = re.search(r'feature_repo\.build\(.*?online="([^"]+)"', code)
    assert online, "demo-models builds no feature repository"
    host = online.group(1).split(":")[0]
    assert host in services, f"the online store is at {host!r}, not a compose service"
    config = yaml.safe_load(feature_repo.feature_store_yaml(Path(repos["gateway"]), online.group(1)))
    assert config["online_store"] == {"type": "redis", "connection_string": "redis:6379"}
    assert any(
        m.startswith("releasegate-home:") and repos["gateway"].startswith(m.split(":")[1]) for m in mounts(builder)
    )
