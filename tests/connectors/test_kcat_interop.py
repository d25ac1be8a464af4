"""Interoperability with a Kafka client written by others: kcat (librdkafka) produces the events the monitor
consumes, and consumes the alerts it publishes."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest

from monitor.broker import LocalBroker, free_port
from tests.support.apiversions_shim import ApiVersionsShim
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import ServiceProcess, create_topics

pytestmark = pytest.mark.skipif(shutil.which("kcat") is None and not __import__("os").environ.get("CI"),
                                reason="kcat not installed (Debian package kcat; .ci/run installs it)")


def test_kcat_produces_events_and_consumes_alerts(tmp_path):
    header, events = load_scenario(SHARED / "scenarios" / "13_excl_neutropenia_si_units.jsonl")
    tag = uuid.uuid4().hex[:8]
    topics = {"events": f"kcat-events-{tag}", "alerts": f"kcat-alerts-{tag}", "dead": f"kcat-dead-{tag}"}
    shim_port = free_port()
    with LocalBroker(advertised_port=shim_port, log_path=tmp_path / "broker.log") as broker:
        shim = ApiVersionsShim(upstream_port=broker.port, listen_port=shim_port).start()
        create_topics(broker.bootstrap, {topics["events"]: 2, topics["alerts"]: 2, topics["dead"]: 1})
        lines = "".join(f"{e['subject_id']}\t{json.dumps(e)}\n" for e in events)
        subprocess.run(["kcat", "-P", "-b", broker.bootstrap, "-t", topics["events"], "-K", "\t"],
                       input=lines.encode(), check=True, timeout=60)
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"kcat-{tag}",
                                 log=tmp_path / "service.log").start()
        try:
            got: list[dict] = []
            for _ in range(30):
                out = subprocess.run(["kcat", "-C", "-b", broker.bootstrap, "-t", topics["alerts"], "-e", "-q",
                                      "-f", "%k\t%s\n"], capture_output=True, timeout=60)
                got = [json.loads(line.split("\t", 1)[1]) for line in out.stdout.decode().splitlines() if "\t" in line]
                if any(a["rule"] == "ELIG-NEUTROPENIA" for a in got):
                    break
                __import__("time").sleep(1)
        finally:
            assert service.stop() == 0
            shim.stop()
    hits = [a for a in got if a["rule"] == "ELIG-NEUTROPENIA"]
    assert len(hits) == 1 and hits[0]["subject_id"] == header["expected_alerts"][0]["subject"]
    assert hits[0]["evidence"]["events"]
