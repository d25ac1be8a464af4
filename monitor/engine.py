"""Engine adapter: the only module that imports durable_rules.

It applies every workaround of ENGINE_NOTES:
- compiled rules compare one message with constants (checked again here before registration, upstream #381);
- the monitor assigns engine sids itself and refuses a sid whose 32-bit FNV-1a hash collides with another in the
  same registration (two subjects must never share a session);
- within a session the engine finds stored facts by the same 32-bit hash of their id: a fact whose id collides
  with a stored one looks already held and never fires (checked on 2.0.28: `visit:D70948` and `visit:D342922`).
  A fact whose id collides with another of its subject's is posted under its id with a `~n` suffix;
- subjects are sharded over several registrations of the same ruleset, each well under 1,024 sessions;
  `delete_state` is never called;
- sessions are pooled (`max_sessions`): a session costs ~660 KB with the bundled rules, so only the subjects
  evaluated most recently keep one. The least recently used subject's facts are retracted and its session serves
  the next subject; an evicted subject's facts are asserted again at its next `sync` (rules read one fact each, so
  its matches come back the same);
- the Host's timer and dispatch threads are never started: the monitor owns time;
- ruleset names carry the rules version and an instance tag, so versions can live side by side;
- every engine call and every action is wrapped: "not handled" means no match, anything else is an EngineError;
- facts and rule definitions reach the C parser as JSON written here (`engine_json`), not by `json.dumps`: the
  parser fails on an exponent with no fraction (`1e-05`, `1e+16`: error 204) and on `Infinity` (202), and silently
  never matches `NaN`. Every float is written exactly, with a fraction (`1.0e-05`); a non-finite number is an
  EngineError naming the field, never posted;
- a subject's new facts go to the engine in one `assert_facts` call (its retracted ones in one `retract_facts`), a
  JSON array: the engine goes on past a message that matches nothing or that it already holds, and answers for the
  whole array, so matches are attributed by the (sid, id) of each fired action. The engine stores a fact only
  when it reaches a rule; with the compiled rules' shape (one condition, no `count` or `cap`) that is when the rule
  fires, so a fact that fired nothing is not held and is never retracted (with any other shape every asserted
  fact counts as held: retracting a fact the engine does not hold changes nothing). Checked on 2.0.28: a message it can not parse ends the array silently (the rest is dropped, the call
  answers OK), so everything posted in a batch must come from `engine_json`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

import durable_rules_engine as native  # public: a test stands a failing one in (test_engine)
from durable import engine as _dr

from monitor.errors import EngineError

log = logging.getLogger(__name__)

MAX_SESSIONS_PER_REGISTRATION = 1024
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_SESSIONS = 256


def sid_hash(sid: str) -> int:
    """The 32-bit FNV-1a hash durable_rules uses to find a session (state.c: fnv1Hash32 over the sid)."""
    h = 0x811C9DC5
    for byte in sid.encode("utf-8"):
        if byte >= 0x80:  # the C code xors a signed char: sign-extend like it does
            byte |= 0xFFFFFF00
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


_INT_LIMIT = 2**63  # larger integers are written as floats (the C parser keeps 64-bit integers)


def engine_number(value: float | int, *, where: str = "value") -> str:
    """A number as the engine's parser reads it, with the same value: finite, and an exponent always after a
    fraction (Python's `1e-05` becomes `1.0e-05`). Raises EngineError for NaN and infinities."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if -_INT_LIMIT < value < _INT_LIMIT:
            return str(value)
        value = float(value)
    if not math.isfinite(value):
        raise EngineError(f"{where} is {value!r}: the rules engine can only compare finite numbers")
    text = repr(value)
    mantissa, sep, exponent = text.partition("e")
    if sep and "." not in mantissa:
        return f"{mantissa}.0e{exponent}"
    return text


def engine_json_exact(value: Any, *, where: str) -> str:
    """The reference writer, value by value (`engine_json` falls back to it; the tests compare the two)."""
    if value is None or isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (bool, int, float)):
        return engine_number(value, where=where)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:"
                              f"{engine_json_exact(v, where=f'{where}.{k}')}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(engine_json_exact(v, where=f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    raise EngineError(f"{where}: a {type(value).__name__} can not be posted to the rules engine")


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]
# the C encoder json.dumps builds at each call, built once (flat dicts of scalars only: no circularity check needed)
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_flat_encoder = (_c_make_encoder(None, _refuse, _encode_str, None, ":", ",", False, False, False)
                 if _c_make_encoder is not None else None)
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _encode_flat(value: dict[str, Any]) -> str:
    return "".join(_flat_encoder(value, 0)) if _flat_encoder is not None else _encode(value)


