"""What `make run` runs: the whole product on one machine (see `__main__`)."""
