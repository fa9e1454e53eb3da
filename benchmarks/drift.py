"""Drift at scale: releasegate's drift step on a day of logged traffic beside plain Evidently on every row.

First (not timed) it writes `--rows` requests × 30 features (20 numeric, 10 categorical) through
the gateway's own log writer into the real prediction store, with drift planted in a known subset:
a mean shift of 0.1 standard deviations in n00-n04 and a 5-point rise in the share of category "a"
in c00-c02. Then each side runs in a child process of its own (peak memory is that child's
ru_maxrss): releasegate reads a hash-uniform sample in SQL and tests it (`drift.read_logged_inputs`
+ `drift.input_drift`); plain Evidently reads every row and runs the default DataDriftPreset.

    nice -n 10 .venv/bin/python benchmarks/drift.py --json bench-drift.json
    nice -n 10 .venv/bin/python benchmarks/drift.py --db-url postgresql+psycopg://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

MODEL = "drift-bench"
NUMERIC = [f"n{i:02d}" for i in range(20)]
CATEGORICAL = [f"c{i:02d}" for i in range(10)]
PLANTED = NUMERIC[:5] + CATEGORICAL[:3]
CATEGORIES = ["a", "b", "c", "d"]
SHARES = [0.40, 0.30, 0.20, 0.10]
SHIFTED_SHARES = [0.45, 0.275, 0.1833, 0.0917]  # "a" +5 points, the rest scaled down to make room
SHIFT_SD = 0.1
DAY = 86_400.0


def features(n: int, rng, drifted: bool):
    """`n` rows of the 30 features; with `drifted`, the planted columns shifted."""
    import numpy as np
    import pandas as pd

    columns = {}
    for i, name in enumerate(NUMERIC):
        mean, sd = 10.0 * i, 1.0 + i / 4
        shift = SHIFT_SD * sd if drifted and name in PLANTED else 0.0
        # Half the columns are whole numbers, as counts and ages are in real traffic.
        values = rng.normal(mean + shift, sd, n)
        columns[name] = np.rint(values * 10).astype("int64") if i % 2 else values.round(4)
    for name in CATEGORICAL:
        shares = SHIFTED_SHARES if drifted and name in PLANTED else SHARES
        columns[name] = rng.choice(CATEGORIES, n, p=np.array(shares) / sum(shares))
    return pd.DataFrame(columns)


def write_traffic(db_url: str, rows: int, until: float, seed: int) -> float:
    """`rows` one-row requests over the day before `until`, through the gateway's LogWriter; returns seconds."""
    import numpy as np
    import orjson

    from releasegate import storage
    from releasegate.serving.logwriter import LogWriter
    from releasegate.serving.metrics import Metrics
    from releasegate.serving.routing import routing_key_hash, sample_bucket

    engine = storage.engine(db_url)
    with engine.begin() as conn:  # a rerun on the same store starts from an empty day
        conn.execute(storage.predictions.delete().where(storage.predictions.c.model == MODEL))

    def expand(chunk):
        # The gateway encodes inputs in the writer thread too (serving.gateway._expand_predictions).
        start, records = chunk
        out = []
        for i, record in enumerate(records):
            request_id = uuid.uuid4().hex
            out.append(
                {
                    "request_id": request_id,
                    "time": start + i * DAY / rows,
                    "model": MODEL,
                    "version": "1",
                    "arm": "champion",
                    "mode": "single",
                    "release_id": None,
                    "routing_key_hash": routing_key_hash(MODEL, request_id, b"benchmark"),
                    "sample_bucket": sample_bucket(request_id),
                    "served": True,
                    "fallback": False,
                    "inputs": orjson.dumps(record).decode(),
                    "outputs": "0",
                    "latency_ms": 1.0,
                    "status": "ok",
                    "error": None,
                }
            )
        return out

    began = time.perf_counter()
    writer = LogWriter(engine, storage.predictions, Metrics(), expand=expand, batch_rows=5000, max_buffer=64).start()
    rng = np.random.default_rng(seed)
    since, chunk = until - DAY, 1000
    for offset in range(0, rows, chunk):
        n = min(chunk, rows - offset)
        entry = (since + offset * DAY / rows, features(n, rng, drifted=True).to_dict("records"))
        while not writer.put(entry, rows=n):  # the buffer is full: wait for the writer, as a busy gateway would not
            time.sleep(0.05)
    writer.close(timeout=600)
    with engine.connect() as conn:
        import sqlalchemy as sa

        written = conn.execute(
            sa.select(sa.func.count()).select_from(storage.predictions).where(storage.predictions.c.model == MODEL)
        ).scalar_one()
    if written != rows:
        raise SystemExit(f"the log writer stored {written} of {rows} rows")
    return time.perf_counter() - began


def run_releasegate(db_url: str, reference, since: float, until: float, out: Path, sample: int) -> list[str]:
    from releasegate import drift, storage

    engine = storage.engine(db_url)
    current = drift.read_logged_inputs(MODEL, since, until, engine=engine, max_rows=sample)
    return drift.input_drift(reference, current, out, title="Drift benchmark (releasegate)").drifted_columns


