"""The service configuration: one pydantic-settings model.

Sources, highest first: command-line flags, environment variables (`PROTOCOL_MONITOR_…`, nested with `__`, e.g.
`PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD`), the YAML file given with `--config`, the defaults below.
Secrets come from the environment or files only and are never printed (`SecretStr`): the SASL password from
`PROTOCOL_MONITOR_KAFKA__SASL_PLAIN_PASSWORD` or from the file named by `kafka.sasl_plain_password_file` (a mounted
secret); a password written into the YAML file is refused, because configuration files end up in version control.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from monitor.errors import ConfigError


class KafkaSecurity(BaseModel):
    """Passed through to kafka-python (names as in its KafkaConsumer/KafkaProducer)."""

    model_config = ConfigDict(extra="forbid")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    sasl_plain_password_file: Path | None = Field(
        default=None, description="a file holding the SASL password (e.g. a mounted Kubernetes/Docker secret)")

    reconnect_backoff_max_ms: int = 2000
    bootstrap_timeout_ms: int = 5000

    @model_validator(mode="after")
    def _password_from_file(self) -> "KafkaSecurity":
        """Read the password file once, at load; the error names the file, never its content."""
        if self.sasl_plain_password_file is None:
            return self
        if self.sasl_plain_password is not None:
            raise ValueError("set the SASL password in one place: the environment or sasl_plain_password_file")
        try:
            text = self.sasl_plain_password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read sasl_plain_password_file {self.sasl_plain_password_file}: "
                             f"{exc.strerror or type(exc).__name__}") from None
        password = text.rstrip("\r\n")
        if not password:
            raise ValueError(f"sasl_plain_password_file {self.sasl_plain_password_file} is empty")
        self.sasl_plain_password = SecretStr(password)
        return self

    def client_options(self) -> dict[str, Any]:
        """Options for every kafka-python client: security, and short connection back-offs so a client fails fast
        and the service's own retry loop (which also listens for SIGTERM) does the waiting."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol,
                               "reconnect_backoff_max_ms": self.reconnect_backoff_max_ms,
                               "bootstrap_timeout_ms": self.bootstrap_timeout_ms}
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_mechanism", "sasl_plain_username"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.security_protocol in ("SSL", "SASL_SSL"):
            out["ssl_check_hostname"] = self.ssl_check_hostname
        if self.sasl_plain_password is not None:
            out["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        return out


class OidcSettings(BaseModel):
    """Sign-in through the sponsor's identity provider (OpenID Connect); off while `issuer` is unset."""

    model_config = ConfigDict(extra="forbid")

    issuer: str | None = Field(default=None, description="the provider's issuer URL (discovery at "
                               "ISSUER/.well-known/openid-configuration)")
    client_id: str = ""
    client_secret: SecretStr | None = Field(default=None, description="PROTOCOL_MONITOR_WEB__OIDC__CLIENT_SECRET")
    client_secret_file: Path | None = None
    scopes: str = "openid profile email"
    username_claim: str = Field(default="preferred_username", description="the ID-token claim that names the "
                                "local account (which holds the role and sites)")
    public_url: str | None = Field(default=None, description="the inbox's address as browsers see it (for the "
                                   "redirect URI); default: the address of the request")
    label: str = "Sign in with the sponsor's account"

    @model_validator(mode="after")
    def _secret_from_file(self) -> "OidcSettings":
        if self.client_secret_file is None:
            return self
        if self.client_secret is not None:
            raise ValueError("set the OIDC client secret in one place: the environment or client_secret_file")
        try:
            text = self.client_secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read client_secret_file {self.client_secret_file}: "
                             f"{exc.strerror or type(exc).__name__}") from None
        self.client_secret = SecretStr(text)
        return self


