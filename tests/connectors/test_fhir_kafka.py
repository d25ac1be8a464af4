"""FHIR R4 in (issue 18) through a real Kafka-protocol broker on loopback: `run --input-format fhir` on the
scenarios the flat live test uses, and the Subscription endpoint over real HTTP on loopback."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

import pytest

from monitor.broker import LocalBroker, free_port
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import (
    ServiceProcess, alert_records, assert_scenarios_alerted, create_topics, final_pairs, produce, read_topic,
    same_local_clock, shift_events, wait_until_consumed)
from tests.connectors.test_kafka_service import GRACE, LIVE_SCENARIOS, _age_boundary, _topics
from tests.support.fhirconv import to_fhir_lines


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with LocalBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as b:
        yield b


def _keyed(lines: list[str]) -> list[tuple[bytes | None, bytes]]:
    out = []
    for line in lines:
        first = json.loads(line)["entry"][0]["resource"]
        subject = first.get("subject") or first.get("patient") or first.get("individual")
        out.append((subject["identifier"]["value"].encode(), line.encode()))
    return out


BAD_FHIR = [
    (json.dumps({"resourceType": "Observation", "id": "x1", "status": "final",
                 "meta": {"lastUpdated": "2025-01-06T08:00:00+01:00",
                          "tag": [{"system": "urn:anacomp:site", "code": "FR-BIC-01"}]},
                 "code": {"coding": [{"system": "http://loinc.org", "code": "99999-9"}]},
                 "subject": {"reference": "Patient/ANA-X"}, "effectiveDateTime": "2025-01-06T08:00:00+01:00",
                 "valueQuantity": {"value": 1, "code": "1"}}).encode(), "fhir_unknown_code", "Observation.code.coding"),
    (json.dumps({"resourceType": "MedicationStatement", "id": "m1", "status": "recorded",
                 "subject": {"reference": "Patient/ANA-X"},
                 "medication": {"concept": {"text": "aspirin"}}}).encode(), "fhir_not_r4",
     "MedicationStatement.medication"),
    (b"{not json", "malformed_json", "$"),
]


@pytest.mark.skipif(not (SHARED / "scenarios").is_dir(), reason="published scenarios not found")
def test_published_scenarios_as_fhir_through_kafka_give_the_flat_alert_sets(broker, tmp_path):
    """The scenarios the flat live test moves to now (test_kafka_service), as FHIR Bundles keyed by subject, with
    `run --input-format fhir` and the live clock: the same final alerts within each horizon as the flat form's
    expectation (which the flat live test checks); bad FHIR on the same topic goes to the dead letters with the
    original bytes, a reason and the path."""
    topics = _topics("fhir-live")
    create_topics(broker.bootstrap, {topics["events"]: 3, topics["alerts"]: 3, topics["dead"]: 1})
    now = dt.datetime.now(dt.timezone.utc)
    plans, records = [], []
    for name in LIVE_SCENARIOS:
        header, events = load_scenario(SHARED / "scenarios" / f"{name}.jsonl")
        horizon = dt.datetime.fromisoformat(header["evaluation_horizon"])
        days = (now - (horizon + GRACE)).days
        if not same_local_clock(events, days) or _age_boundary(header):
            continue
        plans.append((name, header, horizon + dt.timedelta(days=days), dt.timedelta(days=days)))
        records += _keyed(to_fhir_lines(shift_events(events, days)))
    assert len(plans) >= 5, f"only {len(plans)} scenarios could be moved to now without a clock change"
    produce(broker.bootstrap, topics["events"], records[:3] + [(b"ANA-X", v) for v, _, _ in BAD_FHIR] + records[3:])

    def complete(messages):
        final = {(r["rule"], r["subject_id"]) for r in final_pairs(alert_records(messages))}
        return all((a["rule"], a["subject"]) in final for _, h, _, _ in plans for a in h["expected_alerts"])

    group = f"g-{uuid.uuid4().hex[:6]}"
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=group, log=tmp_path / "service.log",
                             extra=["--input-format", "fhir"]).start()
    try:
        read_topic(broker.bootstrap, topics["alerts"], until=complete, timeout_s=180)
        assert wait_until_consumed(broker.bootstrap, group, topics["events"], timeout_s=180)
        messages = read_topic(broker.bootstrap, topics["alerts"], timeout_s=30)
        dead = read_topic(broker.bootstrap, topics["dead"], until=lambda m: len(m) >= len(BAD_FHIR), timeout_s=60)
    finally:
        assert service.stop() == 0, (tmp_path / "service.log").read_text()[-2000:]
    records_out = alert_records(messages)
    assert Counter((r["alert_id"], r["status"]) for r in records_out).most_common(1)[0][1] == 1, "a record twice"
    final = final_pairs(records_out)
    assert_scenarios_alerted(final, plans, records_out)
    some = next(r for r in final if r["evidence"].get("events"))
    source = some["evidence"]["sources"][some["evidence"]["events"][0]]
    assert source["topic"] == topics["events"] and source["resource_type"] and source["version"] == "1"
    assert [m.value for m in dead] == [v for v, _, _ in BAD_FHIR]
    for message, (_, reason, path) in zip(dead, BAD_FHIR):
        headers = dict(message.headers)
        assert headers["reason"].decode() == reason
        assert headers["detail"].decode().startswith(path + ": ")
    log = (tmp_path / "service.log").read_text()
    assert "ANA-" not in log  # no subject id in the service's log


# ---- the Subscription endpoint ------------------------------------------------------------------------------------
def _status(kind: str, events: int = 0) -> dict:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": "Subscription/anacomp-site-1"}},
        {"name": "topic", "valueCanonical": "https://anacomp.example.org/fhir/SubscriptionTopic/clinical-events"},
        {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(events)}]}


def _notification(kind: str, resources: list[dict] = ()) -> bytes:
    entries = [{"fullUrl": "urn:uuid:" + uuid.uuid4().hex, "resource": _status(kind, len(resources))}]
    entries += [{"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r,
                 "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                 "response": {"status": "200"}} for r in resources]
    return json.dumps({"resourceType": "Bundle", "id": uuid.uuid4().hex, "type": "history",
                       "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(), "entry": entries}).encode()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/fhir+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_subscription_endpoint_handshake_heartbeat_event_notification_and_a_malformed_one(broker, tmp_path):
    topics = _topics("fhir-sub")
    create_topics(broker.bootstrap, {topics["events"]: 2, topics["alerts"]: 1, topics["dead"]: 1})
    header, events = load_scenario(SHARED / "scenarios" / "13_excl_neutropenia_si_units.jsonl")
    resources = [entry["resource"] for line in to_fhir_lines(events) for entry in json.loads(line)["entry"]]
    port = free_port()
    url = f"http://127.0.0.1:{port}/fhir/subscription"
    endpoint_log = (tmp_path / "endpoint.log").open("ab")
    endpoint = subprocess.Popen([sys.executable, "-m", "monitor", "fhir-subscription", "--port", str(port),
                                 "--bootstrap-servers", broker.bootstrap, "--events-topic", topics["events"]],
                                stdout=endpoint_log, stderr=subprocess.STDOUT)
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics, group=f"g-{uuid.uuid4().hex[:6]}",
                             log=tmp_path / "service.log", extra=["--input-format", "fhir"]).start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/stats", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "endpoint.log").read_text()
                time.sleep(0.2)
        assert _post(url, _notification("handshake")) == (200, {"type": "handshake", "accepted": True})
        assert _post(url, _notification("heartbeat")) == (200, {"type": "heartbeat", "accepted": True})
        status, answer = _post(url, _notification("event-notification", resources))
        assert status == 200 and answer["resources"] == len(resources), answer
        bad = json.loads(_notification("event-notification", resources[:1]))
        bad["type"] = "collection"
        status, answer = _post(url, json.dumps(bad).encode())
        assert status == 400 and answer["reason"].startswith("Bundle.type: "), answer
        status, answer = _post(url, b"{nope")
        assert status == 400 and "not valid JSON" in answer["reason"], answer
        no_status = json.loads(_notification("event-notification", resources[:1]))
        del no_status["entry"][0]
        no_status["entry"][0]["resource"] = {"resourceType": "Observation"}
        status, answer = _post(url, json.dumps(no_status).encode())
        assert status == 400 and answer["reason"].startswith("Bundle.entry[0].resource"), answer
        stats = json.loads(urllib.request.urlopen(url + "/stats", timeout=5).read())
        assert stats == {"handshake": 1, "heartbeat": 1, "event-notification": 1, "resources": len(resources),
                         "refused": 3}
        produced = read_topic(broker.bootstrap, topics["events"], until=lambda m: len(m) >= 1, timeout_s=30)
        subject = header["expected_alerts"][0]["subject"]
        assert {m.key for m in produced} == {subject.encode()}  # keyed by subject; handshake/heartbeat produce none
        alerts = read_topic(broker.bootstrap, topics["alerts"], until=lambda m: any(
            json.loads(x.value)["rule"] == "ELIG-NEUTROPENIA" for x in m), timeout_s=60)
    finally:
        endpoint.terminate()
        endpoint.wait(timeout=30)
        endpoint_log.close()
        assert service.stop() == 0, (tmp_path / "service.log").read_text()[-2000:]
    raised = [json.loads(m.value) for m in alerts]
    assert any(a["rule"] == "ELIG-NEUTROPENIA" and a["subject_id"] == subject for a in raised)
    assert subject not in (tmp_path / "endpoint.log").read_text()


def test_subscription_endpoint_over_https(tmp_path):
    """With --ssl-certfile/--ssl-keyfile the endpoint speaks HTTPS: a client trusting the CA gets its handshake
    answered; one that does not trust it is refused by TLS. (No broker: handshakes produce nothing.)"""
    import shutil
    import ssl

    from tests.connectors.test_secure_transport import _make_ca, _openssl

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    ca, ca_key = _make_ca(tmp_path, "fhir-test-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / "server.key", "-out",
             tmp_path / "server.csr", "-subj", "/CN=localhost")
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                      "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", tmp_path / "server.csr", "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", tmp_path / "server.pem", "-days", "2", "-extfile", tmp_path / "ext.cnf")
    port = free_port()
    url = f"https://127.0.0.1:{port}/fhir/subscription"
    log = (tmp_path / "endpoint.log").open("ab")
    endpoint = subprocess.Popen([sys.executable, "-m", "monitor", "fhir-subscription", "--port", str(port),
                                 "--bootstrap-servers", "127.0.0.1:1", "--ssl-certfile", str(tmp_path / "server.pem"),
                                 "--ssl-keyfile", str(tmp_path / "server.key")], stdout=log, stderr=subprocess.STDOUT)
    trusted = ssl.create_default_context(cafile=str(ca))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/stats", timeout=5, context=trusted).read()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "endpoint.log").read_text()
                time.sleep(0.2)
        request = urllib.request.Request(url, data=_notification("handshake"), method="POST",
                                         headers={"Content-Type": "application/fhir+json"})
        with urllib.request.urlopen(request, timeout=30, context=trusted) as response:
            assert (response.status, json.loads(response.read())) == (200, {"type": "handshake", "accepted": True})
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context())
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    finally:
        endpoint.terminate()
        endpoint.wait(timeout=30)
        log.close()
    assert "https://127.0.0.1" in (tmp_path / "endpoint.log").read_text()
