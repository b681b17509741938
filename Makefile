# Everything a newcomer needs: `make run` starts the product locally, `make test` tests it.
# Both install what they need first (a virtualenv in .venv, the Kafka jars on first use).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KAFKA_PORT ?= 9092
KAFKA_DATA_DIR ?= .kafka-data
export KAFKA_PORT KAFKA_DATA_DIR

.PHONY: install lint test test-unit tools postgres-binaries run kafka-up kafka-down bench bench-receiver bench-pipeline bench-analytics clean docs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint postgres-binaries
	$(BIN)/python -m pytest

# helm and promcheck for the chart's tests (deploy/helm), built with Go and cached in
# ~/.cache/wifi-bridge/tools: a few minutes the first time, nothing afterwards. The tests
# build them on first use too; this target builds them ahead.
tools: install
	@if command -v go >/dev/null; then $(BIN)/python -m devtools; \
	else echo "no Go toolchain: the Helm chart's tests will be skipped (CI=true fails them)"; fi

# The analytics tests start a throwaway PostgreSQL cluster from the server binaries.
postgres-binaries:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| { [ "$$(id -u)" = 0 ] && echo "installing PostgreSQL (Debian package)" \
			&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
		|| { echo "make test needs PostgreSQL's server binaries: apt-get install postgresql"; exit 2; }

test-unit: install
	$(BIN)/python -m pytest tests/unit

kafka-up: install
	@if [ -n "$$KAFKA_BOOTSTRAP_SERVERS" ]; then \
		echo "KAFKA_BOOTSTRAP_SERVERS=$$KAFKA_BOOTSTRAP_SERVERS is set: using that cluster"; \
	else \
		$(BIN)/python -m devkafka up; \
	fi

kafka-down: install
	$(BIN)/python -m devkafka down

run: kafka-up
	KAFKA_BOOTSTRAP_SERVERS=$${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$(KAFKA_PORT)} \
		$(BIN)/python -m devstack

bench: bench-receiver bench-pipeline bench-analytics

bench-receiver: install
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q wrk >/dev/null; } \
		|| { echo "make bench needs wrk: apt-get install wrk"; exit 2; }
	$(BIN)/python -m bench receiver

bench-pipeline: install
	$(BIN)/python -m bench pipeline

bench-analytics: install
	$(BIN)/python -m bench analytics

clean: kafka-down
	rm -rf $(KAFKA_DATA_DIR) .pytest_cache .mypy_cache .ruff_cache

docs: install
	$(BIN)/python -c 'import re, pathlib; from bridge.cli import settings_markdown; \
		p = pathlib.Path("README.md"); t = p.read_text(); \
		t = re.sub(r"(<!-- settings:begin.*?-->\n).*?(<!-- settings:end -->)", \
		lambda m: m.group(1) + settings_markdown() + m.group(2), t, flags=re.S); p.write_text(t)'
