"""Prometheus and Alertmanager beside the system stack, running the shipped deploy/ configuration.

The rules (deploy/prometheus/alerts.yml), the scrape and evaluation intervals, Alertmanager's routes and
their group waits are the shipped files' own. What differs from compose is where things are, and only that:
loopback ports instead of service names, the stack's key files, the rules file's path, a temporary
directory for each one's storage, and plain HTTP to the gateway (the stack's serves HTTP on loopback;
compose's serves HTTPS, which its CA file verifies).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.system.stack import ROOT, Stack, free_port

DEPLOY = ROOT / "deploy"
BINARIES = {"prometheus": "prometheus", "alertmanager": "prometheus-alertmanager"}  # Debian's names
GATEWAY_JOB = "releasegate-gateway"


def missing_binaries() -> str | None:
    """Why Prometheus or Alertmanager cannot run here, or None."""
    missing = [binary for binary in BINARIES.values() if shutil.which(binary) is None]
    if not missing:
        return None
    return f"{', '.join(missing)} not installed (Debian: apt-get install prometheus prometheus-alertmanager); .ci/run installs them"


def prometheus_config(gateway: str, alertmanager: str, metrics_key_file: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the stack's addresses: `gateway` and `alertmanager` are host:port."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(DEPLOY / "prometheus" / Path(path).name) for path in config["rule_files"]]
    (targets,) = config["alerting"]["alertmanagers"]
    targets["static_configs"] = [{"targets": [alertmanager]}]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == GATEWAY_JOB]
    job["scheme"] = "http"
    del job["tls_config"]
    job["authorization"]["credentials_file"] = metrics_key_file
    job["static_configs"] = [{"targets": [gateway]}]
    return config


def alertmanager_config(gateway_url: str, alerts_key_file: str) -> dict[str, Any]:
    """deploy/alertmanager/alertmanager.yml posting to the stack's gateway with the stack's alerts key."""
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{gateway_url}/alerts"
            del hook["http_config"]["tls_config"]
            hook["http_config"]["authorization"]["credentials_file"] = alerts_key_file
    return config


class Monitoring:
    """Prometheus scraping the stack's gateway and Alertmanager posting to its /alerts, as two more processes.

    They are started through the stack (each in its own process group, logs beside the others') and stopped
    by `stop()`, or with the stack if a test ends first.
    """

    def __init__(self, stack: Stack, workdir: Path):
        self.stack = stack
        self.workdir = workdir
        self.ports = {name: free_port() for name in BINARIES}

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prometheus']}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['alertmanager']}"

    def start(self, timeout: float = 120) -> None:
        stack, values = self.stack, self.stack.values
        for name in BINARIES:
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        am_config = self.workdir / "alertmanager" / "alertmanager.yml"
        am_config.write_text(yaml.safe_dump(alertmanager_config(stack.gateway_url, values["alerts_key_file"])))
        prom_config = self.workdir / "prometheus" / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(
                prometheus_config(
                    f"127.0.0.1:{stack.ports['gateway_port']}",
                    f"127.0.0.1:{self.ports['alertmanager']}",
                    values["metrics_key_file"],
                )
            )
        )
        stack.start_process(
            "alertmanager",
            [
                BINARIES["alertmanager"],
                f"--config.file={am_config}",
                f"--storage.path={self.workdir / 'alertmanager' / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}",
                "--cluster.listen-address=",  # one instance: no gossip port to collide with
            ],
        )
        stack.start_process(
            "prometheus",
            [
                BINARIES["prometheus"],
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={self.workdir / 'prometheus' / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
            ],
        )
        for name, url in (("alertmanager", self.alertmanager_url), ("prometheus", self.prometheus_url)):
            stack.wait_for(
                name, lambda url=url: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, (name,), timeout
            )

    def stop(self) -> None:
        self.stack.stop_processes("prometheus", "alertmanager")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        resp = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
        resp.raise_for_status()
        return resp.json()["data"]["result"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """Prometheus' active (pending or firing) alerts of one rule."""
        resp = httpx.get(f"{self.prometheus_url}/api/v1/alerts", timeout=10)
        resp.raise_for_status()
        return [a for a in resp.json()["data"]["alerts"] if a["labels"].get("alertname") == name]

    def alertmanager_alerts(self, name: str) -> list[dict[str, Any]]:
        """The alerts of one name Alertmanager holds."""
        resp = httpx.get(f"{self.alertmanager_url}/api/v2/alerts", params={"filter": f'alertname="{name}"'}, timeout=10)
        resp.raise_for_status()
        return resp.json()
