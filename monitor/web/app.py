"""The safety officers' inbox: `protocol-monitor serve`.

Starlette with Jinja2 templates, rendered on the server; the only script is a small same-origin file that polls a
server-rendered fragment of the inbox so new alerts appear without a reload. Roles and site fences are enforced
here, on the server: a site monitor's queries are limited to their sites, and an alert or subject of another site
answers 404 exactly like one that does not exist.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import re
import secrets
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from monitor.config import Settings
from monitor.rules import RuleSet, load_rules
from monitor.store import CLOSE_REASONS, SEVERITY_RANK, STATES, AlertStore, StoreError
from monitor.web.chart import EventLibrary, render_chart, subject_view
from monitor.web.passwords import check_password
from monitor.web.security import COOKIE, RateLimit, SecurityHeaders, Session, Sessions, csrf_ok

log = logging.getLogger("monitor.web")
HERE = Path(__file__).resolve().parent
ACTIONS = {
    "safety_officer": ("acknowledge", "assign", "comment", "close", "reopen"),
    "site_monitor": ("comment",),
    "viewer": (),
}
FILTERS = ("site", "rule", "severity", "category", "state", "assignee", "days_open", "subject")
CATEGORIES = ("eligibility", "dosing", "concomitant", "endpoint", "schedule", "safety", "data_quality")


def fence(user: dict[str, Any]) -> list[str] | None:
    """The sites a user may see; None = every site."""
    if user["role"] == "safety_officer":
        return None
    if user["role"] == "viewer" and not user["sites"]:
        return None
    return list(user["sites"])


def visible(user: dict[str, Any], site_id: str) -> bool:
    sites = fence(user)
    return sites is None or site_id in sites


class Registry:
    """The registry record's sentences, to show the one a rule's `source` quotes."""

    def __init__(self, path: Path | None) -> None:
        self.sentences: list[str] = []
        if path is not None and path.is_file():
            text = path.read_text(encoding="utf-8")
            for block in re.split(r"\n\s*\n|\n(?=\s*[-*•])", text):
                for sentence in re.split(r"(?<=[.;!?])\s+(?=[A-Z(])", " ".join(block.split())):
                    if sentence.strip():
                        self.sentences.append(sentence.strip())

    def sentence_for(self, quote: str) -> str | None:
        norm = " ".join(quote.lower().split())
        parts = sorted((p.strip(" .") for p in norm.split("...")), key=len, reverse=True)
        if not parts or len(parts[0]) < 12:
            return None
        for sentence in self.sentences:
            if parts[0] in " ".join(sentence.lower().split()):
                return sentence
        return None


class Inbox:
    def __init__(self, settings: Settings, *, store: AlertStore | None = None, rules: RuleSet | None = None) -> None:
        self.settings = settings
        web = settings.web
        self.store = store or AlertStore(url=settings.store or "sqlite:///alerts.db")
        self.rules = rules or load_rules(settings.rules)
        secret = web.session_secret.get_secret_value() if web.session_secret else None
        if secret is None:
            log.warning("no session secret configured (web.session_secret_file or PROTOCOL_MONITOR_WEB__SESSION_SECRET):"
                        " using a random one, so a restart signs everybody out")
            secret = secrets.token_urlsafe(48)
        self.sessions = Sessions(secret=secret, idle_seconds=web.session_idle_minutes * 60)
        self.signin_limit = RateLimit(web.signin_attempts_per_minute)
        self.events = EventLibrary(web.events)
        self.registry = Registry(web.registry_record)
        self.oidc = None
        if web.oidc.issuer:
            from monitor.web.oidc import OidcClient

            self.oidc = OidcClient(web.oidc)
        zones = self.rules.parameters.site_timezones
        self.default_zone = ZoneInfo(zones.get("default", "UTC"))
        self.zones = {site: ZoneInfo(name) for site, name in zones.items() if site != "default"}
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
        self.env.filters["local"] = self.local
        self.env.filters["value"] = self.value
        self.env.globals.update(CLOSE_REASONS=CLOSE_REASONS, STATES=STATES, SEVERITIES=tuple(SEVERITY_RANK),
                                CATEGORIES=CATEGORIES)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def zone(self, site_id: str | None) -> ZoneInfo:
        return self.zones.get(site_id or "", self.default_zone)

    def local(self, at: Any, site_id: str | None = None) -> str:
        """An instant in the site's time zone with its offset, e.g. 2025-02-10 23:30 +01:00 (Europe/Paris)."""
        if not at:
            return ""
        try:
            value = dt.datetime.fromisoformat(str(at).replace("Z", "+00:00"))
        except ValueError:
            return str(at)
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        zone = self.zone(site_id)
        shown = value.astimezone(zone)
        offset = shown.strftime("%z")
        return f"{shown:%Y-%m-%d %H:%M} {offset[:3]}:{offset[3:]}"

    def value(self, v: Any, site_id: str | None = None) -> str:
        """An evidence value as shown: an instant in the site's time (the recorded text in a tooltip is not
        needed: the events table cites the events), anything else as recorded."""
        if isinstance(v, str) and len(v) >= 20 and v[4:5] == "-" and v[10:11] == "T":
            try:
                parsed = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                return v
            if parsed.tzinfo is not None:
                return self.local(v, site_id)
        return str(v)

    def render(self, name: str, request: Request, *, status: int = 200, **context: Any) -> HTMLResponse:
        session: Session | None = context.pop("session", None)
        html = self.env.get_template(name).render(request=request, csrf=session.csrf if session else "",
                                                  **context)
        return HTMLResponse(html, status_code=status)

    def authenticated(self, request: Request, *, touch: bool = True) -> tuple[Session | None, dict[str, Any] | None]:
        session = self.sessions.find(request.cookies.get(COOKIE), touch=touch)
        if session is None or session.username is None:
            return session, None
        user = self.store.get_user(session.username)
        if user is None or user["disabled"]:
            self.sessions.end(session)
            return None, None
        return session, user

    def set_cookie(self, response: Response, session: Session) -> Response:
        response.set_cookie(COOKIE, self.sessions.cookie_value(session), httponly=True, samesite="strict",
                            secure=self.settings.web.cookie_secure, path="/")
        return response

    def filters(self, request: Request) -> dict[str, str]:
        return {k: request.query_params.get(k, "").strip() for k in FILTERS}

    def query(self, user: dict[str, Any], f: dict[str, str], limit: int = 500) -> list[dict[str, Any]]:
        try:
            days = float(f["days_open"]) if f["days_open"] else None
        except ValueError:
            days = None
        rows = self.store.inbox(sites=fence(user), site=f["site"] or None, rule=f["rule"] or None,
                                severity=f["severity"] or None, category=f["category"] or None,
                                state=f["state"] or None, assignee=f["assignee"] or None,
                                subject=f["subject"] or None, min_days_open=days, limit=limit)
        now = dt.datetime.now(dt.timezone.utc)
        for r in rows:
            r["days_open"] = None
            if r["state"] in ("raised", "acknowledged") and r["raised_at"]:
                opened = dt.datetime.fromisoformat(r["raised_at"])
                r["days_open"] = round((now - opened).total_seconds() / 86400, 1)
        return rows

    def user_names(self) -> dict[str, str]:
        return {u["username"]: u["printed_name"] for u in self.store.list_users()}


