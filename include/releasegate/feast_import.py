"""Feast, imported without its side effect on the process environment.

Importing feast runs its `feast.metrics`, which sets PROMETHEUS_MULTIPROC_DIR (and
PROMETHEUS_MULTIPROCESS_DIR) in os.environ for a temporary directory of its own. Every process
started afterwards inherits it, and prometheus_client there takes it for multiprocess mode: the
gateway's log writers, a gateway a test or a benchmark starts, Airflow's task processes. Their
metrics then go to feast's directory, and the gateway's own /metrics loses them. So every import of
feast in releasegate goes through `load()`, which imports prometheus_client first (its value class is
chosen at import, from the environment as it was) and puts the two variables back as they were.
"""

from __future__ import annotations

from types import ModuleType

_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")


def load() -> ModuleType:
    """The feast module, the environment as it was before."""
    import prometheus_client.values  # noqa: F401  (its value class, chosen now, before feast touches the environment)

    from releasegate.settings import environ_restored

    with environ_restored(*_VARIABLES):
        import feast

        try:
            import feast.metrics
        except ImportError:
            pass
    return feast
