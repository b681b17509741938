"""A simulator of the BT Wi-Fi sender: realistic, reproducible webhook traffic for a bridge."""
