"""Test support: what the tests and the benchmarks share, one module per concept. None of it ships; the product
packages (monitor/, connectors/) never import it (tests/test_layout.py checks).

* `kafkatools`: topics, producing, reading, committed offsets and `ServiceProcess` (the real `protocol-monitor run`
  as a child process) against a Kafka-protocol broker;
* `relays`: loopback relays with the bit of Kafka framing they need: `TlsTerminator`, `SaslPlainGateway` and
  `SecuredBroker` (a `monitor.broker.LocalBroker` behind them), since the test broker can not do TLS or SASL/PLAIN;
* `tcpproxy`: `TcpProxy`, a loopback proxy that cuts and restores the broker (outages without a restart);
* `apiversions_shim`: `ApiVersionsShim`, so that Debian's kcat (librdkafka 2.0.2) can talk to the test broker;
* `pgtools`: `TempPostgres`, a throwaway PostgreSQL server;
* `sample_alert`: one realistic alert record for the delivery tests;
* `fhirconv` (and the script `fhir_replay_shim.py`): the flat events as FHIR R4 resources.

The fixtures and scenario helpers that pytest itself needs stay in tests/conftest.py.
"""
