"""Sticky, reproducible assignment of requests to arms."""

from __future__ import annotations

import hashlib
import hmac
import uuid

import pytest

from releasegate.serving import routing
from releasegate.serving.routing import RouteSpec


def canary(weight: int) -> RouteSpec:
    return RouteSpec(champion_version="1", candidate_version="2", mode="canary", candidate_weight=weight)


SECRET = b"deployment-secret"


def arm(route: RouteSpec, key: str, model: str = "churn") -> str:
    return routing.choose_arm(route, routing.key_digest(model, key, SECRET))


def test_bucket_is_the_documented_keyed_hash():
    digest = hmac.new(SECRET, b"churn:customer-42", hashlib.sha256).hexdigest()
    assert routing.bucket("churn", "customer-42", SECRET) == int(digest, 16) % 100
    assert routing.routing_key_hash("churn", "customer-42", SECRET) == digest[:16]
    assert routing.sample_bucket("req-1") == int(hashlib.sha256(b"req-1").hexdigest()[:8], 16) % 1000


def test_without_the_secret_a_logged_hash_cannot_be_matched_by_hashing_candidate_keys():
    """The unkeyed hash of every candidate phone number no longer finds the logged one; another deployment's
    secret gives other hashes; the deployment's own secret is made once in the home and kept."""
    phone = "+971501234567"
    logged = routing.routing_key_hash("churn", phone, SECRET)
    assert logged != hashlib.sha256(f"churn:{phone}".encode()).hexdigest()[:16]
    assert logged != routing.routing_key_hash("churn", phone, b"another deployment")


def test_the_routing_secret_is_made_once_in_the_home_unless_set(tmp_path):
    from releasegate.settings import Settings

    settings = Settings(home=tmp_path)
    made = routing.routing_secret(settings)
    assert len(made) >= 40 and routing.routing_secret(Settings(home=tmp_path)) == made
    assert oct((tmp_path / "keys" / "routing.secret").stat().st_mode & 0o777) == "0o600"
    assert routing.routing_secret(Settings(home=tmp_path, routing_secret="from-env")) == b"from-env"


def test_a_routing_key_stays_on_its_arm_while_the_weight_grows():
    keys = [f"c{i}" for i in range(2000)]
    at_5 = {k for k in keys if arm(canary(5), k) == "candidate"}
    at_25 = {k for k in keys if arm(canary(25), k) == "candidate"}
    assert all(arm(canary(25), k) == ("candidate" if k in at_25 else "champion") for k in keys)  # repeatable
    assert at_5 <= at_25  # nobody moves back to the champion as the canary grows


@pytest.mark.parametrize("weight", [0, 5, 25, 50, 100])
def test_canary_split_follows_the_weight(weight):
    n = 20_000
    share = sum(arm(canary(weight), uuid.uuid4().hex) == "candidate" for _ in range(n)) / n
    assert abs(share - weight / 100) < 0.015


def test_assignment_differs_between_models():
    keys = [f"c{i}" for i in range(1000)]
    a = [arm(canary(50), k, "churn") for k in keys]
    b = [arm(canary(50), k, "fraud") for k in keys]
    assert a != b


def test_shadow_and_single_always_serve_the_champion():
    shadow = RouteSpec(champion_version="1", candidate_version="2", mode="shadow")
    single = RouteSpec(champion_version="1")
    assert {arm(shadow, f"c{i}") for i in range(200)} == {"champion"}
    assert {arm(single, f"c{i}") for i in range(200)} == {"champion"}


