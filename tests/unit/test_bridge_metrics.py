"""The receiver's per-request metrics, kept as plain numbers and exported at scrape time."""

from __future__ import annotations

from bridge.metrics import BridgeMetrics


def test_requests_are_exported_by_method_and_outcome() -> None:
    metrics = BridgeMetrics()
    for outcome in ("accepted", "accepted", "invalid_json"):
        metrics.count_request("POST", outcome)
    metrics.count_request("GET", "handshake")
    sample = metrics.registry.get_sample_value
    name = "wifi_bridge_requests_total"
    assert sample(name, {"method": "POST", "outcome": "accepted"}) == 2
    assert sample(name, {"method": "POST", "outcome": "invalid_json"}) == 1
    assert sample(name, {"method": "GET", "outcome": "handshake"}) == 1
    assert sample(name, {"method": "GET", "outcome": "accepted"}) is None


def test_ack_latency_buckets_count_values_up_to_and_including_their_bound() -> None:
    metrics = BridgeMetrics()
    for seconds in (0.0005, 0.001, 0.0011, 0.3, 11.0):
        metrics.ack_latency.observe(seconds)
    sample = metrics.registry.get_sample_value
    name = "wifi_bridge_kafka_ack_seconds"
    assert sample(f"{name}_bucket", {"le": "0.001"}) == 2  # 0.001 itself is "le 0.001"
    assert sample(f"{name}_bucket", {"le": "0.0025"}) == 3
    assert sample(f"{name}_bucket", {"le": "0.5"}) == 4
    assert sample(f"{name}_bucket", {"le": "10.0"}) == 4
    assert sample(f"{name}_bucket", {"le": "+Inf"}) == 5
    assert sample(f"{name}_count") == 5
    assert sample(f"{name}_sum") == 0.0005 + 0.001 + 0.0011 + 0.3 + 11.0


def test_the_exposition_names_the_histogram_and_counter_as_before() -> None:
    metrics = BridgeMetrics()
    metrics.count_request("POST", "accepted")
    metrics.ack_latency.observe(0.002)
    text = metrics.render().decode()
    assert "# TYPE wifi_bridge_requests_total counter" in text
    assert "# TYPE wifi_bridge_kafka_ack_seconds histogram" in text
    assert 'wifi_bridge_kafka_ack_seconds_bucket{le="0.0025"} 1.0' in text
