"""Two versions of the gateway side by side, in turns with bare echo: did a change make it faster?

`gateway.py` measures the gateway against its ceiling; this compares two source trees of the gateway itself
(say, `main` and your working tree) in one run. This host's speed drifts by 10-30 % over minutes, so two runs of
`gateway.py` minutes apart cannot tell a 5 % change from the drift: here A, B and bare echo take turns, the order
rotating by round, and each round's B ÷ A is taken within the round. The median of the rounds' ratios is the result;
the spread of the rounds says how much to trust it (a change below the spread is not shown by this run).

    git worktree add --detach /tmp/gateway-a main                                 # A: the code before
    nice -n 10 .venv/bin/python benchmarks/gateway_ab.py /tmp/gateway-a/include include --rounds 6
    nice -n 10 .venv/bin/python benchmarks/gateway_ab.py A B --features           # the Feast route (Redis)
    .venv/bin/python benchmarks/gateway_ab.py A B --profile 20                    # py-spy of B under load, no turns

A and B are `include` directories (put first on each gateway's PYTHONPATH); each gateway has a database of its
own (routes, keys, prediction log), the MLflow registry is shared. `--env-b NAME=VALUE` runs B with a setting of
its own (compare a setting rather than code: both directories may then be the same). Each turn waits until both
gateways' prediction logs are written (`/metrics`), so no turn pays for another's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway as bench_gateway  # this folder's benchmark: its wrk driver, its setup of the demo models

NAMES = ("bare", "A", "B")


def orders(round_: int) -> list[str]:
    """The order of the turns in a round: rotating, so that a slow spell falls on each in turn."""
    return bench_gateway._rotated(list(NAMES), round_)


def summary(rounds: dict[str, list[float]]) -> dict[str, float]:
    """The medians of the rounds' B ÷ A, A ÷ bare and B ÷ bare, and the range of B ÷ A."""
    b_a = [b / a for a, b in zip(rounds["A"], rounds["B"])]
    return {
        "b_over_a": statistics.median(b_a),
        "b_over_a_min": min(b_a),
        "b_over_a_max": max(b_a),
        "a_over_bare": statistics.median(a / bare for a, bare in zip(rounds["A"], rounds["bare"])),
        "b_over_bare": statistics.median(b / bare for b, bare in zip(rounds["B"], rounds["bare"])),
    }


