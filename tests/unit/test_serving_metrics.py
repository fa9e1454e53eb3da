"""The gateway's per-request metrics: tallied between scrapes, and rendered as prometheus_client would have."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from releasegate.serving.metrics import Metrics

# Below the first bound, on bounds (a bound holds what equals it), between them, beyond the last (+Inf).
LATENCIES = [0.0002, 0.001, 0.001, 0.0049, 0.005, 0.3, 2.5, 7.0, None, 0.02]


def _samples(metrics: Metrics, *names: str) -> dict[tuple, float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name in names
        for s in family.samples
    }


def test_tallied_model_calls_render_as_prometheus_clients_own_updates():
    tallied, direct = Metrics(), Metrics()
    for arm in ("champion", "candidate"):
        for seconds in LATENCIES:
            tallied.model_call("churn", "3", arm, seconds)
            direct.requests.labels("churn", "3", arm).inc()
            if seconds is not None:
                direct.latency.labels("churn", "3", arm).observe(seconds)
    names = ("releasegate_gateway_model_calls", "releasegate_gateway_model_latency_seconds")
    expected = _samples(direct, *names)
    assert (
        expected[
            (
                "releasegate_gateway_model_latency_seconds_count",
                (("arm", "champion"), ("model", "churn"), ("version", "3")),
            )
        ]
        == len(LATENCIES) - 1
    )
    assert _samples(tallied, *names) == expected
    # A scrape flushed the tallies: the next one adds only what came after it.
    tallied.model_call("churn", "3", "champion", 0.004)
    direct.requests.labels("churn", "3", "champion").inc()
    direct.latency.labels("churn", "3", "champion").observe(0.004)
    assert _samples(tallied, *names) == _samples(direct, *names)


def test_responses_are_counted_by_endpoint_and_status_at_each_scrape():
    metrics = Metrics()
    for status in (200, 200, 422, 200):
        metrics.http_response("invocations", status)
    metrics.http_response("metrics", 200)
    counts = _samples(metrics, "releasegate_gateway_http_responses")
    key = "releasegate_gateway_http_responses_total"
    assert counts[(key, (("endpoint", "invocations"), ("status", "200")))] == 3
    assert counts[(key, (("endpoint", "invocations"), ("status", "422")))] == 1
    assert counts[(key, (("endpoint", "metrics"), ("status", "200")))] == 1
    metrics.http_response("invocations", 422)
    assert (
        _samples(metrics, "releasegate_gateway_http_responses")[(key, (("endpoint", "invocations"), ("status", "422")))]
        == 2
    )


def test_requests_in_flight_are_read_at_the_scrape():
    metrics = Metrics()
    invocations = metrics.in_flight_of("invocations")
    assert metrics.in_flight_of("invocations") is invocations
    invocations.n += 3
    invocations.n -= 1
    key = ("releasegate_gateway_requests_in_flight", (("endpoint", "invocations"),))
    assert _samples(metrics, "releasegate_gateway_requests_in_flight")[key] == 2
    invocations.n -= 2
    assert _samples(metrics, "releasegate_gateway_requests_in_flight")[key] == 0


def test_tallied_batches_and_cpu_render_as_prometheus_clients_own_updates():
    tallied, direct = Metrics(), Metrics()
    for rows in (1, 1, 2, 3, 64, 65, 1024, 5000):
        tallied.observe(tallied.batch_rows.labels("churn", "3"), rows)
        direct.batch_rows.labels("churn", "3").observe(rows)
        tallied.add(tallied.model_cpu.labels("churn", "3"), rows / 1e5)
        direct.model_cpu.labels("churn", "3").inc(rows / 1e5)
    names = ("releasegate_gateway_batch_rows", "releasegate_gateway_model_cpu_seconds")
    assert _samples(tallied, *names) == _samples(direct, *names)
