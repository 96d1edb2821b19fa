"""harvester: pull async completions out of the Massive API into a Parquet dataset."""

from .client import CompletionsClient, Kind
from .errors import (
    BadResponseError,
    FatalApiError,
    FatalError,
    HarvesterError,
    InputError,
    ServerError,
    SinkError,
    ThrottledError,
    TlsError,
    TransientError,
    TransportError,
    UsageError,
)
from .runner import RunResult, harvest
from .settings import RunSettings

__all__ = [
    "BadResponseError",
    "CompletionsClient",
    "FatalApiError",
    "FatalError",
    "HarvesterError",
    "InputError",
    "Kind",
    "RunResult",
    "RunSettings",
    "ServerError",
    "SinkError",
    "ThrottledError",
    "TlsError",
    "TransientError",
    "TransportError",
    "UsageError",
    "harvest",
]
__version__ = "0.1.0"
