"""The gateway benchmark's throughput ratios come from rounds measured side by side, not from one run of each case."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gateway_benchmark", ROOT / "benchmarks" / "gateway.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gateway_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def _run(rps: float, seconds: float = 5.0, p99: float = 4.0, errors: int = 0) -> dict:
    return {"rps": rps, "p50_ms": p99 / 2, "p99_ms": p99, "errors": errors, "requests": round(rps * seconds)}


def test_a_slow_spell_in_one_round_moves_both_cases_and_leaves_the_ratio(bench):
    # Round 2 fell in a slow spell of the machine, on both cases, since they take turns: each round still reads 0.5.
    # Measured one case after the other, a spell that fell on one of them alone moved the ratio by half.
    bare = [_run(20_000), _run(10_000), _run(20_000)]
    single = [_run(10_000), _run(5_000), _run(10_000)]
    ratio = bench._median_ratio(single, bare)
    assert ratio == {"median": 0.5, "rounds": [0.5, 0.5, 0.5]}


def test_the_median_round_decides_not_the_best_one(bench):
    ratio = bench._median_ratio([_run(9_000), _run(6_000), _run(12_000)], [_run(20_000), _run(20_000), _run(20_000)])
    assert ratio["median"] == 0.45 and ratio["rounds"] == [0.45, 0.3, 0.6]


def test_pooled_rounds_weigh_each_by_its_requests_and_keep_every_error(bench):
    pooled = bench._pooled([_run(1_000, p99=3.0), _run(3_000, p99=9.0, errors=2), _run(2_000, p99=5.0)])
    assert pooled["rps"] == 2_000.0  # 30,000 requests in 15 s
    assert pooled["requests"] == 30_000 and pooled["errors"] == 2
    assert pooled["p99_ms"] == 5.0  # the median round's, not the worst
    assert pooled["rps_rounds"] == [1_000, 3_000, 2_000]


def test_each_round_starts_one_case_later_so_every_case_leads_once(bench):
    cases = ["bare", "single", "single_pii"]
    orders = [bench._rotated(cases, r) for r in range(3)]
    assert orders == [cases, ["single", "single_pii", "bare"], ["single_pii", "bare", "single"]]
    assert bench._rotated(cases, 3) == cases


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("gateway_ab_benchmark", ROOT / "benchmarks" / "gateway_ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_versions_are_compared_within_each_round_so_a_slow_spell_leaves_their_ratio(ab):
    # B is 10 % faster than A in every round; round 2 fell in a slow spell (every turn at half speed).
    rounds = {"bare": [20_000, 10_000, 20_000], "A": [9_000, 4_500, 9_000], "B": [9_900, 4_950, 9_900]}
    result = ab.summary(rounds)
    assert result["b_over_a"] == pytest.approx(1.1)
    assert (result["b_over_a_min"], result["b_over_a_max"]) == (pytest.approx(1.1), pytest.approx(1.1))
    assert result["a_over_bare"] == pytest.approx(0.45) and result["b_over_bare"] == pytest.approx(0.495)
    # The rounds' spread is reported: one round that disagrees shows in the range, not in the median.
    rounds["B"][1] = 4_000
    result = ab.summary(rounds)
    assert result["b_over_a"] == pytest.approx(1.1) and result["b_over_a_min"] == pytest.approx(4_000 / 4_500)


def test_the_two_versions_and_bare_echo_take_each_place_in_turn(ab):
    orders = [ab.orders(r) for r in range(3)]
    assert [order[0] for order in orders] == ["bare", "A", "B"]
    assert all(sorted(order) == ["A", "B", "bare"] for order in orders)


def test_a_setting_for_b_alone_must_name_its_variable(ab):
    assert ab._settings_pairs(["RELEASEGATE_GATEWAY_BATCH_MAX_ROWS=8", "X=a=b"]) == {
        "RELEASEGATE_GATEWAY_BATCH_MAX_ROWS": "8",
        "X": "a=b",
    }
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        ab._settings_pairs(["RELEASEGATE_GATEWAY_BATCH_MAX_ROWS"])


def _tree(root: Path, storage: str) -> Path:
    """An include directory whose releasegate answers the benchmark's database setup with code of its own."""
    package = root / "releasegate"
    (package / "serving").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "serving" / "__init__.py").write_text("")
    (package / "storage.py").write_text(storage)
    (package / "serving" / "auth.py").write_text(
        "def create_key(role, settings):\n    return 'id', f'{role}-key-of-' + __file__\n"
    )
    (package / "settings.py").write_text("def get_settings():\n    return None\n")
    return root


def test_each_side_migrates_its_database_with_its_own_code(ab, tmp_path):
    # A migration in B alone must not reach A's database: A's code could not open it (alembic: unknown revision).
    mark = tmp_path / "migrated-by"
    tree = _tree(
        tmp_path / "a", f"import pathlib\ndef engine():\n    pathlib.Path({str(mark)!r}).write_text(__file__)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree), "RELEASEGATE_DB_URL": "sqlite:///unused.db"}
    key = ab._own_database(env)
    assert key == f"predict-key-of-{tree / 'releasegate' / 'serving' / 'auth.py'}"
    assert mark.read_text() == str(tree / "releasegate" / "storage.py")


def test_a_side_whose_setup_fails_says_why(ab, tmp_path):
    tree = _tree(tmp_path / "b", "def engine():\n    raise RuntimeError('no such revision 0099')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree), "RELEASEGATE_DB_URL": "sqlite:///b.db"}
    with pytest.raises(RuntimeError, match="(?s)sqlite:///b.db failed.*no such revision 0099"):
        ab._own_database(env)


class _Pages:
    """An admin client whose /metrics pages follow each other: mirrored requests waiting, then calls made."""

    def __init__(self, pages: list[tuple[int, int]]):
        self.pages = pages

    def get(self, path: str):
        waiting, calls = self.pages.pop(0) if len(self.pages) > 1 else self.pages[0]
        text = (
            f"releasegate_gateway_shadow_queue_depth {waiting}.0\n"
            f'releasegate_gateway_model_calls_total{{model="churn",version="1",arm="champion"}} {calls}.0\n'
            f'releasegate_gateway_model_calls_total{{model="churn",version="2",arm="candidate"}} {calls - 10}.0\n'
        )
        return type("Page", (), {"text": text})()


def test_the_log_is_checked_against_the_calls_once_the_mirrored_ones_are_made(bench):
    # A shadow's last mirrored request still waits when the load ends; its call (and its log row) comes after.
    admin = _Pages([(1, 100), (0, 101), (0, 101)])
    assert bench._settled_calls(admin, print) == 101 + 91
