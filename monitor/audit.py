"""The audit trail: an append-only, hash-chained log (21 CFR Part 11 §11.10(e), ICH E6(R3)).

Each entry holds who, when, what and the previous entry's hash; its own hash covers all of that. The sequence
number is not hashed: the chain itself fixes the order, so `verify` can tell an edited entry (its hash no
longer matches its content), a removed one (the sequence jumps and the chain breaks) and a reordered one (it
follows an entry other than the one before it) apart, and says which.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: str
    actor: str
    action: str
    data: dict[str, Any]
    prev_hash: str
    hash: str


def entry_hash(*, at: str, actor: str, action: str, data: dict[str, Any], prev_hash: str) -> str:
    body = json.dumps({"at": at, "actor": actor, "action": action, "data": data, "prev": prev_hash},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def verify(entries: list[AuditEntry]) -> list[str]:
    """Problems found, in order; an empty list means the trail is intact."""
    problems: list[str] = []
    by_hash = {e.hash: e for e in entries}
    previous: AuditEntry | None = None
    for e in sorted(entries, key=lambda x: x.seq):
        if entry_hash(at=e.at, actor=e.actor, action=e.action, data=e.data, prev_hash=e.prev_hash) != e.hash:
            problems.append(f"entry {e.seq} was altered: its content does not match its hash ({e.action} by {e.actor})")
        expected_prev = previous.hash if previous is not None else GENESIS
        expected_seq = previous.seq + 1 if previous is not None else 1
        if e.prev_hash != expected_prev:
            earlier = by_hash.get(e.prev_hash)
            if earlier is not None and earlier.seq > e.seq:
                problems.append(f"entries out of order: entry {e.seq} was written after entry {earlier.seq}")
            elif earlier is not None and earlier.seq < e.seq - 1:
                problems.append(f"entries {earlier.seq + 1}..{e.seq - 1} were removed or moved: entry {e.seq} "
                                f"follows entry {earlier.seq}")
            elif e.seq != expected_seq:
                problems.append(f"entries {expected_seq}..{e.seq - 1} were removed (the chain breaks at {e.seq})")
            else:
                problems.append(f"entry {e.seq} does not follow entry {e.seq - 1}: the chain is broken")
        elif e.seq != expected_seq:
            problems.append(f"sequence jumps from {expected_seq - 1} to {e.seq} although the chain is unbroken")
        previous = e
    return problems