def engine_json(value: Any, *, where: str = "value") -> str:
    """JSON for the engine's parser: like `json.dumps` (compact), except every number goes through
    `engine_number`. A flat dict of strings, booleans, None and numbers that Python writes as the engine reads them
    (every fact, nearly always) is written by the C encoder in one call; anything else by the exact writer."""
    if type(value) is dict:
        for k, v in value.items():
            t = type(v)
            if type(k) is not str:
                break
            if t is float:
                # repr() writes an exponent below 1e-4 and from 1e16 on (`1e-05`: the engine refuses it); the
                # comparisons are false for NaN, and an infinity is at or above 1e16: the exact writer names it
                if not (1e-4 <= v < 1e16 or -1e16 < v <= -1e-4 or v == 0.0):
                    break
            elif t is int:
                if not -_INT_LIMIT < v < _INT_LIMIT:
                    break
            elif t is not str and t is not bool and v is not None:
                break
        else:
            return _encode_flat(value)  # no ValueError: every float was checked finite above
    return engine_json_exact(value, where=where)


def message_json(fact: dict[str, Any], sid: str, fid: str) -> str:
    """`engine_json(dict(fact, sid=sid, id=fid))` without copying the fact."""
    if "sid" in fact or "id" in fact:
        return engine_json(dict(fact, sid=sid, id=fid), where=f"fact {fid}")
    body = engine_json(fact, where=f"fact {fid}")
    tail = f'"sid":{_encode_str(sid)},"id":{_encode_str(fid)}}}'
    return "{" + tail if body == "{}" else body[:-1] + "," + tail


def _retraction(sid: str, fid: str) -> str:
    return f'{{"sid":{_encode_str(sid)},"id":{_encode_str(fid)}}}'


def _constant_only(expr: Any) -> bool:
    if isinstance(expr, dict):
        for key, value in expr.items():
            if not key.startswith("$") and isinstance(value, (dict, list)):
                return False  # {field: {...}} compares with another message or an expression
            if key in ("$m", "$s", "$add", "$sub", "$mul", "$div"):
                return False
            if not _constant_only(value):
                return False
        return True
    if isinstance(expr, list):
        return all(_constant_only(v) for v in expr)
    return True


def check_definition(definition: dict[str, Any]) -> None:
    """Refuse any rule that joins or references another message: it can segfault the engine."""
    for name, rule in definition.items():
        conds = rule.get("all") or rule.get("any") or []
        if len(conds) != 1 or set(conds[0]) != {"m"} or not _constant_only(conds[0]["m"]):
            raise EngineError(f"rule {name}: compiled rules may only compare one message with constants")


class _Ruleset(_dr.Ruleset):
    """durable_rules' Ruleset, with its definition and facts written by `engine_json` (durable_rules 2.0.28 writes
    them with `json.dumps`, whose `1e-05` its own parser refuses)."""

    def __init__(self, name: str, host: Any, ruleset_definition: dict[str, Any]) -> None:  # noqa: D107
        self._actions = {}
        self.runs: dict[str, str] = {}  # rule name -> its action name
        self._name = name
        self._host = host
        for rule_name, rule in ruleset_definition.items():
            action = rule.pop("run")
            self._actions[rule_name] = _dr.Promise(host.get_action(action))
            self.runs[rule_name] = action
        self._handle = native.create_ruleset(name, engine_json(ruleset_definition, where=f"ruleset {name}"))
        self._definition = ruleset_definition

    def assert_fact(self, fact: dict[str, Any]) -> Any:
        text = engine_json(fact, where=f"fact {fact.get('id')}")
        return self._handle_result(native.assert_fact(self._handle, text), fact)

    def retract_fact(self, fact: dict[str, Any]) -> Any:
        text = engine_json(fact, where=f"fact {fact.get('id')}")
        return self._handle_result(native.retract_fact(self._handle, text), fact)