def test_sample_bucket_is_uniform():
    counts = [0] * 10
    for _ in range(20_000):
        counts[routing.sample_bucket(uuid.uuid4().hex) // 100] += 1
    assert min(counts) > 1800 and max(counts) < 2200


@pytest.mark.parametrize(
    "body, message",
    [
        ({"champion_version": "1", "candidate_version": "2"}, "mode 'single' takes no candidate_version"),
        ({"champion_version": "1", "mode": "canary", "candidate_weight": 5}, "needs a candidate_version"),
        (
            {"champion_version": "1", "candidate_version": "2", "mode": "shadow", "candidate_weight": 5},
            "applies to mode 'canary' only",
        ),
        ({"champion_version": "1", "candidate_version": "1", "mode": "shadow"}, "equals champion_version"),
        ({"champion_version": "1", "candidate_version": "2", "mode": "canary", "candidate_weight": 101}, "less than"),
        ({"champion_version": "1", "mode": "blue-green"}, "single"),
    ],
)
def test_inconsistent_route_is_refused_with_the_reason(body, message):
    with pytest.raises(ValueError, match=message):
        RouteSpec.model_validate(body)


@pytest.mark.parametrize("value", ["abc\n", "abc\r\n", "\nabc", ""])
def test_a_request_id_or_model_name_with_a_line_break_is_refused(value):
    """A trailing newline used to pass (`re.match` with `$`): it would reach the log and a header unescaped."""
    assert not routing.valid_request_id(value)
    assert not routing.valid_model_name(value)
    assert routing.valid_request_id(value.strip()) == bool(value.strip())


def experiment(release_id: str = "exp-1", stopped: tuple[str, ...] = ()) -> RouteSpec:
    arms = [{"version": v, "weight": 25, "stopped": v in stopped} for v in ("2", "3")]
    return RouteSpec(champion_version="1", mode="experiment", arms=arms, release_id=release_id)


def experiment_arm(route: RouteSpec, key: str, model: str = "churn") -> str:
    index = routing.choose_experiment_arm(route, routing.key_digest(routing.salted(route, model), key, SECRET))
    return route.champion_version if index is None else (route.arms or [])[index].version


def test_an_experiment_splits_by_its_weights_and_keeps_each_customer_on_one_arm():
    keys = [f"c{i}" for i in range(20_000)]
    first = [experiment_arm(experiment(), k) for k in keys]
    assert first == [experiment_arm(experiment(), k) for k in keys]  # sticky
    shares = {v: first.count(v) / len(keys) for v in ("1", "2", "3")}
    assert abs(shares["1"] - 0.5) < 0.02 and abs(shares["2"] - 0.25) < 0.02 and abs(shares["3"] - 0.25) < 0.02


def test_each_experiment_draws_its_own_customers_for_its_arms():
    """Salted per experiment: the customers of one experiment's candidate arms are not again those of the next."""
    keys = [f"c{i}" for i in range(4000)]
    one = {k for k in keys if experiment_arm(experiment("exp-1"), k) != "1"}
    two = {k for k in keys if experiment_arm(experiment("exp-2"), k) != "1"}
    overlap = len(one & two) / len(one)
    assert 0.4 < overlap < 0.6, overlap  # independent draws at 50 %: about half, not all


def test_a_stopped_arm_sends_its_customers_to_the_control_and_moves_nobody_else():
    keys = [f"c{i}" for i in range(4000)]
    before = {k: experiment_arm(experiment(), k) for k in keys}
    after = {k: experiment_arm(experiment(stopped=("2",)), k) for k in keys}
    assert all(after[k] == ("1" if before[k] == "2" else before[k]) for k in keys)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"champion_version": "1", "mode": "experiment", "release_id": "e"}, "needs arms"),
        (
            {"champion_version": "1", "mode": "experiment", "arms": [{"version": "2", "weight": 60}]},
            "needs the experiment's id",
        ),
        (
            {
                "champion_version": "1",
                "mode": "experiment",
                "release_id": "e",
                "arms": [{"version": "2", "weight": 60}, {"version": "3", "weight": 40}],
            },
            "control",
        ),
        (
            {"champion_version": "1", "mode": "experiment", "release_id": "e", "arms": [{"version": "1", "weight": 9}]},
            "must differ",
        ),
        ({"champion_version": "1", "arms": [{"version": "2", "weight": 9}]}, "apply to mode 'experiment' only"),
        (
            {
                "champion_version": "1",
                "mode": "experiment",
                "release_id": "e",
                "arms": [{"version": str(v), "weight": 1} for v in range(2, 8)],
            },
            "at most 5",
        ),
    ],
)
def test_an_inconsistent_experiment_route_is_refused_with_the_reason(body, message):
    with pytest.raises(ValueError, match=message):
        RouteSpec.model_validate(body)
