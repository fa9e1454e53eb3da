"""Traffic: one-row requests at a steady rate, each labelled after a delay, with progress lines.

With its label each answer gets a simulated business outcome (`business_value`) for experiments to judge:
a churner the model flagged took the retention offer and stayed (its revenue, lognormal around 30: a
conversion), a loyal customer flagged got the offer's discount for nothing (-2), anyone else 0. A better
model converts more, so an A/B/n experiment on business value agrees with accuracy (docs/experiments.md).

The rows are the demo's churn data, or any table of your own (`replay`: a holdout replayed as live
traffic, its label column sent as feedback). A customer id is the routing key, so a customer stays
on one arm (sticky assignment). aiohttp rather than httpx: the load generator shares two cores with
the gateway, and aiohttp's client costs a fraction of httpx's CPU per request.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from releasegate.contract import MAX_FEEDBACK_ITEMS

_CUSTOMERS = 20_000
# Rows and customers are drawn independently at random: tying a row to a customer would give each
# canary arm a fixed subset of rows, repeated, which a drift test rightly flags as different.
_POOL = 100_000
# The simulated business outcome (see above): a kept churner's revenue, lognormal (median e^3.3 ≈ 27).
_REVENUE_MU, _REVENUE_SIGMA, _DISCOUNT = 3.3, 0.4, -2.0


def business_value(prediction: Any, label: Any, draw: random.Random) -> float:
    """What the answer earned: a flagged churner's revenue, a flagged loyal customer's discount, else 0."""
    if prediction != 1:
        return 0.0
    if label == 1:
        return round(draw.lognormvariate(_REVENUE_MU, _REVENUE_SIGMA), 2)
    return _DISCOUNT


class ReplayError(ValueError):
    """A replay file that cannot be read, or that lacks the label column."""


@dataclass(frozen=True)
class Rows:
    """What the traffic sends: input records, and the label of each (None: nothing to post as feedback)."""

    records: list[dict[str, Any]]
    labels: list[Any]


def demo_rows(drift: float = 0.0, seed: int = 7) -> Rows:
    """The demo's churn customers, generated."""
    from releasegate.demo import data

    frame = data.generate(_POOL, seed=seed, drift=drift)
    return Rows(frame[data.FEATURES].to_dict(orient="records"), [int(v) for v in frame[data.LABEL]])


def replay_rows(path: str | Path, label: str) -> Rows:
    """A table of your own (parquet or csv): every column but `label` is an input, `label` the ground truth."""
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError, ImportError) as err:
        raise ReplayError(
            f"cannot read {path} as {'csv' if path.suffix.lower() == '.csv' else 'parquet'}: {err}"
        ) from err
    if label not in frame.columns:
        raise ReplayError(f"{path} has no label column {label!r} (columns: {', '.join(map(str, frame.columns))})")
    if len(frame) == 0:
        raise ReplayError(f"{path} has no rows")
    # Missing values travel as null, as a caller's JSON would carry them.
    frame = frame.astype(object).where(frame.notna(), None)
    return Rows(frame.drop(columns=[label]).to_dict(orient="records"), [_native(v) for v in frame[label]])


def _native(value: Any) -> Any:
    """A numpy or pandas scalar as the JSON value a caller would send (NaN, NaT and pd.NA: null)."""
    import pandas as pd

    try:
        if value is None or bool(pd.isna(value)):
            return None
    except (TypeError, ValueError):  # an array in a cell: not a missing scalar
        pass
    if hasattr(value, "isoformat"):  # datetime, pandas Timestamp
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return value


@dataclass
class Counters:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    labels: int = 0
    label_errors: int = 0
    arms: dict[str, int] = field(default_factory=dict)
    last_error: str = ""
    draw: random.Random = field(default_factory=lambda: random.Random(17))  # the business outcomes' draws


async def _send(
    client: aiohttp.ClientSession,
    model: str,
    row: dict[str, Any],
    key: str,
    counters: Counters,
    pending: deque[tuple[float, dict[str, Any]]],
    label: Any,
    due: float,
) -> None:
    try:
        async with client.post(
            f"/models/{model}/invocations",
            data=orjson.dumps({"dataframe_records": [row]}, default=_native),
            headers={"content-type": "application/json", "x-routing-key": key},
        ) as resp:
            raw = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as err:
        counters.errors += 1
        counters.last_error = repr(err)
        return
    if status != 200:
        counters.errors += 1
        counters.last_error = f"{status} {raw[:200].decode(errors='replace')}"
        return
    body = orjson.loads(raw)
    counters.ok += 1
    counters.arms[body.get("arm", "?")] = counters.arms.get(body.get("arm", "?"), 0) + 1
    if label is not None:  # an unlabelled row is traffic without feedback
        predictions = body.get("predictions") or [None]
        value = business_value(predictions[0], label, counters.draw)
        pending.append((due, {"request_id": body["request_id"], "ground_truth": label, "business_value": value}))