def run_evidently_full(db_url: str, reference, since: float, until: float, out: Path) -> list[str]:
    """What one would write without releasegate: every row of the day into pandas, the default preset."""
    import orjson
    import pandas as pd
    import sqlalchemy as sa
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from releasegate import storage

    p = storage.predictions
    frames = []
    with storage.engine(db_url).connect() as conn:
        result = conn.execution_options(yield_per=50_000).execute(
            sa.select(p.c.inputs).where(p.c.model == MODEL, p.c.time >= since, p.c.time < until)
        )
        for part in result.partitions():
            frames.append(pd.DataFrame.from_records([orjson.loads(r.inputs) for r in part]))
    current = pd.concat(frames, ignore_index=True)
    del frames
    definition = DataDefinition(numerical_columns=NUMERIC, categorical_columns=CATEGORICAL)
    snapshot = Report([DataDriftPreset()], include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    out.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out / "evidently_full.html"))
    result = json.loads(snapshot.json())
    failed = {t["metric_config"]["metric_id"] for t in result["tests"] if t["status"] == "FAIL"}
    return [
        m["config"]["column"]
        for m in result["metrics"]
        if m["config"].get("type") == "evidently:metric_v2:ValueDrift" and m["id"] in failed
    ]


def worker(args) -> None:
    """One side of the comparison in this process; prints {"seconds", "drifted", "import_seconds"}."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    began = time.perf_counter()
    import evidently.presets  # noqa: F401  (both sides pay the import before the clock starts)
    import pandas as pd

    imported = time.perf_counter() - began
    reference = pd.read_parquet(args.reference)
    start = time.perf_counter()
    if args.worker == "releasegate":
        drifted = run_releasegate(args.db_url, reference, args.since, args.until, args.out, args.sample)
    else:
        drifted = run_evidently_full(args.db_url, reference, args.since, args.until, args.out)
    print(
        json.dumps(
            {
                "seconds": round(time.perf_counter() - start, 2),
                "drifted": sorted(drifted),
                "import_seconds": round(imported, 2),
            }
        )
    )


def measure(side: str, args, reference: Path, since: float, until: float, out: Path) -> dict:
    """Run one side in a child process; its time, drifted columns and peak resident memory (ru_maxrss)."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--db-url",
        args.db_url,
        "--reference",
        str(reference),
        "--since",
        repr(since),
        "--until",
        repr(until),
        "--out",
        str(out),
        "--sample",
        str(args.sample),
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the {side} run failed (exit {child.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {
        "seconds": result["seconds"],
        "peak_mb": round(usage.ru_maxrss / 1024, 1),
        "drifted": result["drifted"],
        "import_seconds": result["import_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reference-rows", type=int, default=20_000)
    parser.add_argument("--sample", type=int, default=20_000, help="rows releasegate's drift step reads")
    parser.add_argument("--db-url", help="SQLAlchemy URL of the prediction store (default: SQLite in --home)")
    parser.add_argument("--home", type=Path, help="where the SQLite store and reports go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--skip-full", action="store_true", help="do not run plain Evidently on every row")
    parser.add_argument("--reuse", action="store_true", help="keep the rows already in --home's store")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--worker", choices=["releasegate", "evidently_full"], help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--since", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.rows < 1 or args.sample < 1 or args.reference_rows < 1:
        parser.error("--rows, --sample and --reference-rows must be positive")

    import numpy as np

    home = args.home or Path(tempfile.mkdtemp(prefix="rg-drift-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    args.db_url = args.db_url or f"sqlite:///{home.resolve()}/releasegate.db"
    until = float(int(time.time()))
    since = until - DAY
    if args.reuse:
        import sqlalchemy as sa

        from releasegate import storage

        with storage.engine(args.db_url).connect() as conn:
            p = storage.predictions
            row = conn.execute(sa.select(sa.func.count(), sa.func.max(p.c.time)).where(p.c.model == MODEL)).one()
        if row[0] != args.rows:
            parser.error(f"--reuse: the store holds {row[0]} benchmark rows, not {args.rows}")
        until = float(int(row[1])) + 1
        since = until - DAY - 1
        print(f"reusing {args.rows:,} rows in {args.db_url}", file=sys.stderr)
    else:
        print(
            f"writing {args.rows:,} rows × 30 features through the log writer into {args.db_url} ...", file=sys.stderr
        )
        seconds = write_traffic(args.db_url, args.rows, until, args.seed)
        print(f"  written in {seconds:.0f} s", file=sys.stderr)
    reference = home / "reference.parquet"
    features(args.reference_rows, np.random.default_rng(args.seed + 1), drifted=False).to_parquet(reference)

    results = {
        "rows": args.rows,
        "columns": len(NUMERIC) + len(CATEGORICAL),
        "planted": PLANTED,
        "db": args.db_url.split(":", 1)[0],
        "sample_rows": args.sample,
        "reference_rows": args.reference_rows,
    }
    sides = ["releasegate"] + ([] if args.skip_full else ["evidently_full"])
    for side in sides:
        print(f"running {side} ...", file=sys.stderr)
        results[side] = measure(side, args, reference, since, until, home / "reports" / side)
        print(f"  {json.dumps(results[side])}", file=sys.stderr)
    ours = results["releasegate"]
    results["targets"] = {
        "seconds_le_30": ours["seconds"] <= 30,
        "peak_mb_le_1536": ours["peak_mb"] <= 1536,
        "drifted_equals_planted": sorted(ours["drifted"]) == sorted(PLANTED),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
