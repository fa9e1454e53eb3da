"""A Feast feature repository for the demo's churn data: five account features per customer, served online.

The five features a customer's account accumulates (tenure, charges, support calls, data use) live in
Feast, keyed by `customer_id`; a request carries the key and what it knows itself (age, region, plan,
channel). The offline source is a parquet file of snapshots: each customer has one before the label's
time and one after it, so only a point-in-time join (`get_historical_features`) gives the values the
label was observed with. `build` writes the file, the feature_store.yaml and the registry, and
materializes the latest values (or those as of a time) into the online store (SQLite by default, or
Redis). See docs/features.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from releasegate.demo import data

if TYPE_CHECKING:
    import pandas as pd

    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast import FeatureStore

PROJECT = "releasegate_demo"
ENTITY = "customer_id"
FEATURE_VIEW = "customer_account"
FEATURE_SERVICE = "churn_account"
FEATURES = ["tenure_months", "monthly_charges", "total_charges", "support_calls", "data_usage_gb"]
REQUEST_FIELDS = [c for c in data.FEATURES if c not in FEATURES]  # what a request carries besides the key
SOURCE_FILE = "customer_account.parquet"
# The label's time; the snapshot before it is what the customer looked like then, the one after is later news.
LABEL_TIME = datetime(2026, 6, 1, tzinfo=UTC)
_BEFORE, _AFTER = LABEL_TIME - timedelta(days=30), LABEL_TIME + timedelta(days=30)


@dataclass(frozen=True)
class Customers:
    """The demo's customers split as Feast sees them: the offline source and the labelled entity rows."""

    snapshots: pd.DataFrame  # customer_id, event_timestamp, the five features (two snapshots per customer)
    labelled: pd.DataFrame  # customer_id, event_timestamp (the label's time), the request's fields, churned


def customers(n: int, seed: int = 0, first_id: int = 1) -> Customers:
    """`n` demo customers with ids `first_id`…; the later snapshot's values differ (a year on), as news would."""
    import numpy as np
    import pandas as pd

    frame = data.generate(n, seed=seed)
    ids = np.arange(first_id, first_id + n, dtype="int64")
    before = frame[FEATURES].copy()
    after = before.copy()
    after["tenure_months"] = after["tenure_months"] + 12
    after["total_charges"] = (after["total_charges"] + 12 * after["monthly_charges"]).round(2)
    after["support_calls"] = after["support_calls"] + 3  # the calls made after the label's time
    snapshots = pd.concat(
        [
            before.assign(**{ENTITY: ids, "event_timestamp": _BEFORE}),
            after.assign(**{ENTITY: ids, "event_timestamp": _AFTER}),
        ],
        ignore_index=True,
    )[[ENTITY, "event_timestamp", *FEATURES]]
    labelled = frame[[*REQUEST_FIELDS, data.LABEL]].assign(**{ENTITY: ids, "event_timestamp": LABEL_TIME})
    return Customers(snapshots, labelled[[ENTITY, "event_timestamp", *REQUEST_FIELDS, data.LABEL]])


def definitions(source_path: Path) -> list[Any]:
    """The entity, feature view and feature service over the parquet file at `source_path`."""
    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast import Entity, FeatureService, FeatureView, Field, FileSource
    from feast.types import Float64, Int64
    from feast.value_type import ValueType

    customer = Entity(name="customer", join_keys=[ENTITY], value_type=ValueType.INT64)
    source = FileSource(name="customer_account_source", path=str(source_path), timestamp_field="event_timestamp")
    types = {"tenure_months": Int64, "support_calls": Int64}
    view = FeatureView(
        name=FEATURE_VIEW,
        entities=[customer],
        ttl=timedelta(days=365),
        schema=[Field(name=name, dtype=types.get(name, Float64)) for name in FEATURES],
        source=source,
        online=True,
    )
    return [customer, source, view, FeatureService(name=FEATURE_SERVICE, features=[view])]


def feature_store_yaml(repo: Path, online: str | None = None, project: str = PROJECT) -> str:
    """The repository's feature_store.yaml: SQLite online store in `repo`, or Redis at `online` ("host:port,db=N").

    Feast's Redis keys start with the project's name: a project of its own keeps a test's keys apart.
    """
    import yaml

    online_store: dict[str, Any] = (
        {"type": "sqlite", "path": str(repo / "online.db")}
        if online is None
        else {"type": "redis", "connection_string": online}
    )
    config = {
        "project": project,
        "provider": "local",
        "registry": str(repo / "registry.db"),
        "online_store": online_store,
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }
    text: str = yaml.safe_dump(config, sort_keys=False)
    return text


def build(
    repo: Path,
    n: int = 2_000,
    seed: int = 0,
    online: str | None = None,
    project: str = PROJECT,
    as_of: datetime | None = None,
) -> FeatureStore:
    """Write the repository under `repo` (source file, feature_store.yaml, registry) and materialize it online.

    The online store holds each customer's latest snapshot, or the last one before `as_of`: with `LABEL_TIME`,
    the values the labels were observed with, so replaying the labelled rows as traffic judges the answers on
    the features they were given.
    """
    from releasegate import feast_import

    feast_import.load()  # feast without its PROMETHEUS_MULTIPROC_DIR (feast_import.py)
    from feast import FeatureStore

    repo.mkdir(parents=True, exist_ok=True)
    made = customers(n, seed=seed)
    source = repo / SOURCE_FILE
    made.snapshots.to_parquet(source)
    made.labelled.to_parquet(repo / "labelled.parquet")
    (repo / "feature_store.yaml").write_text(feature_store_yaml(repo, online, project))
    store = FeatureStore(repo_path=str(repo))
    store.apply(definitions(source))
    end = _AFTER + timedelta(days=1) if as_of is None else as_of
    store.materialize(start_date=_BEFORE - timedelta(days=1), end_date=end)
    return store
