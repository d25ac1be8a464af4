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
