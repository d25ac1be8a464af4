"""Configuration: YAML file, overridden by environment variables, overridden by flags; secrets stay secret."""

from __future__ import annotations

import pytest

from monitor.config import load_settings
from monitor.errors import ConfigError


def test_defaults_are_safe():
    s = load_settings()
    assert s.metrics_host == "127.0.0.1" and s.metrics_port == 0 and s.clock == "wall"


def test_yaml_then_environment_then_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text("events_topic: from-yaml\nalerts_topic: from-yaml\ngroup_id: from-yaml\n"
                   "kafka:\n  security_protocol: SASL_PLAINTEXT\n  sasl_mechanism: PLAIN\n  sasl_plain_username: u\n")
    monkeypatch.setenv("PROTOCOL_MONITOR_ALERTS_TOPIC", "from-env")
    monkeypatch.setenv("PROTOCOL_MONITOR_GROUP_ID", "from-env")
    monkeypatch.setenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD", "s3cret")
    s = load_settings(config_file=cfg, overrides={"group_id": "from-flag", "events_topic": None})
    assert (s.events_topic, s.alerts_topic, s.group_id) == ("from-yaml", "from-env", "from-flag")
    assert s.kafka.client_options()["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())


def test_bad_values_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="metrics_port"):
        load_settings(overrides={"metrics_port": 70000})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(config_file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("evnets_topic: x\n")
    with pytest.raises(ConfigError, match="evnets_topic"):
        load_settings(config_file=bad)
