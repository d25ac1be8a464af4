"""Secure transport against a real broker on loopback, with the real `protocol-monitor run`: TLS (SSL), SASL/PLAIN
over TLS (SASL_SSL) and without (SASL_PLAINTEXT), the password from the environment or a file; an untrusted
certificate, a plaintext client and a wrong password are refused, the service says so, stays not ready, never
crashes and never writes the password to its log.

The broker is Tansu 0.6.0 (see tests/support/relays.py for what it can not do itself: TLS is terminated and
SASL/PLAIN is checked on loopback in front of it, by `SecuredBroker`). Tansu's own `--authentication` (SCRAM) is
exercised for refusal.
Certificates are made at test time with the openssl command: a CA, and a server certificate for 127.0.0.1 and
localhost signed by it; a second CA plays the certificate nobody trusts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from monitor.broker import LocalBroker, free_port
from tests.conftest import SHARED, load_scenario
from tests.support.kafkatools import ServiceProcess, create_topics, events_as_records, produce, read_topic
from tests.support.relays import SecuredBroker

SCENARIO = SHARED / "scenarios" / "13_excl_neutropenia_si_units.jsonl"
RULE = "ELIG-NEUTROPENIA"


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)  # noqa: S603, S607


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    ca, ca_key = _make_ca(d, "trial-test-ca")
    other_ca, _ = _make_ca(d, "untrusted-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "server.key", "-out", d / "server.csr",
             "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", d / "server.csr", "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", d / "server.pem", "-days", "2", "-extfile", d / "ext.cnf")
    return {"ca": ca, "other_ca": other_ca, "cert": d / "server.pem", "key": d / "server.key"}


def status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=3).status  # noqa: S310 - loopback only
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never logged:\n{path.read_text()[-3000:] if path.exists() else ''}")


def wait_ready(port: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    code = status(f"http://127.0.0.1:{port}/readyz")
    while code != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
        code = status(f"http://127.0.0.1:{port}/readyz")
    return code


def refused(bootstrap: str, **options: Any) -> bool:
    """True if a kafka-python client with these options can not even bootstrap."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=3000,
                                 reconnect_backoff_max_ms=500, **options)
    except KafkaError:
        return True
    admin.close()
    return False


def topics() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"events": f"s-events-{tag}", "alerts": f"s-alerts-{tag}", "dead": f"s-dead-{tag}"}


def write_config(path: Path, kafka: dict[str, Any]) -> Path:
    path.write_text("kafka:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in kafka.items()))
    return path


def end_to_end(*, broker: SecuredBroker, client: dict[str, Any], service_kafka: dict[str, Any], tmp_path: Path,
               env: dict[str, str] | None = None) -> str:
    """Scenario in, alert out, both through the secured listener; returns the service log."""
    names, metrics = topics(), free_port()
    create_topics(broker.bootstrap, {names["events"]: 1, names["alerts"]: 1, names["dead"]: 1}, **client)
    _, events = load_scenario(SCENARIO)
    produce(broker.bootstrap, names["events"], events_as_records(events), **client)
    log = tmp_path / "service.log"
    config = write_config(tmp_path / "monitor.yaml", service_kafka)
    service = ServiceProcess(bootstrap=broker.bootstrap, topics=names, group=f"s-{names['events']}", log=log,
                             extra=["--config", str(config), "--metrics-port", str(metrics)], env=env).start()
    try:
        got = read_topic(broker.bootstrap, names["alerts"], timeout_s=60, until=lambda m: any(
            json.loads(x.value)["rule"] == RULE for x in m), **client)
        assert any(json.loads(x.value)["rule"] == RULE for x in got), log.read_text()[-3000:]
        assert wait_ready(metrics) == 200
        assert service.stop() == 0
    finally:
        service.stop()
    return log.read_text()


def test_tls_end_to_end_and_clients_without_the_ca_or_without_tls_are_refused(certs, tmp_path):
    with SecuredBroker(tls_cert=certs["cert"], tls_key=certs["key"], log_path=tmp_path / "broker.log") as broker:
        tls = {"security_protocol": "SSL", "ssl_cafile": str(certs["ca"])}
        assert refused(broker.bootstrap, security_protocol="PLAINTEXT")
        assert refused(broker.bootstrap, security_protocol="SSL")  # the system's CAs do not know the test CA
        assert refused(broker.bootstrap, security_protocol="SSL", ssl_cafile=str(certs["other_ca"]))
        text = end_to_end(broker=broker, client=tls, service_kafka=tls, tmp_path=tmp_path)
        assert "Traceback" not in text
        assert broker.terminator is not None and broker.terminator.handshake_failures > 0


def test_a_service_that_does_not_trust_the_broker_certificate_says_so_and_stays_not_ready(certs, tmp_path):
    with SecuredBroker(tls_cert=certs["cert"], tls_key=certs["key"], log_path=tmp_path / "broker.log") as broker:
        metrics, log = free_port(), tmp_path / "service.log"
        config = write_config(tmp_path / "monitor.yaml",
                              {"security_protocol": "SSL", "ssl_cafile": str(certs["other_ca"])})
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics(), group="s-untrusted", log=log,
                                 extra=["--config", str(config), "--metrics-port", str(metrics)]).start()
        try:
            wait_for(log, "certificate verify failed")
            wait_for(log, f"Kafka broker unreachable at {broker.bootstrap}")
            assert status(f"http://127.0.0.1:{metrics}/healthz") == 200
            assert status(f"http://127.0.0.1:{metrics}/readyz") == 503
            assert service.stop() == 0
        finally:
            service.stop()
        assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("protocol, source", [("SASL_SSL", "env"), ("SASL_PLAINTEXT", "file")])
