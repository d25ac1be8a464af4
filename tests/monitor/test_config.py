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


SASL_YAML = "kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: PLAIN\n  sasl_plain_username: monitor\n"


def test_password_from_the_environment_is_never_printed(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(SASL_YAML)
    monkeypatch.setenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD", "env-pw-8c1f")
    s = load_settings(config_file=cfg)
    assert s.kafka.client_options()["sasl_plain_password"] == "env-pw-8c1f"
    print(s, repr(s), s.kafka, s.model_dump(), s.model_dump_json())
    assert "env-pw-8c1f" not in capsys.readouterr().out


def test_password_from_a_file(tmp_path, monkeypatch, capsys):
    secret = tmp_path / "kafka-password"
    secret.write_text("file-pw-51d0\n")  # a trailing newline, as `echo` and most secret mounts leave it
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(SASL_YAML + f"  sasl_plain_password_file: {secret}\n")
    monkeypatch.delenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD", raising=False)
    s = load_settings(config_file=cfg)
    assert s.kafka.client_options()["sasl_plain_password"] == "file-pw-51d0"
    print(s, repr(s), s.model_dump(), s.model_dump_json())
    assert "file-pw-51d0" not in capsys.readouterr().out
    # the file can also be named in the environment
    monkeypatch.setenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD_FILE", str(secret))
    assert load_settings().kafka.client_options()["sasl_plain_password"] == "file-pw-51d0"


def test_password_file_problems_are_clear_and_never_show_the_content(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read sasl_plain_password_file"):
        load_settings()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    monkeypatch.setenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD_FILE", str(empty))
    with pytest.raises(ConfigError, match="is empty"):
        load_settings()
    secret = tmp_path / "pw"
    secret.write_text("both-pw-77aa")
    monkeypatch.setenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD", "both-pw-77aa")
    with pytest.raises(ConfigError, match="one place") as err:
        load_settings()
    assert "both-pw-77aa" not in str(err.value)


def test_a_password_in_the_config_file_is_refused(tmp_path, monkeypatch):
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(SASL_YAML + "  sasl_plain_password: yaml-pw-3e9b\n")
    monkeypatch.delenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD") as err:
        load_settings(config_file=cfg)
    assert "yaml-pw-3e9b" not in str(err.value)
    # refused even when the environment also sets one: the file must be cleaned, not shadowed
    monkeypatch.setenv("PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD", "env-pw")
    with pytest.raises(ConfigError, match="must not be written in the configuration file"):
        load_settings(config_file=cfg)
