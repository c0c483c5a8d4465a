"""What the state store answers for a request: a ``Verdict`` and its data (an ``Outcome``), and who
claims a request in the step that submits it (a ``Claimant``).

Invariant 7: an outcome's value and error are JSON text, decoded here and nowhere else; one that
does not decode is a ``GirderError`` naming the key (a corrupt record), never unpickled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import GirderError, corrupt
from .keys import Request, decode_value

__all__ = ["NO_CLAIMANT", "Claimant", "Outcome", "Verdict", "notified", "verdict_of"]

logger = logging.getLogger(__name__)


class Verdict(str, Enum):
    """What the store answers for a request: its state, or what the caller must do next."""

    #: submit: it is queued now and nothing was offered; the caller must publish an offer.
    OFFER = "offer"
    #: submit: already queued and offered. A record's state: waiting for an executor.
    QUEUED = "queued"
    #: A live executor holds it (data: the owner token).
    RUNNING = "running"
    #: submit with a claimant, claim: the caller holds it now and must run it (data: payload).
    CLAIMED = "claimed"
    #: Settled with a value (data: the value's JSON).
    DONE = "done"
    #: Settled with an error (data: the error's JSON); a submit restarts it unless memoized.
    FAILED = "failed"
    #: submit: refused, it (transitively) waits for its requester (data: the cycle's keys).
    CYCLE = "cycle"
    #: submit: refused, the requester's run was cancelled. cancel: it cancelled (data: the keys).
    CANCELLED = "cancelled"
    #: claim, forget: the store has no record of it (forgotten, expired or lost).
    ABSENT = "absent"
    #: submit, claim, forget: a record girder never writes (data: what is wrong); forget drops it.
    CORRUPT = "corrupt"

    def __str__(self) -> str:
        return self.value


_VERDICTS = {v.value: v for v in Verdict}
_SETTLED = (Verdict.DONE, Verdict.FAILED)


def verdict_of(text: str) -> Verdict:
    try:
        return _VERDICTS[text]
    except KeyError:
        raise GirderError(f"the state store answered an unknown verdict {text!r}") from None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the store answered for one request: a ``Verdict`` and its data."""

    key: str
    verdict: Verdict
    data: str

    @property
    def settled(self) -> bool:
        return self.verdict in _SETTLED

    def value(self, request: Request | None = None) -> Any:
        """The value of a ``done`` outcome; raises a ``GirderError`` naming the key if it does not decode."""
        try:
            return decode_value(self.data)
        except Exception as exc:  # not JSON, or kombu's type tags broken: girder never wrote it
            raise corrupt(self.key, f"its value is not JSON ({exc!r:.200})", request and request.readable) from None

    def error(self, request: Request | None = None) -> GirderError:
        """The error of a ``failed`` or ``corrupt`` outcome (naming the key if it does not decode)."""
        readable = request and request.readable
        if self.verdict is Verdict.CORRUPT:
            return corrupt(self.key, self.data, readable)
        try:
            return GirderError.from_dict(decode_value(self.data))
        except Exception as exc:
            return corrupt(self.key, f"its error is not a girder error in JSON ({exc!r:.200})", readable)


@dataclass(frozen=True)
class Claimant:
    """Who claims request ``key`` in the same step that submits it, to run it inline."""

    key: str
    owner: str
    node: str
    lease_ms: int


NO_CLAIMANT = Claimant("", "", "", 0)


def notified(mailbox: str, entry: str) -> Outcome | None:
    """The outcome a mailbox ``entry`` tells: complete.lua and fail.lua (or, on a Redis Cluster,
    their callers) push ``<verdict>:<key>:<data>`` (data may hold colons); else None, logged."""
    parts = entry.split(":", 2)
    if len(parts) == 3 and parts[0] in ("done", "failed"):
        return Outcome(parts[1], _VERDICTS[parts[0]], parts[2])
    logger.warning("girder: skipped an entry of mailbox %s that girder never writes: %.80r", mailbox, entry)
    return None
