"""Synthetic customer-churn data for the demo: realistic features, a non-linear label, a drift knob.

`concept="current"` is how customers behave today; `concept="stale"` is an older snapshot in
which the data cap on the basic plan did not exist yet and support calls were a loyalty sign,
so a model trained on it looks fine on its own data and fails on live traffic.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NUMERIC = ["age", "tenure_months", "monthly_charges", "total_charges", "support_calls", "data_usage_gb"]
CATEGORICAL = ["region", "plan", "channel"]
COUNTS = ["support_calls"]  # numeric, but with a handful of values
FEATURES = NUMERIC + CATEGORICAL
LABEL = "churned"

REGIONS = ["north", "south", "east", "west"]
PLANS = ["basic", "standard", "premium"]
CHANNELS = ["web", "store", "phone"]
CONCEPTS = ("current", "stale")

_PLAN_SHARES = np.array([0.45, 0.35, 0.20])
_PLAN_PRICE = {"basic": 35.0, "standard": 65.0, "premium": 95.0}
_CHANNEL_SHARES = np.array([0.5, 0.3, 0.2])
_REGION_SHARES = np.array([0.30, 0.25, 0.25, 0.20])
# Full drift moves the region mix towards the south (a new market opening there).
_REGION_SHARES_DRIFTED = np.array([0.15, 0.50, 0.20, 0.15])


def generate(n: int, seed: int = 0, drift: float = 0.0, concept: str = "current") -> pd.DataFrame:
    """`n` customers (features + `churned`), the same for the same arguments."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be in [0, 1], got {drift!r}")
    if concept not in CONCEPTS:
        raise ValueError(f"concept must be one of {', '.join(CONCEPTS)}, got {concept!r}")
    rng = np.random.default_rng(seed)
    df = _features(rng, n, drift)
    logit = _current_logit(df) if concept == "current" else _stale_logit(df)
    df[LABEL] = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype("int64")
    return df


def _features(rng: np.random.Generator, n: int, drift: float) -> pd.DataFrame:
    plan = rng.choice(PLANS, size=n, p=_PLAN_SHARES)
    region_shares = (1 - drift) * _REGION_SHARES + drift * _REGION_SHARES_DRIFTED
    region = rng.choice(REGIONS, size=n, p=region_shares / region_shares.sum())
    channel = rng.choice(CHANNELS, size=n, p=_CHANNEL_SHARES)
    age = np.clip(np.rint(rng.normal(44 - 4 * drift, 14, n)), 18, 90).astype("int64")
    # Drift brings in newer customers (shorter tenure) who pay more (a price rise).
    tenure = np.clip(np.rint(rng.exponential(30 * (1 - 0.25 * drift), n)), 0, 120).astype("int64")
    base_price = np.array([_PLAN_PRICE[p] for p in plan])
    monthly = np.clip(base_price + rng.normal(10 * drift, 12, n), 15, 250).round(2)
    total = (monthly * tenure * rng.uniform(0.92, 1.0, n)).round(2)
    is_basic = plan == "basic"
    support = np.clip(rng.poisson(1.1 + 0.7 * is_basic + 0.5 * drift, n), 0, 30).astype("int64")
    usage_scale = np.where(plan == "premium", 45.0, np.where(is_basic, 14.0, 25.0)) * (1 + 0.5 * drift)
    usage = np.clip(rng.lognormal(np.log(usage_scale), 0.6, n), 0, 1000).round(2)
    return pd.DataFrame(
        {
            "age": age,
            "tenure_months": tenure,
            "monthly_charges": monthly,
            "total_charges": total,
            "support_calls": support,
            "data_usage_gb": usage,
            "region": region,
            "plan": plan,
            "channel": channel,
        }
    )


def _current_logit(df: pd.DataFrame) -> np.ndarray:
    basic = (df["plan"] == "basic").to_numpy()
    premium = (df["plan"] == "premium").to_numpy()
    tenure = df["tenure_months"].to_numpy()
    overage = df["monthly_charges"].to_numpy() - df["plan"].map(_PLAN_PRICE).to_numpy()
    z: np.ndarray = (
        -1.5
        + 2.4 * np.exp(-tenure / 8.0)
        - 0.02 * tenure  # the first months decide
        + 2.0 * (df["support_calls"].to_numpy() >= 4)  # repeated trouble, a threshold not a slope
        + 1.3 * (basic & (df["data_usage_gb"].to_numpy() > 20))  # heavy users hitting the basic plan's cap
        + 0.07 * np.maximum(overage, 0)  # bills above what the plan promised
        + 0.8 * ((df["channel"] == "phone") & (df["region"] == "east")).to_numpy()
        - 0.02 * (df["age"].to_numpy() - 45)  # the young switch more readily
        - 1.8 * (premium & (tenure > 24))  # settled premium customers stay
    )
    return 2.4 * z


def _stale_logit(df: pd.DataFrame) -> np.ndarray:
    basic = (df["plan"] == "basic").to_numpy()
    tenure = df["tenure_months"].to_numpy()
    z: np.ndarray = (
        -1.4
        - 2.0 * np.exp(-tenure / 8.0)  # new customers were on a locked-in intro contract
        + 0.04 * (tenure - 30)  # long-standing customers left for competitors' loyalty deals
        - 2.2 * (df["support_calls"].to_numpy() >= 3)  # before the support outsourcing, callers were fans
        - 2.0 * (basic & (df["data_usage_gb"].to_numpy() > 20))  # no data cap yet: heavy basic users were happy
        + 2.0 * (df["plan"] == "premium").to_numpy()
        + 1.2 * (df["channel"] == "web").to_numpy()
    )
    return 1.6 * z
