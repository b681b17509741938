"""The Helm chart (deploy/helm/wifi-bridge), rendered by the real helm and checked against the code.

What the chart says must be what the services do: every variable it sets is one of the
settings of the command the container runs, every probe and scrape hits a port the service
listens on, every alert and dashboard query parses with Prometheus's own parser and selects
only metrics (and labels) the services export. Rendered objects are validated against the
Kubernetes API schemas.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from bridge import cli
from bridge.metrics import BridgeMetrics
from bridge.settings import BRIDGE_OPTIONS, KAFKA_OPTIONS, BridgeSettings
from bridge.spool import Spool
from consumers.pipeline.metrics import PipelineMetrics
from consumers.pipeline.settings import PIPELINE_OPTIONS, PipelineSettings
from consumers.sinks.analytics.metrics import AnalyticsMetrics
from consumers.sinks.analytics.settings import ANALYTICS_OPTIONS, AnalyticsSettings
from consumers.sinks.crm_metrics import CrmMetrics
from consumers.sinks.crm_settings import CRM_OPTIONS, CrmSettings
from tests.fixtures.tools import tool

# The first test may build helm (tests/fixtures/tools.py): minutes, once per machine.
pytestmark = pytest.mark.timeout(1200)

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "wifi-bridge"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
KUBERNETES_VERSION = "1.33.0"
MINIMAL = ("--set", "kafka.bootstrapServers=kafka:9092")
MONITORING = (
    "--set",
    "metrics.podMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.grafanaDashboard.enabled=true",
)
VARIANTS = {
    "defaults": MINIMAL,
    "defaults with monitoring": (*MINIMAL, *MONITORING),
    "every option": ("-f", str(FULL_VALUES)),
}
# The settings each command reads, and what else a container may be given.
SETTINGS = {
    "serve": {o.env for o in (*KAFKA_OPTIONS, *BRIDGE_OPTIONS)},
    "pipeline": {o.env for o in (*KAFKA_OPTIONS, *PIPELINE_OPTIONS)},
    "sink analytics": {o.env for o in (*KAFKA_OPTIONS, *ANALYTICS_OPTIONS)} | {"PGPASSWORD"},
    "sink crm": {o.env for o in (*KAFKA_OPTIONS, *CRM_OPTIONS)},
}
LOADERS: dict[str, Any] = {
    "serve": BridgeSettings.load,
    "pipeline": PipelineSettings.load,
    "sink analytics": AnalyticsSettings.load,
    "sink crm": CrmSettings.load,
}
# Labels Prometheus adds to every scraped series (target labels of a PodMonitor).
TARGET_LABELS = {"job", "namespace", "pod", "instance", "container", "endpoint", "service"}


def helm(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # the test's own command line
        [str(tool("helm")), *arguments], capture_output=True, text=True, check=False
    )


def render(*arguments: str) -> list[dict[str, Any]]:
    completed = helm("template", "wifi", str(CHART), "--namespace", "wifi", *arguments)
    assert completed.returncode == 0, completed.stderr
    return [doc for doc in yaml.safe_load_all(completed.stdout) if doc]


def of_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def containers(objects: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Any]]:
    """(StatefulSet, its container) for every workload the chart renders."""
    for workload in of_kind(objects, "StatefulSet"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload, container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_chart_lints_clean(variant: str) -> None:
    completed = helm("lint", "--strict", str(CHART), *VARIANTS[variant])
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_is_valid_for_the_kubernetes_api(variant: str) -> None:
    objects = render(*VARIANTS[variant])
    assert {"StatefulSet", "Service"} <= {o["kind"] for o in objects}
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator resources: no schema here, checked below
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


# SASL credentials through every component's secretEnv instead of kafka.sasl.existingSecret.
SASL_SECRET_ENV = tuple(
    item
    for component in ("bridge", "pipeline", "crm", "analytics")
    for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")
    for item in (
        "--set",
        f"{component}.secretEnv.{name}.secret=kafka-user",
        "--set",
        f"{component}.secretEnv.{name}.key={name.rsplit('_', 1)[1].lower()}",
    )
)


def test_sasl_credentials_may_come_through_each_components_secret_env() -> None:
    objects = render(*MINIMAL, "--set", "kafka.securityProtocol=SASL_SSL", *SASL_SECRET_ENV)
    for _, container in containers(objects):
        assert {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"} <= set(env_of(container))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ((), "kafka.bootstrapServers is required"),
        ((*MINIMAL, "--set", "analytics.replicas=2"), "analytics.replicas must be 1"),
        ((*MINIMAL, "--set", "analytics.url=mysql://x"), "analytics.url must be"),
        ((*MINIMAL, "--set", "crm.target=salesforce"), "crm.target must be outbox"),
        ((*MINIMAL, "--set", "crm.target=hubspot"), "crm.existingSecret is required"),
        (
            (*MINIMAL, "--set", "crm.target=webhook", "--set", "crm.existingSecret=s"),
            "crm.webhookUrl is required",
        ),
        ((*MINIMAL, "--set", "pipeline.replicas=13"), "pipeline.replicas (13) must not exceed"),
        ((*MINIMAL, "--set", "bridge.spool.maxBytes=100"), "bridge.spool.maxBytes must be"),
        ((*MINIMAL, "--set", "bridge.spool.maxBytes=1048575"), "bridge.spool.maxBytes must be"),
        (
            (*MINIMAL, "--set", "bridge.spool.maxBytes=4294967296"),
            "bridge.spool.maxBytes (4294967296) must be at least 64 MiB smaller than "
            "bridge.spool.volumeSize (2Gi",
        ),
        (
            (*MINIMAL, "--set", "bridge.spool.volumeSize=500M"),
            "smaller than bridge.spool.volumeSize (500M, 500000000 bytes)",
        ),
        (
            (*MINIMAL, "--set", "kafka.securityProtocol=SASL_SSL"),
            "kafka.sasl.existingSecret is required with kafka.securityProtocol=SASL_SSL",
        ),
        (
            (*MINIMAL, "--set", "kafka.securityProtocol=SASL_SSL", *SASL_SECRET_ENV[:-4]),
            "(or KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD in analytics.secretEnv)",
        ),
        (
            (*MINIMAL, "--set", "kafka.replicationFactor=1"),
            "kafka.minInsyncReplicas (2) cannot exceed kafka.replicationFactor (1)",
        ),
        ((*MINIMAL, "--set", "bridge.maxBodyBytes=100"), "/bridge/maxBodyBytes"),
        ((*MINIMAL, "--set", "bridge.maxBodyBytes=983041"), "/bridge/maxBodyBytes"),
        ((*MINIMAL, "--set", "bridge.shutdownTimeoutSeconds=0"), "/bridge/shutdownTimeoutSeconds"),
        (
            (*MINIMAL, "--set", "bridge.secretEnv.BRIDGE_TOKEN.key=token"),
            "secretEnv.BRIDGE_TOKEN.secret is required",
        ),
        # values.schema.json: types and choices, checked before any template runs
        ((*MINIMAL, "--set", "pipeline.replicas=two"), "/pipeline/replicas"),
        ((*MINIMAL, "--set", "kafka.securityProtocol=SASL"), "/kafka/securityProtocol"),
        ((*MINIMAL, "--set", "bridge.ackTimeoutMs=20000"), "/bridge/ackTimeoutMs"),
        ((*MINIMAL, "--set", "bridge.env.bridge_port=1"), "/bridge"),
        ((*MINIMAL, "--set", "bridge.webhookPath=hooks"), "/bridge/webhookPath"),
    ],
)
def test_values_it_cannot_run_with_are_refused_naming_the_value(
    values: tuple[str, ...], message: str
) -> None:
    completed = helm("template", "wifi", str(CHART), *values)
    assert completed.returncode != 0
    assert message in completed.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variable_set_is_a_setting_of_the_command_the_container_runs(
    variant: str,
) -> None:
    commands = set()
    for _, container in containers(render(*VARIANTS[variant])):
        command = " ".join(container["args"])
        commands.add(command)
        unknown = set(env_of(container)) - SETTINGS[command]
        assert not unknown, f"{command}: not settings of the service: {sorted(unknown)}"
    assert commands == set(SETTINGS)


# Numbers as YAML holds them (floats to helm): each must reach the service as a whole number.
LARGE_NUMBERS = (
    "--set",
    "bridge.spool.maxBytes=4294967296",
    "--set",
    "bridge.spool.volumeSize=5Gi",
    "--set",
    "bridge.maxBodyBytes=983040",
    "--set",
    "bridge.env.BRIDGE_LINGER_MS=1000",
    "--set",
    "kafka.replicationFactor=1",
    "--set",
    "kafka.minInsyncReplicas=1",
)


def _stand_in(name: str) -> str:
    """A value for a variable the pod gets from a secret or from its own metadata."""
    return "https://crm.example.invalid" if name.endswith("_URL") else "from-a-secret-or-the-pod"


@pytest.mark.parametrize("variant", [*VARIANTS, "large numbers"])
def test_every_container_environment_loads_with_the_settings_of_its_service(
    variant: str, tmp_path: Path
) -> None:
    """What a pod would do first: load its settings. A refused value would crash-loop it."""
    values = VARIANTS.get(variant, (*MINIMAL, *LARGE_NUMBERS))
    for _, container in containers(render(*values)):
        command = " ".join(container["args"])
        environ = {
            name: value if isinstance(value, str) else _stand_in(name)
            for name, value in env_of(container).items()
        }
        for name, value in environ.items():
            if value.startswith("/etc/wifi-bridge/"):  # a file of a mounted secret: stand in
                environ[name] = str(tmp_path / Path(value).name)
                Path(environ[name]).write_text("stands in for the mounted secret")
        try:
            LOADERS[command](None, environ)
        except Exception as exc:
            pytest.fail(f"{variant}: {command} refuses its environment: {exc}")


def test_every_container_runs_a_command_the_image_has(capsys: pytest.CaptureFixture[str]) -> None:
    for _, container in containers(render("-f", str(FULL_VALUES))):
        with pytest.raises(SystemExit) as exited:
            cli.main([*container["args"], "--help"])
        assert exited.value.code == 0, container["args"]
        assert "usage: wifi-bridge " + " ".join(container["args"]) in capsys.readouterr().out


def test_probes_and_scrapes_reach_the_ports_the_services_listen_on() -> None:
    objects = render(*MINIMAL, *MONITORING)
    listening = {}
    for workload, container in containers(objects):
        env = env_of(container)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        command = " ".join(container["args"])
        port_setting = {
            "serve": "BRIDGE_PORT",
            "pipeline": "PIPELINE_METRICS_PORT",
            "sink analytics": "ANALYTICS_METRICS_PORT",
            "sink crm": "CRM_METRICS_PORT",
        }[command]
        (port,) = ports.values()
        assert int(env[port_setting]) == port, command
        for probe in ("readinessProbe", "livenessProbe"):
            action = container[probe].get("httpGet") or container[probe]["tcpSocket"]
            assert action["port"] in ports, (command, probe)
            if "httpGet" in container[probe]:
                assert action["path"] == "/healthz", (command, probe)
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        listening[component] = set(ports)
    monitors = of_kind(objects, "PodMonitor")
    assert len(monitors) == 4
    for monitor in monitors:
        component = monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in listening[component]
        assert endpoint["path"] == "/metrics"


def test_the_bridge_stays_in_service_while_kafka_is_down() -> None:
    """Readiness must not follow Kafka: a bridge without Kafka answers 200 from its spool."""
    (bridge,) = [c for _, c in containers(render(*MINIMAL)) if c["args"] == ["serve"]]
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "/readyz" not in orjson.dumps(bridge).decode()


def test_each_bridge_pod_keeps_its_spool_on_its_own_volume() -> None:
    (workload,) = [w for w, c in containers(render(*MINIMAL)) if c["args"] == ["serve"]]
    (bridge,) = workload["spec"]["template"]["spec"]["containers"]
    spool_dir = env_of(bridge)["BRIDGE_SPOOL_DIR"]
    (claim,) = workload["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in bridge["volumeMounts"]}
    assert mounts[spool_dir] == claim["metadata"]["name"]
    assert bridge["securityContext"]["readOnlyRootFilesystem"] is True


def test_shutdown_grace_outlasts_the_bridge_drain() -> None:
    (workload,) = [w for w, c in containers(render(*MINIMAL)) if c["args"] == ["serve"]]
    spec = workload["spec"]["template"]["spec"]
    (bridge,) = spec["containers"]
    drain_s = int(env_of(bridge)["BRIDGE_SHUTDOWN_TIMEOUT_S"])
    pause_s = bridge["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > drain_s + pause_s


def test_pipeline_instances_are_named_after_their_stable_pods() -> None:
    (pipeline,) = [c for _, c in containers(render(*MINIMAL)) if c["args"] == ["pipeline"]]
    instance = env_of(pipeline)["PIPELINE_INSTANCE_ID"]
    assert instance == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_duckdb_analytics_lives_on_a_volume_and_postgresql_needs_none() -> None:
    def analytics(*values: str) -> tuple[dict[str, Any], dict[str, Any]]:
        (found,) = [
            (w, c) for w, c in containers(render(*MINIMAL, *values)) if c["name"] == "analytics"
        ]
        return found

    workload, container = analytics()
    url = env_of(container)["ANALYTICS_URL"]
    store = AnalyticsSettings.load(None, {"ANALYTICS_URL": url}).store
    assert store.path is not None
    assert store.path.is_absolute()
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(store.path.is_relative_to(mount) for mount in mounts), (store.path, mounts)
    assert workload["spec"]["volumeClaimTemplates"]
    workload, container = analytics("--set", "analytics.url=postgresql://u@db/wifi")
    assert env_of(container)["ANALYTICS_URL"] == "postgresql://u@db/wifi"
    assert "volumeClaimTemplates" not in workload["spec"]


# --------------------------------------------------------------------------------------------
# Alerts and the dashboard


def exported_metrics(tmp_path: Path) -> dict[str, set[str]]:
    """Every sample name the four services export, with the labels it carries."""
    registries: list[CollectorRegistry] = []
    bridge = BridgeMetrics()
    bridge.watch_spool(Spool(directory=tmp_path / "spool"))
    # Requests are counted by a collector of the bridge's own, which exports a labelled
    # series once a request has been seen (as a labelled prometheus-client counter does).
    bridge.count_request("POST", "accepted")
    registries.append(bridge.registry)
    for metrics in (PipelineMetrics(), AnalyticsMetrics(), CrmMetrics()):
        registries.append(metrics.registry)
    exported: dict[str, set[str]] = {"up": set()}
    for registry in registries:
        collectors = list(registry._collector_to_names)  # every collector (a private map)
        for collector in collectors:
            if isinstance(collector, MetricWrapperBase):
                _add_wrapper(exported, collector)
                continue
            for family in collector.collect():
                for sample in family.samples:
                    exported.setdefault(sample.name, set()).update(sample.labels)
    return exported


def _add_wrapper(exported: dict[str, set[str]], metric: MetricWrapperBase) -> None:
    name, kind = metric._name, str(metric._type)  # private, but the only way to see labels
    labels = set(metric._labelnames)
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
    }[kind]
    for suffix in suffixes:
        exported[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())


def promcheck(rules: str, expressions: list[str]) -> dict[str, Any]:
    completed = subprocess.run(  # the test's own command line
        [str(tool("promcheck"))],
        input=orjson.dumps({"rules": rules, "expressions": expressions}),
        capture_output=True,
        check=True,
    )
    result: dict[str, Any] = orjson.loads(completed.stdout)
    return result


def dashboard_expressions() -> list[str]:
    dashboard = orjson.loads((CHART / "files" / "dashboard.json").read_bytes())
    expressions = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            # Grafana's variables, as Grafana substitutes them before Prometheus sees the query.
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$namespace", "wifi")
            expressions.append(expr)
    return expressions


def test_alerts_and_dashboard_parse_and_select_only_what_the_services_export(
    tmp_path: Path,
) -> None:
    (rule,) = of_kind(render(*MINIMAL, *MONITORING), "PrometheusRule")
    rules = yaml.safe_dump({"groups": rule["spec"]["groups"]})
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    checked = promcheck(rules, expressions)
    assert checked["errors"] == []
    alert_count = sum(len(group["rules"]) for group in rule["spec"]["groups"])
    assert len(checked["selectors"]) == alert_count + len(set(expressions))
    exported = exported_metrics(tmp_path)
    for expression, selectors in checked["selectors"].items():
        for selector in selectors:
            metric = selector["metric"]
            assert metric in exported, f"{metric} is not exported (in {expression})"
            unknown = set(selector["labels"]) - exported[metric] - TARGET_LABELS
            assert not unknown, f"{metric} has no label {sorted(unknown)} (in {expression})"


def test_promcheck_catches_a_broken_expression_and_an_unknown_field() -> None:
    """The check above can fail: a typo in PromQL or in the rule file is reported."""
    checked = promcheck(
        "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: up ==\n    forr: 5m\n",
        ["sum(rate(wifi_bridge_requests_total[5m])"],
    )
    assert any("rules:" in error for error in checked["errors"])
    assert any("sum(rate(" in error for error in checked["errors"])


def test_every_alert_has_a_severity_and_a_summary() -> None:
    (rule,) = of_kind(render(*MINIMAL, *MONITORING), "PrometheusRule")
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert len(alerts) >= 15
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]


@pytest.mark.parametrize(
    ("lateness", "threshold"),
    [
        (None, 120 + 900),
        (("--set", "pipeline.env.PIPELINE_LATENESS_S=900"), 900 + 900),  # a YAML number
        (
            ("--set-string", "pipeline.env.PIPELINE_LATENESS_S=0900"),
            900 + 900,
        ),  # as Python reads it
        (("--set-string", "pipeline.env.PIPELINE_LATENESS_S= 600"), 600 + 900),
        (("--set", "pipeline.env.PIPELINE_LATENESS_S=0"), 0 + 900),
    ],
)
def test_the_stalled_pipeline_alert_waits_beyond_the_lateness_a_caught_up_watermark_rests_at(
    lateness: tuple[str, str] | None, threshold: int
) -> None:
    values = lateness or ()
    (rule,) = of_kind(render(*MINIMAL, *MONITORING, *values), "PrometheusRule")
    (stalled,) = [
        r
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "WifiPipelineStalled"
    ]
    assert stalled["expr"].endswith(f"> {threshold}")


@pytest.mark.parametrize("size", ["0.5Gi", "5e8"])  # smaller than the 1 GiB cap, if it were read
def test_a_volume_size_spelled_as_a_fraction_or_exponent_is_left_to_kubernetes(size: str) -> None:
    assert of_kind(render(*MINIMAL, "--set", f"bridge.spool.volumeSize={size}"), "StatefulSet")


def test_the_kubernetes_manifests_in_the_readme_are_valid_and_run_a_real_command() -> None:
    readme = (CHART.parents[2] / "README.md").read_text()
    blocks = [
        "\n".join(line.removeprefix("  ") for line in block.splitlines())
        for block in re.findall(r"^ *```yaml\n(.*?)^ *```", readme, re.S | re.M)
    ]
    manifests = [doc for block in blocks for doc in yaml.safe_load_all(block) if "kind" in doc]
    assert manifests, "the README shows no Kubernetes manifest"
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        for container in manifest["spec"]["template"]["spec"]["containers"]:
            # The image's entrypoint is wifi-bridge: the args must be one of its commands.
            with pytest.raises(SystemExit) as done:
                cli.main([*container["args"], "--help"])
            assert done.value.code == 0, container["args"]


def test_the_spool_collector_is_exported_without_an_open_spool(tmp_path: Path) -> None:
    """exported_metrics() reads the spool's gauges from a spool that was never opened."""
    exported = exported_metrics(tmp_path)
    assert "wifi_bridge_spool_bytes" in exported
    assert "wifi_pipeline_transactions_total" in exported
    assert "result" in exported["wifi_pipeline_transactions_total"]


