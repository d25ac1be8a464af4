"""A real Prometheus (Debian package) on loopback scrapes a running monitor fed by the test broker: every PromQL
expression of the dashboards and alerting rules parses, and the dashboard queries return series."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from monitor.broker import LocalBroker, free_port
from monitor.generate import generate
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import ServiceProcess, create_topics, events_as_records, produce, read_topic

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None and not os.environ.get("CI"),
                                reason="prometheus not installed (Debian package; .ci/run installs it)")


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = (target["expr"].replace("$__rate_interval", "1m").replace("$site", ".*")
                        .replace("$rule", ".*").replace("$kri", ".*"))
                out.append((f"{path.stem}: {panel['title']}", expr))
    return out


def rule_expressions() -> list[tuple[str, str]]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "protocol-monitor.rules.yml").read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(urllib.request.urlopen(url, timeout=10).read())
    except urllib.error.HTTPError as exc:  # 400 = the expression does not parse
        return json.loads(exc.read())


def test_dashboards_and_rules_against_a_real_prometheus(tmp_path):
    header, events = load_scenario(SHARED / "scenarios" / "06_overdose_above_8mgkg.jsonl")
    _, more = load_scenario(SHARED / "scenarios" / "21_late_dose_record_retracts_alert.jsonl")
    # two sites with enough participants (>= 3, 30 days) for the site-risk scores and funnel limits to exist
    more += list(generate(subjects=9, days=2, seed=5, sites=2))
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"prom-events-{tag}", "alerts": f"prom-alerts-{tag}", "dead": f"prom-dead-{tag}"}
    metrics_port, prom_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "protocol-monitor.rules.yml")],
        "scrape_configs": [{"job_name": "protocol-monitor",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with LocalBroker(log_path=tmp_path / "broker.log") as broker:
        create_topics(broker.bootstrap, {topics["events"]: 2, topics["alerts"]: 2, topics["dead"]: 1})
        produce(broker.bootstrap, topics["events"], events_as_records(events + more) + [(b"X", b"{broken")])
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"prom-{tag}",
                                 log=tmp_path / "service.log", extra=["--metrics-port", str(metrics_port)]).start()
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=(tmp_path / "prometheus.log").open("wb"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{prom_port}"
        try:
            read_topic(broker.bootstrap, topics["alerts"], timeout_s=60, until=lambda m: any(
                json.loads(x.value)["rule"] == "DOSE-MAX-EXCEEDED" for x in m))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # scraped, and enough samples for the rate() windows
                result = query(base, "count_over_time(protocol_monitor_events_consumed_total[1m])")
                if result.get("status") == "success" and result["data"]["result"] and max(
                        float(r["value"][1]) for r in result["data"]["result"]) >= 5:
                    break
                time.sleep(1)
            empty = []
            for title, expr in dashboard_queries():
                result = query(base, expr)
                assert result["status"] == "success", f"{title}: {expr}: {result.get('error')}"
                if not result["data"]["result"]:
                    empty.append(f"{title}: {expr}")
            assert not empty, "dashboard queries with no series:\n" + "\n".join(empty)
            for name, expr in rule_expressions():
                result = query(base, expr)
                assert result["status"] == "success", f"{name}: {result.get('error')}"
            rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10).read())
            loaded = {r["name"]: r["health"] for g in rules["data"]["groups"] for r in g["rules"]}
            assert set(loaded) == {n for n, _ in rule_expressions()} and set(loaded.values()) == {"ok"}
            values = json.loads(urllib.request.urlopen(f"{base}/api/v1/label/site/values", timeout=10).read())
            assert header["expected_alerts"] and "FR-BIC-01" in values["data"]  # the $site variable's source
        finally:
            prom.send_signal(signal.SIGTERM)
            prom.wait(timeout=30)
            assert service.stop() == 0