class WebSettings(BaseModel):
    """`protocol-monitor serve`: the safety officers' inbox. Environment: PROTOCOL_MONITOR_WEB__<NAME>."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="address to listen on (loopback by default; put a TLS "
                      "reverse proxy in front for anything else)")
    port: int = Field(default=8080, ge=0, le=65535)
    session_secret: SecretStr | None = Field(default=None, description="key that signs session cookies "
                                             "(PROTOCOL_MONITOR_WEB__SESSION_SECRET); unset: a random key per start")
    session_secret_file: Path | None = Field(default=None, description="a file holding the session key "
                                             "(a mounted secret)")
    session_idle_minutes: float = Field(default=30, gt=0, description="a session unused this long expires")
    cookie_secure: bool = Field(default=False, description="mark cookies Secure (set true behind HTTPS)")
    max_failed_signins: int = Field(default=5, ge=1, description="consecutive wrong passwords that lock an account")
    lockout_minutes: float = Field(default=15, gt=0)
    signin_attempts_per_minute: int = Field(default=10, ge=1, description="sign-in attempts per client address "
                                            "per minute; more get HTTP 429")
    poll_seconds: float = Field(default=5, gt=0, description="how often an open inbox asks for new alerts")
    events: list[str] = Field(default_factory=list, description="JSON Lines event files the subject pages chart "
                              "(without them a subject page shows its alerts only)")
    registry_record: Path | None = Field(default=None, description="the trial's registry record (text): the alert "
                                         "page quotes the sentence a rule comes from")
    oidc: OidcSettings = Field(default_factory=OidcSettings)

    @model_validator(mode="after")
    def _secret_from_file(self) -> "WebSettings":
        if self.session_secret_file is None:
            return self
        if self.session_secret is not None:
            raise ValueError("set the session secret in one place: the environment or session_secret_file")
        try:
            text = self.session_secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read session_secret_file {self.session_secret_file}: "
                             f"{exc.strerror or type(exc).__name__}") from None
        if len(text) < 16:
            raise ValueError(f"session_secret_file {self.session_secret_file} holds fewer than 16 characters")
        self.session_secret = SecretStr(text)
        return self


class Settings(BaseSettings):
    """Everything `protocol-monitor run` needs; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="PROTOCOL_MONITOR_", env_nested_delimiter="__", extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    events_topic: str = "clinical-events"
    alerts_topic: str = "protocol-alerts"
    dead_letter_topic: str = "clinical-events-dead-letter"
    group_id: str = "protocol-monitor"
    client_id: str = "protocol-monitor"
    rules: str | None = Field(default=None, description="rules directory (default: the bundled rules/)")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 = no metrics endpoint")
    metrics_host: str = "127.0.0.1"
    clock: Literal["wall", "stream"] = Field(
        default="wall", description="wall: live deadlines; stream: the events' recorded_at (replaying history)")
    tick_seconds: float = Field(default=0.5, gt=0, le=60, description="how often deadlines are checked when idle")
    idle_partition_seconds: float = Field(
        default=30.0, gt=0, description="stream clock: a caught-up partition that received nothing for this long "
        "follows the most advanced partition's clock (its deadlines never wait for ever)")
    rules_watch_seconds: float = Field(default=2.0, ge=0, description="poll the rules directory for edits (0 = only SIGHUP)")
    kri_interval_seconds: float = Field(default=60.0, gt=0, description="how often site-risk KRIs and QTLs are recomputed (rules/kri.yaml)")
    qtl_alerts: bool = Field(default=False, description="raise QTL breach alerts from this instance: turn it on for one instance only (each scores the subjects of its own partitions)")
    poll_max_records: int = Field(default=500, ge=1)
    session_timeout_ms: int = 10000
    heartbeat_interval_ms: int = 3000
    max_message_bytes: int = Field(default=1_000_000, ge=1024, description="bigger events go to the dead letters "
                                   "(too_large)")
    max_events_per_subject: int = Field(default=10_000, ge=1, description="event versions held per subject; new "
                                        "events beyond it go to the dead letters (subject_limit)")
    input_format: Literal["flat", "fhir"] = Field(
        default="flat", description="events topic records: flat JSON events, or FHIR R4 resources/Bundles (issue 18)")
    fhir_codes: str | None = Field(default=None,
                                   description="FHIR code map (default: the rules directory's fhir/codes.yaml)")
    kafka: KafkaSecurity = Field(default_factory=KafkaSecurity)
    store: str | None = Field(default=None, description="alert store: sqlite:///PATH or postgresql://... "
                              "(notify and alerts default to sqlite:///alerts.db; run records rules loads there)")
    notify_group_id: str = "protocol-monitor-notify"
    routes: list[dict[str, Any]] = Field(default_factory=list, description="alert delivery routes (see README)")
    web: WebSettings = Field(default_factory=WebSettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, file_secret_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


SECRETS_IN_FILE_REFUSED = ("sasl_plain_password",)


def _refuse_secrets_in_file(config_file: Path) -> None:
    """A password in the YAML file would be committed with it: refuse, and say where it belongs instead."""
    try:
        data = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return  # the settings source reports unreadable or malformed files itself
    kafka = data.get("kafka") if isinstance(data, dict) else None
    web = data.get("web") if isinstance(data, dict) else None
    oidc = web.get("oidc") if isinstance(web, dict) else None
    if isinstance(oidc, dict) and "client_secret" in oidc:
        raise ConfigError(f"{config_file}: web.oidc.client_secret must not be written in the configuration file; set "
                          "PROTOCOL_MONITOR_WEB__OIDC__CLIENT_SECRET in the environment, or web.oidc.client_secret_file")
    if isinstance(web, dict) and "session_secret" in web:
        raise ConfigError(f"{config_file}: web.session_secret must not be written in the configuration file (it "
                          "would end up in version control); set PROTOCOL_MONITOR_WEB__SESSION_SECRET in the "
                          "environment, or web.session_secret_file to a file that holds it")
    for name in SECRETS_IN_FILE_REFUSED:
        if isinstance(kafka, dict) and name in kafka:
            raise ConfigError(f"{config_file}: kafka.{name} must not be written in the configuration file (it "
                              f"would end up in version control); set PROTOCOL_MONITOR_KAFKA__{name.upper()} in "
                              f"the environment, or kafka.{name}_file to a file that holds it")


def load_settings(*, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings from a YAML file, the environment and explicit overrides (flags). Raises ConfigError."""
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"configuration file not found: {config_file}")
    if config_file is not None:
        _refuse_secrets_in_file(Path(config_file))
    model: type[Settings] = Settings
    if config_file is not None:
        model = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": config_file}})
    try:
        return model(**{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise ConfigError(f"invalid configuration: {problems}") from None
