"""Sign-in through an identity provider (OpenID Connect), against a small provider run by the test on loopback:
discovery, authorization code with PKCE, token endpoint, RS256 ID tokens, published keys. The provider can be
told to misbehave (wrong audience, wrong nonce, foreign key, expired token)."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import time
import urllib.parse

import httpx
import pytest
import uvicorn
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from monitor.broker import free_port
from monitor.config import load_settings
from monitor.web.app import build_app
from tests.web.inboxtools import fill


class Provider:
    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig", "alg": "RS256"})
        self.foreign = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig", "alg": "RS256"})
        self.user = "dr.officer"
        self.mode = "good"
        self.codes: dict[str, dict] = {}
        app = Starlette(routes=[
            Route("/.well-known/openid-configuration", self.discovery),
            Route("/authorize", self.authorize),
            Route("/token", self.token, methods=["POST"]),
            Route("/jwks", self.jwks),
        ])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "Provider":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def discovery(self, request: Request) -> Response:
        return JSONResponse({"issuer": self.issuer, "authorization_endpoint": self.issuer + "/authorize",
                             "token_endpoint": self.issuer + "/token", "jwks_uri": self.issuer + "/jwks",
                             "response_types_supported": ["code"], "id_token_signing_alg_values_supported": ["RS256"],
                             "code_challenge_methods_supported": ["S256"]})

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(KeySet([self.key]).as_dict(private=False))

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        assert q["response_type"] == "code" and q["client_id"] == "inbox" and q["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"nonce": q["nonce"], "challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"],
                            "user": self.user}
        return RedirectResponse(q["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": q["state"]}),
                                status_code=302)

    async def token(self, request: Request) -> Response:
        form = await request.form()
        grant = self.codes.pop(str(form["code"]), None)
        if grant is None or form["client_secret"] != "provider-secret" or form["redirect_uri"] != grant["redirect_uri"]:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(str(form["code_verifier"]).encode()).digest())
        if challenge.rstrip(b"=").decode() != grant["challenge"]:
            return JSONResponse({"error": "invalid_grant", "error_description": "PKCE"}, status_code=400)
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "idp-" + grant["user"], "aud": "inbox", "iat": now, "exp": now + 300,
                  "nonce": grant["nonce"], "preferred_username": grant["user"]}
        key = self.key
        if self.mode == "audience":
            claims["aud"] = "another-client"
        elif self.mode == "nonce":
            claims["nonce"] = "replayed"
        elif self.mode == "expired":
            claims["exp"] = now - 3600
        elif self.mode == "foreign-key":
            key = self.foreign
        token = jwt.encode({"alg": "RS256", "kid": "k1"}, claims, key)
        return JSONResponse({"access_token": "at", "token_type": "Bearer", "id_token": token})


@pytest.fixture(scope="module")
def provider():
    p = Provider().start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def app(provider, tmp_path_factory):
    url, events = fill(tmp_path_factory.mktemp("oidc"))
    settings = load_settings(overrides={"store": url})
    settings.web = settings.web.model_copy(update={
        "events": [str(events)],
        "oidc": settings.web.oidc.model_copy(update={
            "issuer": provider.issuer, "client_id": "inbox",
            "client_secret": __import__("pydantic").SecretStr("provider-secret")})})
    return build_app(settings)


def oidc_sign_in(app) -> tuple[TestClient, httpx.Response | object]:
    client = TestClient(app, base_url="http://127.0.0.1")
    page = client.get("/signin")
    assert 'id="signin-oidc"' in page.text
    start = client.get("/signin/oidc", follow_redirects=False)
    assert start.status_code == 303
    at_provider = httpx.get(start.headers["location"], follow_redirects=False)
    assert at_provider.status_code == 302
    back = urllib.parse.urlsplit(at_provider.headers["location"])
    assert back.path == "/signin/oidc/callback"
    return client, client.get(back.path + "?" + back.query, follow_redirects=False)


def test_a_person_with_an_account_signs_in_through_the_provider(provider, app):
    provider.mode, provider.user = "good", "dr.officer"
    client, done = oidc_sign_in(app)
    assert done.status_code == 303 and done.headers["location"] == "/"
    page = client.get("/")
    assert page.status_code == 200 and "Dr Olivia Officer" in page.text


@pytest.mark.parametrize("mode", ["audience", "nonce", "expired", "foreign-key"])
def test_a_bad_id_token_is_refused(provider, app, mode):
    provider.mode, provider.user = mode, "dr.officer"
    client, done = oidc_sign_in(app)
    assert done.status_code == 401 and "refused" in done.text
    assert client.get("/", follow_redirects=False).headers["location"] == "/signin"


def test_a_person_without_an_account_is_refused(provider, app):
    provider.mode, provider.user = "good", "stranger"
    client, done = oidc_sign_in(app)
    assert done.status_code == 403 and "no active account" in done.text


def test_a_callback_that_did_not_start_here_is_refused(provider, app):
    provider.mode, provider.user = "good", "dr.officer"
    client = TestClient(app, base_url="http://127.0.0.1")
    client.get("/signin/oidc", follow_redirects=False)
    forged = client.get("/signin/oidc/callback?code=abc&state=forged", follow_redirects=False)
    assert forged.status_code == 400
    stranger = TestClient(app, base_url="http://127.0.0.1")
    assert stranger.get("/signin/oidc/callback?code=abc&state=x", follow_redirects=False).status_code == 400


def test_without_an_issuer_there_is_no_provider_sign_in(tmp_path):
    url, events = fill(tmp_path)
    plain = build_app(load_settings(overrides={"store": url}))
    client = TestClient(plain, base_url="http://127.0.0.1")
    assert "signin-oidc" not in client.get("/signin").text
    assert client.get("/signin/oidc").status_code == 404
    assert re.search("Sign in", client.get("/signin").text)
