"""Sign-in through the sponsor's identity provider: OpenID Connect, authorization code flow with PKCE (S256),
`state` and `nonce`, ID token verified with the provider's published keys (joserfc).

The identity provider says who the person is; the inbox's own account of the same name (the `username_claim` of
the ID token, `preferred_username` by default) says what they may do: role, sites, disabled or locked. A person
without a local account is refused. Electronic signatures still ask for the local account's password (a
re-authentication at the provider for each signature is not implemented).

The provider's endpoints must be HTTPS, except on loopback (127.0.0.1, ::1, localhost), which the tests use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from monitor.config import OidcSettings
from monitor.errors import MonitorError

LOOPBACK = ("127.0.0.1", "::1", "localhost")
ALGORITHMS = ("RS256", "PS256", "ES256")


class OidcError(MonitorError):
    """The identity provider's answer was refused (the message says why; it holds no token)."""


def _check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK):
        return url
    raise OidcError(f"identity provider URL must be https (or http on loopback): {url}")


def _get_json(url: str, *, data: dict[str, str] | None = None, auth: str | None = None) -> dict[str, Any]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    headers = {"Accept": "application/json"}
    if auth:
        headers["Authorization"] = auth
    request = urllib.request.Request(_check_url(url), data=body, headers=headers)  # noqa: S310 - scheme checked
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - scheme checked above
            value = json.loads(response.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise OidcError(f"identity provider request to {url.split('?')[0]} failed: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise OidcError(f"identity provider answered {url.split('?')[0]} with something other than an object")
    return value


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class OidcClient:
    def __init__(self, settings: OidcSettings) -> None:
        if not settings.issuer or not settings.client_id:
            raise OidcError("OpenID Connect needs web.oidc.issuer and web.oidc.client_id")
        self.settings = settings
        self.issuer = settings.issuer.rstrip("/")
        _check_url(self.issuer)
        self._lock = threading.Lock()
        self._config: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._keys_at = 0.0

    def config(self) -> dict[str, Any]:
        with self._lock:
            if self._config is None:
                doc = _get_json(self.issuer + "/.well-known/openid-configuration")
                if str(doc.get("issuer", "")).rstrip("/") != self.issuer:
                    raise OidcError("the provider's discovery document names another issuer")
                for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                    _check_url(str(doc.get(name, "")))
                self._config = doc
            return self._config

    def keys(self, *, refresh: bool = False) -> KeySet:
        with self._lock:
            stale = time.monotonic() - self._keys_at > 3600
            if self._keys is None or stale or (refresh and time.monotonic() - self._keys_at > 10):
                uri = (self._config or {}).get("jwks_uri")
                if not uri:
                    raise OidcError("no jwks_uri")
                self._keys = KeySet.import_key_set(_get_json(uri))  # type: ignore[arg-type]
                self._keys_at = time.monotonic()
            return self._keys

    def authorization_url(self, *, redirect_uri: str, state: str, nonce: str, code_challenge: str) -> str:
        endpoint = self.config()["authorization_endpoint"]
        query = urllib.parse.urlencode({
            "response_type": "code", "client_id": self.settings.client_id, "redirect_uri": redirect_uri,
            "scope": self.settings.scopes, "state": state, "nonce": nonce, "code_challenge": code_challenge,
            "code_challenge_method": "S256"})
        return endpoint + ("&" if "?" in endpoint else "?") + query

    def exchange(self, *, code: str, redirect_uri: str, code_verifier: str) -> dict[str, Any]:
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": code_verifier, "client_id": self.settings.client_id}
        if self.settings.client_secret is not None:
            data["client_secret"] = self.settings.client_secret.get_secret_value()
        token = _get_json(self.config()["token_endpoint"], data=data)
        if "id_token" not in token:
            raise OidcError("the provider returned no ID token")
        return token

    def verify(self, id_token: str, *, nonce: str) -> dict[str, Any]:
        """The ID token's claims after checking its signature, issuer, audience, expiry and nonce."""
        self.config()
        try:
            try:
                token = jwt.decode(id_token, self.keys(), algorithms=list(ALGORITHMS))
            except (JoseError, ValueError):
                token = jwt.decode(id_token, self.keys(refresh=True), algorithms=list(ALGORITHMS))
            registry = jwt.JWTClaimsRegistry(
                leeway=60, iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.settings.client_id},
                exp={"essential": True}, nonce={"essential": True, "value": nonce})
            registry.validate(token.claims)
        except (JoseError, ValueError) as exc:
            raise OidcError(f"ID token refused: {type(exc).__name__}") from None
        claims = dict(token.claims)
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.settings.client_id:
            raise OidcError("ID token refused: several audiences and azp is not this client")
        return claims
