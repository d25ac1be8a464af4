"""The `protocol-monitor` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

from monitor.errors import MonitorError, RuleFileError

DEFAULT_STORE = "sqlite:///alerts.db"


def _instant(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 date-time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset; add one, e.g. +01:00")
    return value


def _cmd_replay(args: argparse.Namespace) -> int:
    from connectors.file import JsonLinesSource
    from connectors.stdout import JsonLinesAlertSink, TextRejectSink
    from monitor.clock import ReplayClock
    from monitor.evaluator import Monitor
    from monitor.replay import replay
    from monitor.rules import load_rules

    missing = [p for p in args.files if not Path(p).is_file()]
    if missing:
        print(f"protocol-monitor: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rules = load_rules(args.rules)
    clock = ReplayClock()
    monitor = Monitor.create(rules=rules, clock=clock, max_events_per_subject=args.max_events_per_subject)
    mapper = None
    if args.input_format == "fhir":
        from monitor.fhir import FhirMapper, code_map_path, load_code_map

        mapper = FhirMapper(code_map=load_code_map(code_map_path(args.fhir_codes, args.rules)))
    summary = replay(source=JsonLinesSource(paths=args.files), monitor=monitor, clock=clock,
                     alerts=JsonLinesAlertSink(stream=sys.stdout), rejects=TextRejectSink(stream=sys.stderr),
                     until=args.until, mapper=mapper)
    for line in summary.lines(monitor):
        print(line, file=sys.stderr)
    return 0


def _cmd_kri(args: argparse.Namespace) -> int:
    """Site risk now: replay the files (alerts not printed), then print the KRI table and the QTLs. With --store,
    the inbox store adds the age of open alerts and the time to acknowledge; with a store and no files, the table
    is computed from the store's open alerts alone (it holds no participants: every site is then under the minimum
    accrual, and says so)."""
    import datetime as _dt

    from connectors.file import JsonLinesSource
    from connectors.memory import ListSink
    from monitor.clock import ReplayClock
    from monitor.evaluator import Monitor
    from monitor.kri import IntakeTally, SiteRisk, Snapshot, collect, evaluate_qtls, format_table, score_all
    from monitor.kri import timings_from_store
    from monitor.replay import replay
    from monitor.rules import load_rules

    if not args.files and not args.store:
        print("protocol-monitor kri: give event files, --store, or both", file=sys.stderr)
        return 2
    missing = [p for p in args.files if not Path(p).is_file()]
    if missing:
        print(f"protocol-monitor: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rules = load_rules(args.rules)
    if rules.kri is None:
        print(f"protocol-monitor kri: no kri.yaml in {rules.directory}", file=sys.stderr)
        return 2
    store = None
    if args.store:
        from monitor.store import AlertStore

        store = AlertStore(url=args.store)
    intake = IntakeTally()

    class _Rejects:
        def add(self, record: Any, error: Any) -> None:
            intake.dead_lettered(record.value)

        def flush(self) -> None:
            return None

    try:
        if args.files:
            clock = ReplayClock()
            monitor = Monitor.create(rules=rules, clock=clock)
            replay(source=JsonLinesSource(paths=args.files), monitor=monitor, clock=clock, alerts=ListSink(),
                   rejects=_Rejects(), until=args.until)
            if args.until is not None:
                clock.advance_to(args.until)
            risk = SiteRisk(spec=rules.kri, intake=intake,
                            store_alerts=(lambda: timings_from_store(store)) if store is not None else None)
            risk.recompute(monitor)
            snapshot = risk.last
        else:
            from monitor.alerts import Alert

            open_alerts = [Alert.model_validate(store.get(row["alert_id"])["record"])  # type: ignore[union-attr]
                           for state in ("raised", "acknowledged")
                           for row in store.list(state=state, limit=1_000_000)]  # type: ignore[union-attr]
            timings = timings_from_store(store)
            now = _dt.datetime.now(_dt.timezone.utc)
            m = collect(subjects=[], open_alerts=open_alerts, now=now,
                        grace_hours=rules.parameters.deadline_grace_hours, follow_up_days=rules.kri.follow_up_days,
                        store_alerts=timings, extra_sites={t.site_id for t in timings} - {"all"})
            snapshot = Snapshot(at=now, results=score_all(rules.kri, m), qtls=evaluate_qtls(rules.kri, m),
                                seconds=0.0)
    finally:
        if store is not None:
            store.close()
    assert snapshot is not None  # noqa: S101 - recompute always sets it
    print(format_table(snapshot))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from monitor.config import load_settings
    from monitor.service import run_service

    overrides = {name: getattr(args, name) for name in (
        "bootstrap_servers", "events_topic", "alerts_topic", "dead_letter_topic", "group_id", "metrics_port",
        "rules", "clock", "store", "input_format", "fhir_codes")}
    settings = load_settings(config_file=args.config, overrides=overrides)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logging.getLogger("monitor").warning("signal %d: stopping after the current batch (a batch the broker has not acknowledged is left uncommitted and done again at the next start)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    def on_ready(svc: Any) -> None:
        signal.signal(signal.SIGHUP, lambda *_: svc.reload_requested.set())

    service = run_service(settings, stop=stop, on_ready=on_ready)
    print(f"stopped: {service.stats}", file=sys.stderr)
    return 0


def _cmd_fhir_subscription(args: argparse.Namespace) -> int:
    from connectors.fhir_subscription import serve
    from monitor.config import load_settings

    overrides = {name: getattr(args, name) for name in ("bootstrap_servers", "events_topic", "fhir_codes")}
    settings = load_settings(config_file=args.config, overrides=overrides)
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("protocol-monitor: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    return serve(settings=settings, host=args.host, port=args.port, path=args.path, ssl_certfile=args.ssl_certfile,
                 ssl_keyfile=args.ssl_keyfile)


def _cmd_notify(args: argparse.Namespace) -> int:
    import signal
    import threading

    from monitor.config import load_settings
    from monitor.notify import run_notifier

    settings = load_settings(config_file=args.config, overrides={
        "bootstrap_servers": args.bootstrap_servers, "alerts_topic": args.alerts_topic,
        "store": args.store or DEFAULT_STORE})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    notifier = run_notifier(settings, stop=stop)
    print(f"stopped: delivered {notifier.delivered}, failed attempts {notifier.failed}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from monitor.demo import run_demo

    return run_demo(rules_dir=args.rules, subjects=args.subjects, inbox=not args.no_inbox,
                    exit_when_done=args.exit_when_done, inbox_port=args.inbox_port)


def _cmd_generate(args: argparse.Namespace) -> int:
    from monitor.generate import write_cohort
    from monitor.rules import load_rules

    return write_cohort(subjects=args.subjects, days=args.days, seed=args.seed, sites=args.sites,
                        deviation_rate=args.deviation_rate, output=args.output,
                        parameters=load_rules(args.rules).parameters)


def _cmd_rules_check(args: argparse.Namespace) -> int:
    from monitor.rules import load_rules

    rules = load_rules(args.dir)
    print(f"ok: {len(rules.rules)} rules, version {rules.version}, from {rules.directory}")
    codes = Path(rules.directory) / "fhir" / "codes.yaml"
    if codes.is_file():  # the FHIR code map (issue 18): refused with its problems like any rule file
        from monitor.fhir import load_code_map

        print(f"ok: FHIR code map, {len(load_code_map(codes).observations)} observation codes, from {codes}")
    return 0


def _cmd_rules_test(args: argparse.Namespace) -> int:
    from monitor.rules import load_rules
    from monitor.ruletest import load_suite, run_suite

    rules = load_rules(args.dir)
    suite = load_suite(args.tests or rules.directory / "tests")
    results = run_suite(suite, rules)
    failed = [r for r in results if not r.ok]
    for r in results:
        if not r.ok or args.verbose_tests:
            print(f"{'FAIL' if not r.ok else 'ok  '} {r.name}  ({r.path}:{r.line})")
        for problem in r.problems:
            print(f"       {problem}")
    covered = suite.rules_covered()
    untested = sorted(set(rules.rules) - set(covered))
    if untested:
        print(f"rules with no test: {', '.join(untested)}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or untested else 0


def _cmd_rules_doc(args: argparse.Namespace) -> int:
    from monitor.catalogue import write_catalogue

    return write_catalogue(rules_dir=args.dir, output=args.output)


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from monitor.config import load_settings
    from monitor.store import AlertStore

    settings = load_settings(config_file=getattr(args, "config", None), overrides={"store": args.store})
    return AlertStore(url=settings.store or DEFAULT_STORE)


def _cmd_alerts(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.alerts_command == "list":
        rows = store.list(state=args.state, site=args.site, rule=args.rule, limit=args.limit)
        for r in rows:
            print(f"{r['alert_id']}  {r['state']:<12} {r['severity']:<8} {r['rule']:<32} {r['subject_id']:<10} "
                  f"{r['site_id']:<10} {r['at']}")
        print(f"{len(rows)} alert(s)", file=sys.stderr)
    elif args.alerts_command == "show":
        print(json.dumps(store.get(args.alert_id), indent=2, ensure_ascii=False))
    elif args.alerts_command == "ack":
        store.acknowledge(args.alert_id, by=args.by, reason=args.reason or "")
        print(f"acknowledged {args.alert_id}")
    elif args.alerts_command == "close":
        store.close_alert(args.alert_id, by=args.by, reason=args.reason)
        print(f"closed {args.alert_id}")
    return 0


def _cmd_users(args: argparse.Namespace) -> int:
    import getpass as _getpass

    from monitor.web.passwords import hash_password, read_new_password

    store = _store(args)
    actor = f"cli:{_getpass.getuser()}"
    if args.users_command == "add":
        sites = [s.strip() for s in (args.sites or "").split(",") if s.strip()]
        password = read_new_password(from_stdin=args.password_stdin, from_env=args.password_env)
        store.add_user(username=args.username, printed_name=args.name, role=args.role, sites=sites,
                       password_hash=hash_password(password), actor=actor)
        print(f"added {args.username} ({args.role}{', sites ' + ','.join(sites) if sites else ''})")
    elif args.users_command == "passwd":
        if store.get_user(args.username) is None:
            raise MonitorError(f"no user {args.username}")
        password = read_new_password(from_stdin=args.password_stdin, from_env=args.password_env)
        store.set_password(args.username, password_hash=hash_password(password), actor=actor)
        print(f"password set for {args.username}; failed sign-ins and any lock cleared")
    elif args.users_command == "disable":
        store.disable_user(args.username, actor=actor)
        print(f"disabled {args.username}")
    elif args.users_command == "list":
        for u in store.list_users():
            status = "disabled" if u["disabled"] else (f"locked until {u['locked_until']}" if u["locked_until"]
                                                       else "active")
            print(f"{u['username']:<20} {u['role']:<15} {','.join(u['sites']) or '*':<20} {status:<12} "
                  f"{u['printed_name']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from monitor.config import load_settings
    from monitor.web.app import serve

    web: dict[str, Any] = {}
    if args.host is not None:
        web["host"] = args.host
    if args.port is not None:
        web["port"] = args.port
    if args.events:
        web["events"] = args.events
    overrides: dict[str, Any] = {"store": args.store, "rules": args.rules}
    settings = load_settings(config_file=args.config, overrides=overrides)
    if web:
        settings.web = settings.web.model_copy(update=web)
    if settings.store is None:
        settings.store = DEFAULT_STORE
    logging.getLogger().setLevel(logging.INFO)
    return serve(settings)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    store = _store(args)
    entries = store.audit_entries()
    problems = store.verify_audit()
    if problems:
        for p in problems:
            print(f"TAMPERED: {p}")
        print(f"audit trail NOT intact: {len(problems)} problem(s) in {len(entries)} entries", file=sys.stderr)
        return 1
    head = entries[-1].hash[:16] if entries else "-"
    print(f"audit trail intact: {len(entries)} entries, head {head}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protocol-monitor", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="replay JSON Lines event files; alerts to stdout, summary to stderr")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--until", type=_instant, default=None,
                   help="evaluation horizon: after the input, deadlines up to this instant are evaluated")
    p.add_argument("--rules", default=None, metavar="DIR", help="rules directory (default: the bundled rules/)")
    p.add_argument("--max-events-per-subject", type=int, default=10_000, metavar="N",
                   help="new events of a subject beyond N are rejected as subject_limit (default 10000)")
    p.add_argument("--input-format", choices=["flat", "fhir"], default="flat",
                   help="flat: the monitor's JSON events (default); fhir: FHIR R4 resources or Bundles, one a line")
    p.add_argument("--fhir-codes", default=None, metavar="FILE",
                   help="FHIR code map (default: the rules directory's fhir/codes.yaml)")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("kri", help="site risk: the KRI table (scores, flags) and the QTLs for replayed event files "
                                   "and/or an alert store")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--until", type=_instant, default=None,
                   help="evaluation horizon: deadlines up to this instant are evaluated and the table is computed at it")
    p.add_argument("--rules", default=None, metavar="DIR", help="rules directory with kri.yaml (default: bundled)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="the inbox's alert store (sqlite:///..., postgresql://...): age of open alerts, time to ack")
    p.set_defaults(func=_cmd_kri)

    p = sub.add_parser("run", help="run the service: events from Kafka, alerts and dead letters to Kafka")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML configuration file")
    p.add_argument("--bootstrap-servers", default=None)
    p.add_argument("--events-topic", default=None)
    p.add_argument("--alerts-topic", default=None)
    p.add_argument("--dead-letter-topic", default=None)
    p.add_argument("--group-id", default=None)
    p.add_argument("--metrics-port", type=int, default=None, help="0 = off")
    p.add_argument("--rules", default=None, metavar="DIR")
    p.add_argument("--store", default=None, help="alert store URL: the rules versions loaded go to its audit trail")
    p.add_argument("--clock", choices=["wall", "stream"], default=None,
                   help="wall: live deadlines (default); stream: the events' recorded_at")
    p.add_argument("--input-format", choices=["flat", "fhir"], default=None,
                   help="flat: the monitor's JSON events (default); fhir: a FHIR R4 resource or Bundle per record")
    p.add_argument("--fhir-codes", default=None, metavar="FILE",
                   help="FHIR code map (default: the rules directory's fhir/codes.yaml)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("fhir-subscription", help="FHIR Subscription endpoint (R4 Backport notifications) feeding the "
                       "events topic with FHIR resources, keyed by subject (run the service with --input-format fhir)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML configuration file")
    p.add_argument("--bootstrap-servers", default=None)
    p.add_argument("--events-topic", default=None)
    p.add_argument("--fhir-codes", default=None, metavar="FILE", help="FHIR code map (subject identifier system)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; put TLS in front)")
    p.add_argument("--port", type=int, default=8090, help="port (default 8090; 0 = any free port)")
    p.add_argument("--path", default="/fhir/subscription", help="the Subscription's endpoint path")
    p.add_argument("--ssl-certfile", default=None, metavar="PEM", help="serve HTTPS with this certificate (chain)")
    p.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="the certificate's private key")
    p.set_defaults(func=_cmd_fhir_subscription)

    p = sub.add_parser("notify", help="alerts topic → alert store → e-mail and webhooks (routes in the config)")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML configuration with `routes:`")
    p.add_argument("--bootstrap-servers", default=None)
    p.add_argument("--alerts-topic", default=None)
    p.add_argument("--store", default=None)
    p.set_defaults(func=_cmd_notify)

    store_opts = argparse.ArgumentParser(add_help=False)
    store_opts.add_argument("--store", default=None,
                            help="sqlite:///PATH (default sqlite:///alerts.db) or postgresql://...")
    store_opts.add_argument("--config", default=None, metavar="FILE")
    p = sub.add_parser("alerts", help="the alert store: list, show, ack, close")
    asub = p.add_subparsers(dest="alerts_command", required=True)
    c = asub.add_parser("list", parents=[store_opts], help="alerts, oldest first")
    c.add_argument("--state", choices=["raised", "acknowledged", "closed", "withdrawn"])
    c.add_argument("--site")
    c.add_argument("--rule")
    c.add_argument("--limit", type=int, default=200)
    c = asub.add_parser("show", parents=[store_opts], help="one alert with its record and lifecycle")
    c.add_argument("alert_id")
    c = asub.add_parser("ack", parents=[store_opts], help="acknowledge an alert")
    c.add_argument("alert_id")
    c.add_argument("--by", required=True, help="who acknowledges (recorded in the audit trail)")
    c.add_argument("--reason", default="")
    c = asub.add_parser("close", parents=[store_opts], help="close an alert with a reason")
    c.add_argument("alert_id")
    c.add_argument("--by", required=True)
    c.add_argument("--reason", required=True)
    p.set_defaults(func=_cmd_alerts)

    password_opts = argparse.ArgumentParser(add_help=False)
    password_opts.add_argument("--password-stdin", action="store_true",
                               help="read the password from the first line of standard input")
    password_opts.add_argument("--password-env", default=None, metavar="NAME",
                               help="read the password from environment variable NAME")
    p = sub.add_parser("users", help="inbox accounts: add, passwd, disable, list (argon2 password hashes)",
                       description="Passwords are never command-line arguments: they are typed at a prompt (twice), "
                                   "or read from standard input (--password-stdin) or an environment variable "
                                   "(--password-env NAME). Every change goes to the audit trail, without the hash.")
    usub = p.add_subparsers(dest="users_command", required=True)
    c = usub.add_parser("add", parents=[store_opts, password_opts], help="add an account")
    c.add_argument("username")
    c.add_argument("--name", required=True, help="printed name, shown on electronic signatures")
    c.add_argument("--role", required=True, choices=["safety_officer", "site_monitor", "viewer"],
                   help="safety_officer: all sites, every action; site_monitor: own sites, view and comment; "
                        "viewer: read only")
    c.add_argument("--sites", default="", help="comma-separated site ids the account may see (site_monitor, "
                                               "viewer; empty for a viewer: every site)")
    c = usub.add_parser("passwd", parents=[store_opts, password_opts], help="set a new password (clears a lock)")
    c.add_argument("username")
    c = usub.add_parser("disable", parents=[store_opts], help="disable an account (its sessions end)")
    c.add_argument("username")
    usub.add_parser("list", parents=[store_opts], help="accounts, roles, sites and status")
    p.set_defaults(func=_cmd_users)

    p = sub.add_parser(
        "serve", help="the safety officers' inbox: a web application on the alert store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the inbox (server-rendered pages; no JavaScript build, nothing from the internet).\n"
                    "Settings (YAML `web:` section of --config, or PROTOCOL_MONITOR_WEB__<NAME>):\n"
                    "  host (127.0.0.1), port (8080), session_secret (environment only) or session_secret_file,\n"
                    "  session_idle_minutes (30), cookie_secure (false; true behind HTTPS),\n"
                    "  max_failed_signins (5), lockout_minutes (15), signin_attempts_per_minute (10),\n"
                    "  poll_seconds (5), events (JSON Lines files charted on subject pages), registry_record,\n"
                    "  oidc.issuer / oidc.client_id / oidc.client_secret (environment) or oidc.client_secret_file,\n"
                    "  oidc.username_claim (preferred_username): sign-in through the sponsor's identity provider.\n"
                    "The store is PROTOCOL_MONITOR_STORE or --store; accounts: `protocol-monitor users add`.")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML configuration file")
    p.add_argument("--store", default=None, help="sqlite:///PATH (default sqlite:///alerts.db) or postgresql://...")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8080; 0 = any free port)")
    p.add_argument("--rules", default=None, metavar="DIR", help="rules directory (titles, sources, time zones)")
    p.add_argument("--events", action="append", default=None, metavar="FILE",
                   help="JSON Lines events charted on subject pages (repeatable)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("audit", help="the audit trail: verify")
    asub = p.add_subparsers(dest="audit_command", required=True)
    c = asub.add_parser("verify", parents=[store_opts], help="detect edited, removed or reordered entries")
    c.set_defaults(func=_cmd_audit_verify)

    p = sub.add_parser("demo", help="replay the bundled demo cohort, print its alerts and serve them in the inbox "
                                    "(no external services)")
    p.add_argument("--rules", default=None, metavar="DIR")
    p.add_argument("--subjects", type=int, default=24, help="synthetic subjects (default 24)")
    p.add_argument("--no-inbox", action="store_true", help="do not start the safety officers' inbox")
    p.add_argument("--inbox-port", type=int, default=0, help="the inbox's port (default: a free one)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop once the cohort is processed (default: the inbox stays up until Ctrl-C)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("generate", help="write a synthetic cohort as JSON Lines (for demos and load tests)")
    p.add_argument("--subjects", type=int, default=100)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--deviation-rate", type=float, default=0.2, help="share of subjects with a planted deviation")
    p.add_argument("-o", "--output", default="-", help="output file (default: standard output)")
    p.add_argument("--rules", default=None, metavar="DIR",
                   help="rules directory whose parameters.yaml the cohort follows (default: the bundled rules/)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("rules", help="rule files: validate (check), test, diff, doc, schema")
    rsub = p.add_subparsers(dest="rules_command", required=True)
    c = rsub.add_parser("check", help="load and validate a rules directory")
    c.add_argument("dir", nargs="?", default=None)
    c.set_defaults(func=_cmd_rules_check)
    c = rsub.add_parser("validate", help="validate a rules directory: every problem with file and line")
    c.add_argument("dir", nargs="?", default=None)
    c.set_defaults(func=_cmd_rules_check)
    c = rsub.add_parser("diff", help="replay events under two rules versions and list what changes")
    c.add_argument("--old", required=True, metavar="DIR")
    c.add_argument("--new", required=True, metavar="DIR")
    c.add_argument("files", nargs="+", metavar="EVENTS")
    c.add_argument("--until", type=_instant, default=None)
    c.set_defaults(func=lambda a: __import__("monitor.diff", fromlist=["main"]).main(
        old_dir=a.old, new_dir=a.new, files=a.files, until=a.until))
    c = rsub.add_parser("schema", help="write the JSON Schemas editors use to check rule and table files")
    c.add_argument("-o", "--output", default=None, metavar="DIR", help="default: the rules directory's schema/")
    c.set_defaults(func=lambda a: __import__("monitor.schema", fromlist=["main"]).main(a.output))
    c = rsub.add_parser("test", help="run the rule tests (rules/tests/*.yaml) under the replay clock")
    c.add_argument("dir", nargs="?", default=None, help="rules directory (default: the bundled rules/)")
    c.add_argument("--tests", default=None, help="tests directory (default: DIR/tests)")
    c.add_argument("--list", dest="verbose_tests", action="store_true", help="list passing tests too")
    c.set_defaults(func=_cmd_rules_test)
    c = rsub.add_parser("doc", help="write the rule catalogue for reviewers (Markdown)")
    c.add_argument("dir", nargs="?", default=None)
    c.add_argument("-o", "--output", default="-", help="output file (default: standard output)")
    c.set_defaults(func=_cmd_rules_doc)
    return parser


GC_THRESHOLDS = (20_000, 20, 10)
"""Garbage-collector thresholds for the commands that hold many subjects (replay, run, demo). Python's default
(700, 10, 10) traverses every held subject's objects in its older generations over and over; at 1,000 subjects
that is 12 % of a replay's CPU. These cut a 1,000 x 60 replay from 74.5 to 66.3 CPU s with the same peak memory
and output (BENCHMARKS.md). Full collections still run, only less often."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func in (_cmd_replay, _cmd_run, _cmd_demo):
        gc.set_threshold(*GC_THRESHOLDS)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except RuleFileError as exc:
        print(f"protocol-monitor: {exc}", file=sys.stderr)
        return 3
    except MonitorError as exc:
        print(f"protocol-monitor: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
