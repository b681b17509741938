"""The ``wifi-bridge pipeline`` service: raw login bodies in, canonical login records out.

Pure stages (normalisation, visit windows) live in their own modules and take explicit time and
state, so they are tested without a broker; only the service shell talks to Kafka.
"""