def build_app(settings: Settings, *, store: AlertStore | None = None, rules: RuleSet | None = None) -> Starlette:
    inbox = Inbox(settings, store=store, rules=rules)

    def signin_redirect() -> Response:
        return RedirectResponse("/signin", status_code=303)

    # ---- sign-in -------------------------------------------------------------------------------------------
    def signin_page(request: Request, error: str = "", status: int = 200) -> Response:
        session, user = inbox.authenticated(request)
        if user is not None:
            return RedirectResponse("/", status_code=303)
        session = session or inbox.sessions.new()
        return inbox.set_cookie(inbox.render("signin.html", request, session=session, error=error, user=None,
                                             status=status, oidc_label=inbox.settings.web.oidc.label
                                             if inbox.oidc else None), session)

    async def signin_get(request: Request) -> Response:
        return await run_in_threadpool(signin_page, request)

    async def signin_post(request: Request) -> Response:
        form = await request.form()
        return await run_in_threadpool(do_signin, request, dict(form))

    def do_signin(request: Request, form: dict[str, Any]) -> Response:
        session = inbox.sessions.find(request.cookies.get(COOKIE), touch=True)
        if not csrf_ok(session, form.get("csrf")):
            return PlainTextResponse("The form expired or did not come from this site: reload and try again.",
                                     status_code=403)
        client = request.client.host if request.client else "?"
        if not inbox.signin_limit.allow(client):
            return signin_page(request, "Too many sign-in attempts from this address: wait a minute.", 429)
        username = str(form.get("username", "")).strip()
        password = str(form.get("password", ""))
        user = inbox.store.get_user(username) if username else None
        web = inbox.settings.web
        locked = bool(user and user["locked_until"] and user["locked_until"] > _now())
        ok = check_password(user["password_hash"] if user else None, password)
        if user is None or user["disabled"] or locked or not ok:
            if user is not None and not user["disabled"] and not locked:
                inbox.store.record_signin(username, ok=False, max_failures=web.max_failed_signins,
                                          lockout_minutes=web.lockout_minutes)
            log.info("sign-in refused for a user name from %s", client)
            return signin_page(request, f"Sign-in failed. After {web.max_failed_signins} failures in a row an "
                                        f"account is locked for {web.lockout_minutes:g} minutes.", 401)
        inbox.store.record_signin(username, ok=True, max_failures=web.max_failed_signins,
                                  lockout_minutes=web.lockout_minutes)
        if session is not None:
            inbox.sessions.end(session)  # a new id at sign-in: no session fixation
        fresh = inbox.sessions.new(username)
        log.info("%s signed in", username)
        return inbox.set_cookie(RedirectResponse("/", status_code=303), fresh)

    # ---- sign-in through the sponsor's identity provider (OpenID Connect) -------------------------------------
    def redirect_uri(request: Request) -> str:
        base = inbox.settings.web.oidc.public_url or str(request.base_url)
        return base.rstrip("/") + "/signin/oidc/callback"

    def oidc_start(request: Request) -> Response:
        if inbox.oidc is None:
            return PlainTextResponse("Not found", status_code=404)
        from monitor.web.oidc import OidcError, pkce_pair

        client = request.client.host if request.client else "?"
        if not inbox.signin_limit.allow(client):
            return signin_page(request, "Too many sign-in attempts from this address: wait a minute.", 429)
        session = inbox.sessions.find(request.cookies.get(COOKIE), touch=True) or inbox.sessions.new()
        verifier, challenge = pkce_pair()
        session.pending = {"state": secrets.token_urlsafe(24), "nonce": secrets.token_urlsafe(24),
                           "verifier": verifier}
        try:
            url = inbox.oidc.authorization_url(redirect_uri=redirect_uri(request), state=session.pending["state"],
                                               nonce=session.pending["nonce"], code_challenge=challenge)
        except OidcError as exc:
            log.warning("OpenID Connect sign-in unavailable: %s", exc)
            return signin_page(request, "The identity provider cannot be reached: sign in with your password.",
                               503)
        return inbox.set_cookie(RedirectResponse(url, status_code=303), session)

    def oidc_callback(request: Request) -> Response:
        if inbox.oidc is None:
            return PlainTextResponse("Not found", status_code=404)
        from monitor.web.oidc import OidcError

        session = inbox.sessions.find(request.cookies.get(COOKIE), touch=True)
        pending = session.pending if session is not None else None
        if session is not None:
            session.pending = None  # one use
        state = request.query_params.get("state", "")
        if pending is None or not secrets.compare_digest(pending["state"], state):
            return signin_page(request, "Sign-in through the identity provider expired or did not start here: "
                                        "try again.", 400)
        if request.query_params.get("error") or not request.query_params.get("code"):
            return signin_page(request, "The identity provider did not sign you in.", 401)
        try:
            token = inbox.oidc.exchange(code=request.query_params["code"], redirect_uri=redirect_uri(request),
                                        code_verifier=pending["verifier"])
            claims = inbox.oidc.verify(str(token["id_token"]), nonce=pending["nonce"])
        except OidcError as exc:
            log.warning("OpenID Connect sign-in refused: %s", exc)
            return signin_page(request, "The identity provider's answer was refused.", 401)
        username = str(claims.get(inbox.settings.web.oidc.username_claim, ""))
        user = inbox.store.get_user(username) if username else None
        locked = bool(user and user["locked_until"] and user["locked_until"] > _now())
        if user is None or user["disabled"] or locked:
            log.info("OpenID Connect sign-in of a person without an active account")
            return signin_page(request, "Your identity was confirmed but you have no active account in this "
                                        "inbox: ask the trial's safety officers.", 403)
        if session is not None:
            inbox.sessions.end(session)
        fresh = inbox.sessions.new(username)
        log.info("%s signed in through the identity provider", username)
        return inbox.set_cookie(RedirectResponse("/", status_code=303), fresh)

    async def signout(request: Request) -> Response:
        form = await request.form()
        session = inbox.sessions.find(request.cookies.get(COOKIE), touch=False)
        if session is None or not csrf_ok(session, form.get("csrf")):
            return PlainTextResponse("Missing or wrong CSRF token.", status_code=403)
        inbox.sessions.end(session)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # ---- inbox ---------------------------------------------------------------------------------------------
    def inbox_context(user: dict[str, Any], f: dict[str, str]) -> dict[str, Any]:
        rows = inbox.query(user, f)
        counts = inbox.store.counts(sites=fence(user))
        query = urlencode({k: v for k, v in f.items() if v})
        return {"rows": rows, "counts": counts, "f": f, "query": query,
                "poll_seconds": inbox.settings.web.poll_seconds}

    def inbox_page(request: Request) -> Response:
        session, user = inbox.authenticated(request)
        if user is None:
            return signin_redirect()
        f = inbox.filters(request)
        sites = fence(user)
        options = {c: inbox.store.distinct(c, sites=sites) for c in ("site_id", "rule", "assignee")}
        return inbox.render("inbox.html", request, session=session, user=user, options=options,
                            **inbox_context(user, f))

    def inbox_fragment(request: Request) -> Response:
        session, user = inbox.authenticated(request, touch=False)  # polling is not use: the session may idle out
        if user is None:
            return PlainTextResponse("signed out", status_code=401)
        return inbox.render("_live.html", request, session=session, user=user,
                            **inbox_context(user, inbox.filters(request)))

    def inbox_csv(request: Request) -> Response:
        session, user = inbox.authenticated(request)
        if user is None:
            return signin_redirect()
        rows = inbox.query(user, inbox.filters(request), limit=100_000)
        buf = io.StringIO()
        out = csv.writer(buf)
        out.writerow(["alert_id", "state", "withdrawn", "severity", "rule", "category", "subject_id", "site_id",
                      "at_local", "at_utc", "assignee", "days_open", "message"])
        for r in rows:
            out.writerow([_cell(v) for v in (
                r["alert_id"], r["state"], "yes" if r["withdrawn_at"] else "", r["severity"], r["rule"],
                r["category"], r["subject_id"], r["site_id"], inbox.local(r["at"], r["site_id"]), r["at_utc"],
                r["assignee"] or "", "" if r["days_open"] is None else r["days_open"], r["message"])])
        log.info("%s exported %d alerts", user["username"], len(rows))
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="alerts.csv"'})

    # ---- alert page ----------------------------------------------------------------------------------------
    def alert_page(request: Request, *, error: str = "", status: int = 200) -> Response:
        session, user = inbox.authenticated(request)
        if user is None:
            return signin_redirect()
        alert_id = request.path_params["alert_id"]
        try:
            alert = inbox.store.get(alert_id)
        except StoreError:
            alert = None
        if alert is None or not visible(user, alert["site_id"]):
            return inbox.render("error.html", request, session=session, user=user, status=404,
                                message="No such alert.")
        record = alert["record"]
        rule = inbox.rules.rules.get(alert["rule"])
        source = rule.spec.source if rule is not None else ""
        evidence = record.get("evidence", {})
        sources = evidence.get("sources", {}) if isinstance(evidence.get("sources"), dict) else {}
        events = []
        raw = {e.get("event_id"): e for e in inbox.events.subject(alert["subject_id"])}
        for eid in evidence.get("events", []) or []:
            e = raw.get(eid, {})
            events.append({"event_id": eid, "type": e.get("type", ""), "occurred_at": e.get("occurred_at", ""),
                           "summary": _summary(e), "source": sources.get(eid)})
        values = evidence.get("values", {}) if isinstance(evidence.get("values"), dict) else {}
        derived = {k: v for k, v in evidence.items() if k not in ("values", "events", "sources", "fact",
                                                                  "rule_condition")}
        users = [u for u in inbox.store.list_users() if not u["disabled"] and u["role"] != "viewer"
                 and visible(u, alert["site_id"])]
        return inbox.render(
            "alert.html", request, session=session, user=user, status=status, alert=alert, record=record,
            source=source, sentence=inbox.registry.sentence_for(source) if source else None,
            current_title=rule.spec.title if rule is not None else None, values=values, derived=derived,
            evidence=evidence, events=events, history=inbox.store.history(alert_id),
            actions=ACTIONS[user["role"]], users=users, error=error, names=inbox.user_names())

    async def alert_get(request: Request) -> Response:
        return await run_in_threadpool(alert_page, request)

    async def alert_post(request: Request) -> Response:
        form = await request.form()
        return await run_in_threadpool(do_action, request, dict(form))

    def do_action(request: Request, form: dict[str, Any]) -> Response:
        session, user = inbox.authenticated(request)
        if user is None or session is None:
            return signin_redirect()
        if not csrf_ok(session, form.get("csrf")):
            return PlainTextResponse("Missing or wrong CSRF token: nothing was changed.", status_code=403)
        alert_id = request.path_params["alert_id"]
        try:
            alert = inbox.store.get(alert_id)
        except StoreError:
            alert = None
        if alert is None or not visible(user, alert["site_id"]):
            return inbox.render("error.html", request, session=session, user=user, status=404,
                                message="No such alert.")
        action = str(form.get("action", ""))
        if action not in ACTIONS[user["role"]]:
            return alert_page(request, error=f"Your role ({user['role']}) may not {action} alerts.", status=403)
        web = inbox.settings.web
        if not check_password(user["password_hash"], str(form.get("password", ""))):
            locked = inbox.store.record_signin(user["username"], ok=False, max_failures=web.max_failed_signins,
                                               lockout_minutes=web.lockout_minutes, context="signature")
            if locked:
                inbox.sessions.end_user(user["username"])
                return signin_redirect()
            return alert_page(request, error="Wrong password: nothing was signed or changed.", status=400)
        inbox.store.record_signin(user["username"], ok=True, max_failures=web.max_failed_signins,
                                  lockout_minutes=web.lockout_minutes)
        assignee = str(form.get("assignee", "")).strip() or None
        if action == "assign":
            target = inbox.store.get_user(assignee or "")
            if assignee is None or target is None or target["disabled"] or target["role"] == "viewer" or not visible(
                    target, alert["site_id"]):
                return alert_page(request, error="Assign to an active safety officer or a monitor of this site.",
                                  status=400)
        try:
            inbox.store.sign_action(alert_id, username=user["username"], printed_name=user["printed_name"],
                                    action=action, reason=str(form.get("reason", "")),
                                    text=str(form.get("text", ""))[:4000], assignee=assignee)
        except StoreError as exc:
            return alert_page(request, error=str(exc), status=409)
        log.info("%s signed %s on alert %s", user["username"], action, alert_id)
        return RedirectResponse(f"/alerts/{alert_id}#history", status_code=303)

    # ---- subject page --------------------------------------------------------------------------------------
    def subject_page(request: Request) -> Response:
        session, user = inbox.authenticated(request)
        if user is None:
            return signin_redirect()
        subject_id = request.path_params["subject_id"]
        raw = inbox.events.subject(subject_id)
        alerts = inbox.store.inbox(sites=None, subject=subject_id, limit=10_000)
        sites = {str(e["site_id"]) for e in raw if e.get("site_id")} | {str(a["site_id"]) for a in alerts}
        if not sites or not all(visible(user, s) for s in sites):
            return inbox.render("error.html", request, session=session, user=user, status=404,
                                message="No such subject.")
        site_id = (raw[-1].get("site_id") if raw else alerts[0]["site_id"]) or ""
        alerts.sort(key=lambda a: (a["at_utc"], a["alert_id"]))
        view = subject_view(raw, inbox.rules)
        svg = render_chart(view, alerts=alerts, rules=inbox.rules, zone=inbox.zone(site_id))
        events = sorted(raw, key=lambda e: (str(e.get("occurred_at", "")), str(e.get("event_id", ""))))
        timeline: list[dict[str, Any]] = []
        for e in events:
            try:
                key = dt.datetime.fromisoformat(str(e.get("occurred_at")).replace("Z", "+00:00"))
            except ValueError:
                continue
            timeline.append({"kind": "event", "at": e.get("occurred_at"), "key": key, "event": e,
                             "summary": _summary(e)})
        for a in alerts:
            timeline.append({"kind": "alert", "at": a["at"],
                             "key": dt.datetime.fromisoformat(a["at_utc"]), "alert": a})
        timeline.sort(key=lambda t: t["key"])
        return inbox.render("subject.html", request, session=session, user=user, subject_id=subject_id,
                            site_id=site_id, svg=Markup(svg), timeline=timeline,  # noqa: S704 - built escaped
                            alerts=alerts, zone=str(inbox.zone(site_id)), has_events=bool(raw))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    def sync(fn: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            return await run_in_threadpool(fn, request)
        return endpoint

    routes = [
        Route("/signin", signin_get, methods=["GET"]),
        Route("/signin", signin_post, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/signin/oidc", sync(oidc_start), methods=["GET"]),
        Route("/signin/oidc/callback", sync(oidc_callback), methods=["GET"]),
        Route("/", sync(inbox_page), methods=["GET"]),
        Route("/inbox/live", sync(inbox_fragment), methods=["GET"]),
        Route("/inbox.csv", sync(inbox_csv), methods=["GET"]),
        Route("/alerts/{alert_id}", alert_get, methods=["GET"]),
        Route("/alerts/{alert_id}", alert_post, methods=["POST"]),
        Route("/subjects/{subject_id}", sync(subject_page), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
    app.state.inbox = inbox
    return app


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _cell(value: Any) -> Any:
    """CSV cells that a spreadsheet would run as a formula are quoted with a leading apostrophe."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


SUMMARY_FIELDS = ("temperature_c", "site", "drug", "dose_mg_per_kg", "dose_mg", "dose_g_per_kg", "analyte",
                  "value", "unit", "visit", "term", "arm", "weight_kg", "purpose")


def _summary(e: dict[str, Any]) -> str:
    return ", ".join(f"{k} {e[k]}" for k in SUMMARY_FIELDS if e.get(k) not in (None, ""))


def serve(settings: Settings) -> int:
    import socket

    import uvicorn

    app = build_app(settings)
    web = settings.web
    sock = socket.socket(socket.AF_INET6 if ":" in web.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((web.host, web.port))
    port = sock.getsockname()[1]
    host = f"[{web.host}]" if ":" in web.host else web.host
    print(f"inbox on http://{host}:{port}/ (store {settings.store.split('@')[-1] if settings.store else '-'})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False, proxy_headers=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0
