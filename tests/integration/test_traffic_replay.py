"""`releasegate traffic --data`: a table of your own replayed as live traffic, its label column as feedback.

The gateway's stand-in is a Starlette app on a loopback port that answers as the gateway does
(a request id and an arm) and records every invocation and every feedback item.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import uvicorn
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from releasegate.cli import main
from releasegate.demo import traffic


class StandIn:
    """Answers /models/<name>/invocations and /feedback like the gateway; keeps what it was sent."""

    def __init__(self):
        self.invocations: list[dict] = []  # {"request_id", "model", "key", "records", "time"}
        self.feedback: list[dict] = []  # {"request_id", "ground_truth", "time"}
        self.lock = threading.Lock()

    async def invoke(self, request: Request) -> JSONResponse:
        body = await request.json()
        with self.lock:
            request_id = f"req-{len(self.invocations)}"
            self.invocations.append(
                {
                    "request_id": request_id,
                    "model": request.path_params["model"],
                    "key": request.headers.get("x-routing-key"),
                    "auth": request.headers.get("authorization"),
                    "records": body["dataframe_records"],
                    "time": time.time(),
                }
            )
        return JSONResponse({"request_id": request_id, "arm": "champion", "version": "1", "predictions": [0]})

    async def label(self, request: Request) -> JSONResponse:
        items = await request.json()
        now = time.time()
        with self.lock:
            self.feedback.extend({**item, "time": now} for item in items)
        return JSONResponse({"accepted": len(items)}, status_code=202)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/models/{model}/invocations", self.invoke, methods=["POST"]),
                Route("/feedback", self.label, methods=["POST"]),
            ]
        )


@pytest.fixture
def gateway():
    """The stand-in served by uvicorn in a thread on a free loopback port; yields (url, recorder)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recorder = StandIn()
    server = uvicorn.Server(uvicorn.Config(recorder.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "stand-in gateway did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", recorder
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def rows_file(tmp_path):
    """Twenty rows: a number, a category, a column with gaps, and an integer label (one row unlabelled)."""
    frame = pd.DataFrame(
        {
            "x": np.arange(20, dtype=float) / 4,
            "region": [["north", "south", "east", "west"][i % 4] for i in range(20)],
            "optional": [np.nan if i % 3 == 0 else float(i) for i in range(20)],
            "y": pd.array([i % 3 for i in range(19)] + [None], dtype="Int64"),
        }
    )
    path = tmp_path / "rows.parquet"
    frame.to_parquet(path)
    return path, frame


def replay(url: str, path, *args: str) -> subprocess.CompletedProcess:
    """`releasegate traffic --data` as a user runs it, in its own process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "releasegate.cli",
            "traffic",
            "--model",
            "mine",
            "--gateway-url",
            url,
            "--api-key",
            "secret",
            "--data",
            str(path),
            "--label",
            "y",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replay_sends_one_row_without_the_label_and_posts_the_label_after_the_delay(gateway, rows_file):
    url, recorder = gateway
    path, frame = rows_file
    done = replay(url, path, "--rps", "100", "--duration", "6", "--feedback-delay", "1")
    assert done.returncode == 0, done.stdout + done.stderr

    sent = recorder.invocations
    assert len(sent) >= 300 and {call["model"] for call in sent} == {"mine"}
    assert {call["auth"] for call in sent} == {"Bearer secret"}
    by_x = {row.x: row for row in frame.itertuples(index=False)}
    for call in sent:
        assert len(call["records"]) == 1 and re.fullmatch(r"c\d+", call["key"])
        record = call["records"][0]
        assert list(record) == ["x", "region", "optional"]  # every column but the label, in the file's order
        source = by_x[record["x"]]
        assert record["region"] == source.region
        assert record["optional"] is None if np.isnan(source.optional) else record["optional"] == source.optional
    assert len({call["records"][0]["x"] for call in sent}) == len(frame)  # rows drawn at random, all of them
    assert len({call["key"] for call in sent}) > len(sent) // 2  # a random customer per request

    # Each labelled request gets its row's label once, held back for the delay (labels still held when the
    # traffic stops are flushed at once); the unlabelled row gets none.
    posted = {item["request_id"]: item for item in recorder.feedback}
    last_sent = max(call["time"] for call in sent)
    assert len(posted) == len(recorder.feedback)
    for call in sent:
        label = by_x[call["records"][0]["x"]].y
        if pd.isna(label):
            assert call["request_id"] not in posted
        else:
            item = posted[call["request_id"]]
            assert item["ground_truth"] == label and isinstance(item["ground_truth"], int)
            # The delay counts from the send; the request reached the stand-in a little after it.
            assert item["time"] - call["time"] >= 0.8 or item["time"] >= last_sent

    assert re.search(
        r"^traffic: [\d,]+ requests \([\d,]+/s ok\), 0 errors, [\d,]+ labels, arms \{'champion': \d+\}$",
        done.stdout,
        re.M,
    ), done.stdout
    summary = re.search(r"^traffic done: ([\d,]+) sent, ([\d,]+) ok, 0 errors, ([\d,]+) labels$", done.stdout, re.M)
    assert summary and [int(g.replace(",", "")) for g in summary.groups()] == [len(sent), len(sent), len(posted)]


def test_replay_refuses_a_file_without_the_label_column(rows_file):
    path, _ = rows_file
    result = CliRunner().invoke(main, ["traffic", "--model", "mine", "--data", str(path), "--label", "churned"])
    assert result.exit_code == 2
    assert "no label column 'churned'" in result.output and "x, region, optional, y" in result.output


def test_replay_needs_a_label_and_takes_no_drift(rows_file):
    path, _ = rows_file
    runner = CliRunner()
    no_label = runner.invoke(main, ["traffic", "--model", "mine", "--data", str(path)])
    assert no_label.exit_code == 2 and "--data needs --label" in no_label.output
    drift = runner.invoke(main, ["traffic", "--model", "mine", "--data", str(path), "--label", "y", "--drift", "0.5"])
    assert drift.exit_code == 2 and "--drift" in drift.output


def test_a_label_column_of_floats_and_strings_is_posted_as_json_values(tmp_path):
    frame = pd.DataFrame({"x": [1.0, 2.0], "price": [101.5, np.nan], "kind": ["a", "b"]})
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    assert traffic.replay_rows(path, "price").labels == [101.5, None]
    strings = traffic.replay_rows(path, "kind")
    assert strings.labels == ["a", "b"] and strings.records[1] == {"x": 2.0, "price": None}