async def _feedback_loop(
    client: aiohttp.ClientSession, pending: deque[tuple[float, dict[str, Any]]], counters: Counters, stop: asyncio.Event
) -> None:
    """Send each label once its delay has passed (all of them once traffic stops)."""
    while True:
        now = time.time()
        due: list[dict[str, Any]] = []
        while pending and (stop.is_set() or pending[0][0] <= now):
            due.append(pending.popleft()[1])
        for start in range(0, len(due), MAX_FEEDBACK_ITEMS):
            chunk = due[start : start + MAX_FEEDBACK_ITEMS]
            try:
                async with client.post(
                    "/feedback", data=orjson.dumps(chunk), headers={"content-type": "application/json"}
                ) as resp:
                    text = (await resp.read())[:200].decode(errors="replace")
                if resp.status < 300:
                    counters.labels += len(chunk)
                else:
                    counters.label_errors += len(chunk)
                    counters.last_error = f"feedback {resp.status} {text}"
            except (TimeoutError, aiohttp.ClientError) as err:
                counters.label_errors += len(chunk)
                counters.last_error = repr(err)
        if stop.is_set() and not pending:
            return
        await asyncio.sleep(0.25)


async def _run(
    model: str,
    gateway_url: str,
    api_key: str | None,
    source: Rows,
    rps: float,
    duration: float,
    feedback_delay: float,
    seed: int,
    concurrency: int,
    progress_every: float,
) -> Counters:
    rows, labels = source.records, source.labels
    counters = Counters()
    pending: deque[tuple[float, dict[str, Any]]] = deque()
    draw = random.Random(seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=concurrency + 2)
    async with aiohttp.ClientSession(
        base_url=gateway_url, headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as client:
        feedback = asyncio.create_task(_feedback_loop(client, pending, counters, stop))
        in_flight: set[asyncio.Task[None]] = set()
        start = last_report = time.time()
        i = 0
        while not stop.is_set() and (duration <= 0 or time.time() - start < duration):
            target = int((time.time() - start) * rps)
            while i < target and len(in_flight) < concurrency:
                n = draw.randrange(len(rows))
                task = asyncio.create_task(
                    _send(
                        client,
                        model,
                        rows[n],
                        f"c{draw.randrange(_CUSTOMERS)}",
                        counters,
                        pending,
                        labels[n],
                        time.time() + feedback_delay,
                    )
                )
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                i += 1
                counters.sent += 1
            if time.time() - last_report >= progress_every:
                last_report = time.time()
                elapsed = last_report - start
                print(
                    f"traffic: {counters.sent:,} requests ({counters.ok / elapsed:,.0f}/s ok), "
                    f"{counters.errors} errors, {counters.labels:,} labels, arms {counters.arms}"
                    + (f", last error: {counters.last_error}" if counters.last_error else ""),
                    flush=True,
                )
            await asyncio.sleep(0.002)
        if in_flight:
            await asyncio.wait(in_flight)
        stop.set()
        await feedback
    return counters


def run(
    model: str,
    gateway_url: str,
    api_key: str | None,
    rps: float = 300,
    duration: float = 60,
    feedback_delay: float = 1.0,
    drift: float = 0.0,
    seed: int = 7,
    concurrency: int = 32,
    progress_every: float = 5.0,
    rows: Rows | None = None,
) -> Counters:
    """Send traffic until `duration` seconds pass (0: until SIGTERM), then flush the labels.

    `rows`: what to send (see `replay_rows`); None sends the demo's churn customers (with `drift`).
    """
    source = rows if rows is not None else demo_rows(drift, seed)
    counters = asyncio.run(
        _run(model, gateway_url, api_key, source, rps, duration, feedback_delay, seed, concurrency, progress_every)
    )
    print(
        f"traffic done: {counters.sent:,} sent, {counters.ok:,} ok, {counters.errors} errors, "
        f"{counters.labels:,} labels",
        flush=True,
    )
    if counters.errors and not counters.ok:
        sys.exit(1)
    return counters