class _Host(_dr.Host):
    """A Host without its background threads; actions resolve to one recording callback."""

    def __init__(self, action: Callable[[str, Any], None]) -> None:
        self._action = action
        super().__init__()

    def _run(self) -> None:  # no timer or dispatch threads (ENGINE_NOTES: timers run on the wall clock)
        return

    def register_rulesets(self, ruleset_definitions: dict[str, Any]) -> None:
        """Plain rulesets only (no statecharts or flowcharts), built as `_Ruleset`."""
        for name, definition in ruleset_definitions.items():
            if name in self._ruleset_directory:
                raise EngineError(f"ruleset {name} is already registered")
            ruleset = _Ruleset(name, self, definition)
            self._ruleset_directory[name] = ruleset
            self._ruleset_list.append(ruleset)

    def get_action(self, action_name: str) -> Callable[[Any], None]:
        def run(c: Any) -> None:
            self._action(action_name, c)

        return run


class Messages(dict[str, dict[str, Any]]):
    """A subject's fact messages by id, with the ids changed since its previous `sync` (None: unknown)."""

    changed: set[str] | None = None


class RulesEngine:
    """Holds one compiled rules version and one engine session per subject.

    `sync(subject, facts)` makes the subject's facts in the engine equal to `facts` (retracting what went,
    asserting what is new or changed; the fact dicts are kept by reference, so callers must not change them);
    `matches(subject)` is the set of (rule id, fact id) currently firing.
    """

    def __init__(self, *, definition: dict[str, Any], version: str, shard_size: int = DEFAULT_SHARD_SIZE,
                 max_sessions: int | None = DEFAULT_MAX_SESSIONS) -> None:
        if not 0 < shard_size < MAX_SESSIONS_PER_REGISTRATION:
            raise EngineError(f"shard_size must be between 1 and {MAX_SESSIONS_PER_REGISTRATION - 1}")
        if max_sessions is not None and max_sessions < 1:
            raise EngineError("max_sessions must be at least 1 (or None: one session per subject, never reused)")
        check_definition(definition)
        # one condition per rule (check_definition) and no option but `pri`: a fact is stored iff a rule fired for it
        self._fired_only_held = all(set(rule) <= {"all", "any", "pri", "run"} for rule in definition.values())
        self.version = version
        self._definition = definition
        self._shard_size = shard_size
        self._prefix = f"rules_{version}_{id(self):x}"
        self._host = _Host(self._on_action)
        self._shards: list[str] = []
        self._shard_hashes: list[set[int]] = []
        self._sids: dict[str, tuple[str, str]] = {}  # subjects holding a session, least recently used first
        self._max_sessions = max_sessions
        self._free: list[tuple[str, str]] = []  # sessions released by dropped subjects, emptied of their facts
        self.evictions = 0
        self._next_sid = 0
        self._asserted: dict[str, dict[str, dict[str, Any]]] = {}
        self._matches: dict[str, dict[str, set[str]]] = {}
        # the engine finds a session's stored facts by a 32-bit FNV-1a hash of their id: a fact whose id collides
        # with a stored one looks already held and never fires. Per subject: hash -> fact id of the stored facts,
        # and the engine id of each fact posted under another id than its own (its id with a "~n" suffix)
        self._stored_hashes: dict[str, dict[int, str]] = {}
        self._engine_ids: dict[str, dict[str, str]] = {}
        self._fired: list[tuple[str, str, str]] = []
        self.action_errors = 0

    # ---- sessions ---------------------------------------------------------------------------------------------
    @property
    def shard_count(self) -> int:
        return len(self._shards)

    def session_of(self, subject_id: str) -> tuple[str, str]:
        """(registration name, sid) of a subject, created on first use."""
        found = self._sids.pop(subject_id, None)
        if found is None:
            if self._free:
                found = self._free.pop()
            elif self._max_sessions is not None and len(self._sids) >= self._max_sessions:
                found = self._evict(next(iter(self._sids)))
                self.evictions += 1
            else:
                found = self._new_session()
        self._sids[subject_id] = found  # (re)inserted last: the most recently used
        return found

    def release(self, subject_id: str) -> None:
        """Retract a subject's facts and keep its session for another subject (its partition moved away)."""
        if subject_id in self._sids:
            self._free.append(self._evict(subject_id))

    def discard(self, subject_id: str) -> None:
        """Forget a subject whose session could not be emptied (an engine call failed while retracting): the
        session is never handed to another subject; the subject gets a fresh one at its next `sync`."""
        self._sids.pop(subject_id, None)
        self._forget(subject_id)

    def _forget(self, subject_id: str) -> None:
        self._asserted.pop(subject_id, None)
        self._matches.pop(subject_id, None)
        self._stored_hashes.pop(subject_id, None)
        self._engine_ids.pop(subject_id, None)

    def _engine_id(self, subject_id: str, fid: str) -> str:
        return self._engine_ids.get(subject_id, {}).get(fid, fid)

    def _evict(self, subject_id: str) -> tuple[str, str]:
        name, sid = self._sids[subject_id]
        held = sorted(self._matches.get(subject_id, {}))  # the facts the engine holds (sync's rule)
        if held:
            self._batch(subject_id, native.retract_facts, name,
                        [_retraction(sid, self._engine_id(subject_id, fid)) for fid in held], held)
        del self._sids[subject_id]
        self._forget(subject_id)
        return name, sid

    def _new_session(self) -> tuple[str, str]:
        if not self._shards or len(self._shard_hashes[-1]) >= self._shard_size:
            name = f"{self._prefix}_s{len(self._shards)}"
            try:
                self._host.register_rulesets({name: json.loads(json.dumps(self._definition))})
            except Exception as exc:  # the engine raises bare Exception on a name clash
                raise EngineError(f"could not register ruleset {name}: {exc}") from exc
            self._shards.append(name)
            self._shard_hashes.append(set())
        hashes = self._shard_hashes[-1]
        while True:
            self._next_sid += 1
            sid = str(self._next_sid)
            h = sid_hash(sid)
            if h not in hashes:
                break
            log.warning("engine sid %s skipped: its hash collides with another session", sid)
        hashes.add(h)
        return self._shards[-1], sid

    # ---- facts ------------------------------------------------------------------------------------------------
    def _on_action(self, rule: str, c: Any) -> None:
        """An action run by durable_rules' own dispatch (`Host.post` and the like; `sync` runs its actions itself)."""
        try:
            m = c.m
            self._fired.append((rule, str(m["sid"]), str(m["id"])))
        except Exception:  # an action must never fail silently inside the engine
            self.action_errors += 1
            log.exception("rule action %s failed", rule)

    def _run_actions(self, ruleset: _Ruleset, state: int) -> None:
        """Record every action the last engine call queued in the session, as `Ruleset.do_actions` would run them
        (one at a time, each completed before the next is started), without its per-action state update: the
        recording action never changes the session's state, and no compiled rule reads it."""
        result = native.start_action_for_state(ruleset._handle, state)
        pending = result[1] if result else None
        while pending:
            for rule_name, message in json.loads(pending).items():
                run = ruleset.runs.get(rule_name, rule_name)
                try:
                    m = message["m"]
                    self._fired.append((run, str(m["sid"]), str(m["id"])))
                except Exception:  # an action must never fail silently inside the engine
                    self.action_errors += 1
                    log.exception("rule action %s failed", run)
            pending = native.complete_and_start_action(ruleset._handle, state)

    def sync(self, subject_id: str, facts: dict[str, dict[str, Any]]) -> None:
        """`facts` may be a `Messages` whose `changed` names the only fact ids that can differ from the previous
        `sync` of this subject (None: any). A subject whose session was emptied since (evicted, released) is
        synced in full whatever `changed` says.

        The facts that went are retracted in one engine call, the new ones asserted in another (one JSON array
        each). Matches are attributed by the (sid, id) of each action; see the module notes for which facts count as
        held (those are retracted when they go or the session is emptied)."""
        changed: set[str] | None = getattr(facts, "changed", None)
        name, sid = self.session_of(subject_id)
        held = self._asserted.get(subject_id)
        if held is None:
            held = self._asserted[subject_id] = {}
            changed = None
        matches = self._matches.setdefault(subject_id, {})
        ids = held if changed is None else [fid for fid in changed if fid in held]
        gone = sorted(fid for fid in ids if facts.get(fid) is not held[fid] and facts.get(fid) != held[fid])
        retract = [fid for fid in gone if matches.pop(fid, None) is not None]
        stored = self._stored_hashes.setdefault(subject_id, {})
        renamed = self._engine_ids.setdefault(subject_id, {})
        texts = []
        for fid in retract:
            eid = renamed.get(fid, fid)
            stored.pop(sid_hash(eid), None)
            texts.append(_retraction(sid, eid))
        for fid in gone:
            del held[fid]
            renamed.pop(fid, None)
        if retract:
            self._batch(subject_id, native.retract_facts, name, texts, retract)
        new = sorted(f for f in (facts if changed is None else changed) if f not in held and f in facts)
        if not new:
            return
        by_eid: dict[str, str] = {}
        posting: set[int] = set()
        for fid in new:
            eid, n = fid, 0
            while (h := sid_hash(eid)) in stored or h in posting:  # would look held: post it under another id
                n += 1
                eid = f"{fid}~{n}"
            posting.add(h)
            by_eid[eid] = fid
            if eid != fid:
                renamed[fid] = eid
        texts = [message_json(facts[fid], sid, eid) for eid, fid in by_eid.items()]  # refuses a bad number first
        self._fired.clear()
        self._batch(subject_id, native.assert_facts, name, texts, new)
        fired: dict[str, set[str]] = {fid: set() for fid in new}
        stray = []
        for rule, s, f in self._fired:
            rules = fired.get(by_eid.get(f, "")) if s == sid else None
            if rules is None:
                stray.append((rule, s, f))
            else:
                rules.add(rule)
        self._fired.clear()
        if stray:
            self.discard(subject_id)
            raise EngineError(f"engine fired for another session or fact: {stray[:3]} (session isolation broken)")
        for fid in new:
            held[fid] = facts[fid]  # callers pass messages they never change (Fact.message() is built once)
        for eid, fid in by_eid.items():
            if fired[fid] or not self._fired_only_held:
                stored[sid_hash(eid)] = fid
        if self._fired_only_held:
            matches.update((fid, rules) for fid, rules in fired.items() if rules)
        else:
            matches.update(fired)

    def _batch(self, subject_id: str, fn: Callable[[int, str], tuple[int, int]], name: str, texts: list[str],
               ids: list[str]) -> None:
        """One engine call on a JSON array of messages of one session, then its actions. The engine goes on past
        a message that matches nothing or is already held, and answers for the whole array; any other failure
        leaves the session in a state this adapter does not know, so the subject gives it up (`discard`)."""
        ruleset = self._host.get_ruleset(name)
        try:
            _code, state = fn(ruleset._handle, "[" + ",".join(texts) + "]")
            self._run_actions(ruleset, state)
        except Exception as exc:
            self.discard(subject_id)
            what = ids[0] if len(ids) == 1 else f"{len(ids)} facts ({ids[0]} ... {ids[-1]})"
            raise EngineError(f"engine call {fn.__name__} failed on {what}: {exc}") from exc

    def matches(self, subject_id: str) -> set[tuple[str, str]]:
        return {(rule, fid) for fid, rules in self._matches.get(subject_id, {}).items() for rule in rules}

    def engine_facts(self, subject_id: str) -> list[dict[str, Any]]:
        """The facts the engine holds for a subject (for tests and diagnostics)."""
        name, sid = self.session_of(subject_id)
        return list(self._host.get_facts(name, sid))