def test_sasl_plain_end_to_end_with_the_password_from_the_environment_or_a_file(certs, tmp_path, protocol, source):
    password = f"pw-{uuid.uuid4().hex}"
    tls = protocol == "SASL_SSL"
    with SecuredBroker(sasl_plain_users={"monitor": password}, log_path=tmp_path / "broker.log",
                       tls_cert=certs["cert"] if tls else None, tls_key=certs["key"] if tls else None) as broker:
        kafka: dict[str, Any] = {"security_protocol": protocol, "sasl_mechanism": "PLAIN",
                                 "sasl_plain_username": "monitor"}
        if tls:
            kafka["ssl_cafile"] = str(certs["ca"])
        assert refused(broker.bootstrap, **kafka, sasl_plain_password="not-" + password)
        env, service_kafka = {}, dict(kafka)
        if source == "env":
            env["PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD"] = password
        else:
            secret = tmp_path / "kafka-password"
            secret.write_text(password + "\n")
            service_kafka["sasl_plain_password_file"] = str(secret)
        text = end_to_end(broker=broker, client={**kafka, "sasl_plain_password": password},
                          service_kafka=service_kafka, tmp_path=tmp_path, env=env)
        assert password not in text and "Traceback" not in text
        assert broker.gateway is not None and broker.gateway.successes >= 3  # the service's clients logged in


def test_a_wrong_password_is_refused_logged_clearly_and_never_written_to_the_log(certs, tmp_path):
    right, wrong = f"pw-{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"
    with SecuredBroker(sasl_plain_users={"monitor": right}, tls_cert=certs["cert"], tls_key=certs["key"],
                       log_path=tmp_path / "broker.log") as broker:
        metrics, log = free_port(), tmp_path / "service.log"
        config = write_config(tmp_path / "monitor.yaml", {
            "security_protocol": "SASL_SSL", "ssl_cafile": str(certs["ca"]), "sasl_mechanism": "PLAIN",
            "sasl_plain_username": "monitor"})
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics(), group="s-wrong", log=log,
                                 extra=["--config", str(config), "--metrics-port", str(metrics)],
                                 env={"PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD": wrong}).start()
        try:
            wait_for(log, "Authentication failed: Invalid username or password")
            wait_for(log, f"Kafka broker unreachable at {broker.bootstrap}")
            assert status(f"http://127.0.0.1:{metrics}/readyz") == 503
            assert service.stop() == 0
        finally:
            service.stop()
        text = log.read_text()
        assert wrong not in text and right not in text and "Traceback" not in text
        assert broker.gateway is not None and broker.gateway.failures > 0 and broker.gateway.successes == 0


def test_tansu_authentication_refuses_an_unknown_scram_user_and_the_service_stays_not_ready(tmp_path):
    """Tansu's own --authentication: without a provisioned user nobody gets in (on memory storage a user can
    not be created once authentication is required), which is the refusal path of a real broker's SASL."""
    password = f"scram-{uuid.uuid4().hex}"
    with LocalBroker(extra_args=["--authentication"], log_path=tmp_path / "broker.log") as broker:
        assert refused(broker.bootstrap, security_protocol="PLAINTEXT")
        metrics, log = free_port(), tmp_path / "service.log"
        config = write_config(tmp_path / "monitor.yaml", {
            "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "monitor"})
        service = ServiceProcess(bootstrap=broker.bootstrap, topics=topics(), group="s-scram", log=log,
                                 extra=["--config", str(config), "--metrics-port", str(metrics)],
                                 env={"PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD": password}).start()
        try:
            wait_for(log, f"Kafka broker unreachable at {broker.bootstrap}")
            assert status(f"http://127.0.0.1:{metrics}/readyz") == 503
            assert service.stop() == 0
        finally:
            service.stop()
        text = log.read_text()
        assert password not in text and "Traceback" not in text
