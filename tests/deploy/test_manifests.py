"""What can be checked here of the files that cannot run here (no Docker engine, no Kubernetes, no Grafana)."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_runs_kafka_monitor_prometheus_alertmanager_grafana_with_files_that_exist():
    doc = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    assert {"kafka", "monitor", "prometheus", "alertmanager", "grafana"} <= set(doc["services"])
    assert doc["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    for service in doc["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DEPLOY / "compose" / source).resolve().exists(), volume
    build = doc["services"]["monitor"]["build"]
    assert (DEPLOY / "compose" / build["context"] / build["dockerfile"]).resolve().is_file()


def test_dockerfile_is_multi_stage_on_python_312_bookworm():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("FROM python:3.12-slim-bookworm") == 2 and "AS build" in text
    assert "gcc" in text.split("FROM python:3.12-slim-bookworm\n")[0]  # compiled in the build stage only


def test_kubernetes_deployment_scales_in_one_group_with_probes_and_scrape_annotations():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "monitor.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert deployment["spec"]["replicas"] > 1 and env["PROTOCOL_MONITOR_GROUP_ID"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert any(d["kind"] == "Service" for d in docs)
    monitor = yaml.safe_load((DEPLOY / "kubernetes" / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"


def test_compose_serves_the_inbox_on_loopback_with_a_store_filled_by_the_notifier():
    doc = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = doc["services"]
    inbox, notify = services["inbox"], services["notify"]
    assert inbox["entrypoint"] == ["protocol-monitor", "serve"] and notify["entrypoint"] == ["protocol-monitor", "notify"]
    assert inbox["environment"]["PROTOCOL_MONITOR_STORE"] == notify["environment"]["PROTOCOL_MONITOR_STORE"]
    assert inbox["ports"] == ["127.0.0.1:8080:8080"]
    assert inbox["environment"]["PROTOCOL_MONITOR_WEB__SESSION_SECRET_FILE"].startswith("/run/secrets/")
    assert "SESSION_SECRET" not in " ".join(k for k in inbox["environment"] if not k.endswith("_FILE"))
    assert "inbox_session_secret" in doc["secrets"]


def test_kubernetes_inbox_reads_its_secrets_from_secrets_and_probes_healthz():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "inbox.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["protocol-monitor", "serve"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["PROTOCOL_MONITOR_STORE"]["valueFrom"]
    assert "PROTOCOL_MONITOR_WEB__SESSION_SECRET" not in env
    assert env["PROTOCOL_MONITOR_WEB__COOKIE_SECURE"]["value"] == "true"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert deployment["spec"]["replicas"] == 1  # sessions live in the server's memory
    assert any(d["kind"] == "Service" for d in docs)


def test_the_inbox_settings_of_the_manifests_are_settings_the_model_knows():
    from monitor.config import Settings, WebSettings

    names = set()
    for path in (DEPLOY / "compose" / "docker-compose.yml", DEPLOY / "kubernetes" / "inbox.yaml"):
        names |= set(__import__("re").findall(r"PROTOCOL_MONITOR_(\w+)", path.read_text()))
    for name in names:
        if name.startswith("WEB__"):
            assert name[5:].lower() in WebSettings.model_fields, name
        else:
            assert name.split("__")[0].lower() in Settings.model_fields, name