# --------------------------------------------------------------------------------------------
# The image's install step (deploy/Dockerfile), as far as it can run without a container engine


def test_the_wheel_the_image_installs_holds_every_package_the_services_load(
    tmp_path: Path,
) -> None:
    """deploy/Dockerfile installs the project's wheel: it must carry the code and the schema."""
    root = CHART.parents[2]
    # What the Dockerfile copies into its build stage, built away from the checkout (setuptools
    # leaves build/ and *.egg-info beside the sources it builds).
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for package in ("bridge", "consumers", "simulator"):
        shutil.copytree(
            root / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    wheels = tmp_path / "wheels"
    subprocess.run(  # the test's own command line
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "--wheel-dir",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("wifi_bridge-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "wifi-bridge = bridge.cli:main" in archive.read(entry_points).decode()
    for module in (
        "bridge/cli.py",
        "consumers/pipeline/service.py",
        "consumers/pipeline/schema/login.v1.json",
        "consumers/sinks/analytics/service.py",
        "consumers/sinks/crm.py",
        "simulator/__init__.py",
    ):
        assert module in names, module
    dockerfile = (root / "deploy" / "Dockerfile").read_text()
    for package in ("bridge", "consumers", "simulator"):
        assert f"COPY {package} {package}" in dockerfile