def _settings_pairs(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env-b takes NAME=VALUE, not {value!r}")
        pairs[name] = setting
    return pairs


# Run by each side's own code: a change to the schema (a migration) must not leave the other side with a
# database its code does not know.
_SETUP = """
from releasegate import storage
from releasegate.serving import auth
from releasegate.settings import get_settings
storage.engine()
print(auth.create_key("predict", get_settings())[1])
"""


def _own_database(env: dict[str, str]) -> str:
    """The database of `env` (RELEASEGATE_DB_URL, PYTHONPATH: a side's tree) migrated by that tree's code, and a
    predict key made in it."""
    done = subprocess.run([sys.executable, "-c", _SETUP], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"setting up {env['RELEASEGATE_DB_URL']} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="A's include directory (the code before)")
    parser.add_argument("b", type=Path, help="B's include directory (the code after)")
    parser.add_argument("--seconds", type=float, default=5.0, help="Seconds of load per turn (default 5).")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--features", action="store_true", help="The Feast route (single_features) instead of single.")
    parser.add_argument("--pii", action="store_true", help="The personal-data classification (single_pii).")
    parser.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE", help="A setting for B only.")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS", help="py-spy B under load instead.")
    parser.add_argument("--redis", default="127.0.0.1:6379,db=9")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")
    for tree in (args.a, args.b):
        if not (tree / "releasegate" / "serving").is_dir():
            sys.exit(f"{tree} is not an include directory holding releasegate/serving")
    if args.profile and shutil.which("py-spy") is None:
        sys.exit("--profile needs py-spy on PATH (pip install py-spy)")
    env_b = _settings_pairs(args.env_b)
    workdir = Path(tempfile.mkdtemp(prefix="rg-bench-ab-"))
    env = bench_gateway.environment(workdir)
    bench = bench_gateway.Bench(workdir, args.seconds, 16, 2)
    try:
        return _run(args, env, env_b, workdir, bench)
    finally:
        bench.stop_all()


def _run(args, env: dict, env_b: dict[str, str], workdir: Path, bench) -> int:
    from releasegate import registry, signing, storage
    from releasegate.contract import CLASSIFICATION_TAG
    from releasegate.demo import data, models
    from releasegate.settings import get_settings

    settings = get_settings()
    signing.ensure_keys(settings)
    storage.engine()
    bench.say("registering and signing the demo's champion")
    versions = models.register_demo_models(settings, model_name=bench_gateway.MODEL)
    signing.sign_version(bench_gateway.MODEL, versions["champion"], settings)
    model, version = bench_gateway.MODEL, versions["champion"]
    frame = data.generate(1000, seed=99).drop(columns=[data.LABEL])
    body = bench_gateway.write_bodies(frame, workdir / "bodies.jsonl")
    if args.features:
        repo, version, body = bench_gateway._feast_setup(bench, workdir, settings, args.redis)
        os.environ["RELEASEGATE_FEAST_REPO"] = str(repo)
        model = bench_gateway.FEAST_MODEL
    classes = bench_gateway.PII if args.pii else bench_gateway.PUBLIC
    registry.client(settings).set_registered_model_tag(model, CLASSIFICATION_TAG, json.dumps(classes))

    port = bench_gateway.free_port()
    bare = bench.start("bare", [sys.executable, bench_gateway.__file__, "--serve-echo", str(port)])
    bench.wait_ready(f"http://127.0.0.1:{port}/healthz", bare, "bare")
    urls, keys, metrics = {"bare": f"http://127.0.0.1:{port}/invocations"}, {"bare": None}, {}
    pids = {}
    shared_db = os.environ["RELEASEGATE_DB_URL"]
    for name, tree in (("A", args.a), ("B", args.b)):
        # A database of its own: its routes, its key, its log (one log writer's rows never slow the other's turn).
        db_url = shared_db.replace("releasegate.db", f"releasegate-{name}.db")
        os.environ["RELEASEGATE_DB_URL"] = db_url
        own = dict(os.environ, PYTHONPATH=str(tree.resolve()), **(env_b if name == "B" else {}))
        keys[name] = _own_database(own)
        port = bench_gateway.free_port()
        proc = bench.start(
            f"gateway-{name}",
            [sys.executable, "-m", "releasegate.serving", "--port", str(port), "--workers", "1"],
            env=own,
        )
        url = f"http://127.0.0.1:{port}"
        bench.wait_ready(f"{url}/readyz", proc, f"gateway-{name}")
        admin = httpx.Client(
            base_url=url, timeout=300, headers={"authorization": f"Bearer {env['RELEASEGATE_ADMIN_KEY']}"}
        )
        resp = admin.put(f"/admin/routes/{model}", json={"champion_version": version, "mode": "single"})
        if resp.status_code != 200:
            raise RuntimeError(f"gateway {name} refused the route: {resp.status_code} {resp.text}")
        urls[name], metrics[name], pids[name] = f"{url}/models/{model}/invocations", admin, proc.pid
    os.environ["RELEASEGATE_DB_URL"] = shared_db

    bench.say("warm-up: 3 s each")
    for name in NAMES:
        bench.load(urls[name], body, keys[name], 3)
    if args.profile:
        out = workdir / "py-spy-b.txt"
        bench.say(f"py-spy of B for {args.profile:g} s under load; raw stacks to {out}")
        spy = subprocess.Popen(
            ["py-spy", "record", "-r", "100", "-d", str(round(args.profile)), "-f", "raw", "-o", str(out)]
            + ["--pid", str(pids["B"]), "--nonblocking", "--subprocesses"]
        )
        print(bench.load(urls["B"], body, keys["B"], args.profile))
        spy.wait()
        return 0
    rounds: dict[str, list[float]] = {name: [] for name in NAMES}
    for round_ in range(args.rounds):
        for name in orders(round_):
            for admin in metrics.values():  # every log written: this turn pays for no earlier turn's rows
                bench_gateway._wait_for_log(admin, bench.say)
            rounds[name].append(bench.load(urls[name], body, keys[name], args.seconds)["rps"])
        last = {name: rounds[name][-1] for name in NAMES}
        bench.say(
            f"round {round_ + 1}/{args.rounds}: "
            + ", ".join(f"{name} {rps:,.0f}" for name, rps in last.items())
            + f"; B/A {last['B'] / last['A']:.3f}"
        )
    result = summary(rounds)
    print(
        f"B ÷ A {result['b_over_a']:.3f} (rounds {result['b_over_a_min']:.3f}-{result['b_over_a_max']:.3f}); "
        f"A ÷ bare {result['a_over_bare']:.3f}; B ÷ bare {result['b_over_bare']:.3f}; {args.rounds} rounds of "
        f"{args.seconds:g} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
