"""Receiver for BT Wi-Fi login webhooks: authenticate, bound, publish to Kafka."""

__version__ = "0.1.0"
