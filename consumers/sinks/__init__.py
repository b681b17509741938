"""Sinks: services that read canonical login records from Kafka and write them elsewhere."""
