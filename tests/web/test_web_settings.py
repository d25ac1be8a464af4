"""The inbox's secrets come from the environment or files, never from the YAML configuration file."""

from __future__ import annotations

import pytest

from monitor.config import load_settings
from monitor.errors import ConfigError


@pytest.mark.parametrize("text,needle", [
    ("web:\n  session_secret: abcdefghijklmnopqrstuvwxyz\n", "web.session_secret"),
    ("web:\n  oidc:\n    client_secret: s3cret\n", "web.oidc.client_secret"),
])
def test_secrets_in_the_yaml_file_are_refused(tmp_path, text, needle):
    config = tmp_path / "monitor.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=needle) as err:
        load_settings(config_file=config)
    assert "abcdefghijklmnop" not in str(err.value) and "s3cret" not in str(err.value)


def test_secrets_from_files_and_environment(tmp_path, monkeypatch):
    secret = tmp_path / "session"
    secret.write_text("x" * 40 + "\n")
    config = tmp_path / "monitor.yaml"
    config.write_text(f"web:\n  port: 9000\n  session_secret_file: {secret}\n  oidc:\n    issuer: https://idp.example\n")
    monkeypatch.setenv("PROTOCOL_MONITOR_WEB__OIDC__CLIENT_SECRET", "from-env")
    monkeypatch.setenv("PROTOCOL_MONITOR_WEB__HOST", "127.0.0.2")
    settings = load_settings(config_file=config)
    assert settings.web.port == 9000 and settings.web.host == "127.0.0.2"
    assert settings.web.session_secret.get_secret_value() == "x" * 40
    assert settings.web.oidc.client_secret.get_secret_value() == "from-env"
    assert "x" * 40 not in repr(settings) and "from-env" not in repr(settings)
    short = tmp_path / "short"
    short.write_text("abc")
    config.write_text(f"web:\n  session_secret_file: {short}\n")
    monkeypatch.delenv("PROTOCOL_MONITOR_WEB__OIDC__CLIENT_SECRET")
    with pytest.raises(ConfigError, match="fewer than 16"):
        load_settings(config_file=config)
