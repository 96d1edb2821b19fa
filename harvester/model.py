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
# Status values of the API's 202 (and the newer 200 status object) that mean "ask again".
PENDING_STATUSES = frozenset(("retrieving", "archiving"))  # archiving: the newer API's step


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
