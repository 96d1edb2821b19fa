"""What the API says about an id: the outcome kinds and the Completion, with its field lists.

The one place the Completion's fields are named. The client validates against these lists,
the dataset derives its file schema from them, the sink its columns, and the simulator the
documents it serves; adding a field of the API is a change here and nowhere else.
"""

from __future__ import annotations

import enum
from typing import TypedDict


class Kind(enum.StrEnum):
    """What one poll established about an id; the value is the row's ``status``."""

    COMPLETED = "completed"
    RETRIEVING = "retrieving"
    FAILED = "failed"
    INVALID = "invalid"


TERMINAL_KINDS = (Kind.COMPLETED, Kind.FAILED, Kind.INVALID)

# Strings every Completion carries (the spec's required fields, ``fanouts`` aside).
TEXT_FIELDS = ("model", "query", "html", "prompt", "completion", "sources", "ads")
# A list of strings; null or absent means none (some models expose no fanouts).
LIST_FIELDS = ("fanouts",)
# Set only when the request was targeted; otherwise null.
TARGETING_FIELDS = ("device", "country", "subdivision", "city")
# Every field the spec lists: anything else the server sends goes to ``extra``.
API_FIELDS = (*TEXT_FIELDS, *LIST_FIELDS, *TARGETING_FIELDS)
KNOWN_FIELDS = frozenset(API_FIELDS)
# Where the fields beyond the spec are kept, as one JSON object (None when there are none).
EXTRA_FIELD = "extra"
# What a status object says about its id: the 202 of ``/ai/completions`` (``retrieving``,
# ``failed``) and the 200 status object of the newer ``/ai`` (which adds ``archiving`` and
# ``successful``). A status object carries no completion, so ``successful`` alone gives no row
# to store: the id is polled again until the answer is the completion itself (or --max-wait).
# Any other value is a bad answer, retried like one.
STATUS_KINDS: dict[str, Kind] = {
    "retrieving": Kind.RETRIEVING,  # the conversation is in progress
    "archiving": Kind.RETRIEVING,  # over, and being stored: the completion comes next
    "successful": Kind.RETRIEVING,  # over, but this answer has no completion in it
    "failed": Kind.FAILED,  # the conversation failed: terminal (resubmit the prompt)
}
# The statuses that mean "ask again later".
PENDING_STATUSES = frozenset(s for s, kind in STATUS_KINDS.items() if kind is Kind.RETRIEVING)


class Completion(TypedDict):
    """A validated 200 answer: the spec's fields, plus ``extra`` for anything beyond them."""

    model: str
    query: str
    html: str
    prompt: str
    completion: str
    sources: str
    ads: str
    fanouts: list[str]
    device: str | None
    country: str | None
    subdivision: str | None
    city: str | None
    extra: str | None


class Headline(TypedDict):
    """What the sink reads of a Completion it stores from the answer's JSON line
    (``sink._Bodies``): the partition's model and the fields beyond the spec. A long answer
    is checked without decoding its long strings (``client.parse_long_ok``), so this is all
    the loop ever has of it; a ``Completion`` is one too."""

    model: str
    extra: str | None
