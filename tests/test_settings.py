"""Tests of run settings: every bad value fails early with a message naming its flag."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from harvester.errors import UsageError
from harvester.settings import DEFAULT_BASE_URL, ENDPOINT_PATH, RunSettings, is_loopback_host

TOKEN = "secret-token-5c1e0b7d9a"


def case_id(value: Any) -> str | None:
    """Readable test ids: ``rate=0`` for a dict of changes, the flag itself otherwise."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return None


def make(**changes: Any) -> RunSettings:
    """Settings with sensible defaults and ``changes`` applied."""
    values: dict[str, Any] = {"ids_path": Path("ids.csv"), "out_dir": Path("out"), "token": TOKEN}
    values.update(changes)
    return RunSettings(**values)


def test_defaults_are_valid() -> None:
    """The defaults need only paths and a token, and point at the real API over https."""
    settings = make()
    assert settings.base_url == DEFAULT_BASE_URL
    assert settings.endpoint_url == DEFAULT_BASE_URL + ENDPOINT_PATH


def test_endpoint_ignores_trailing_slash() -> None:
    """A base URL with a trailing slash gives the same endpoint."""
    assert make(base_url="https://api.example.com/").endpoint_url == (
        "https://api.example.com/ai/completions"
    )


@pytest.mark.parametrize("token", ["", None])
def test_token_missing(token: str | None) -> None:
    """No token fails and says where a token comes from."""
    with pytest.raises(UsageError, match="MASSIVE_API_TOKEN") as info:
        make(token=token)
    assert "--token-file" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"rate": 0}, "--rate"),
        ({"rate": -5.0}, "--rate"),
        ({"rate": math.nan}, "--rate"),
        ({"concurrency": 0}, "--concurrency"),
        ({"concurrency": -1}, "--concurrency"),
        ({"max_in_play": 0}, "--max-in-play"),
        ({"max_wait": 0}, "--max-wait"),
        ({"max_wait": -1.0}, "--max-wait"),
        ({"max_wait": math.nan}, "--max-wait"),
        ({"poll_interval": 0}, "--poll-interval"),
        ({"poll_interval": math.nan}, "--poll-interval"),
        ({"poll_interval": 5.0, "max_poll_interval": 4.0}, "--max-poll-interval"),
        ({"max_poll_interval": math.nan}, "--max-poll-interval"),
        ({"max_retries": -1}, "--max-retries"),
        ({"flush_interval": 0}, "--flush-interval"),
        ({"request_timeout": 0}, "--request-timeout"),
        ({"request_timeout": -1.0}, "--request-timeout"),
        ({"max_body_bytes": 1023}, "--max-body-bytes"),
        ({"max_body_bytes": 0}, "--max-body-bytes"),
        ({"id_column": ""}, "--id-column"),
        ({"id_column": "   "}, "--id-column"),
        ({"backoff_base": 0}, "backoff"),
        ({"backoff_base": 2.0, "backoff_max": 1.0}, "backoff"),
        ({"flush_rows": 0}, "flush"),
        ({"flush_bytes": 0}, "flush"),
    ],
    ids=case_id,
)
def test_bad_values_name_their_flag(changes: dict[str, Any], flag: str) -> None:
    """Each out-of-range value raises ``UsageError`` naming the flag (or setting) to fix."""
    with pytest.raises(UsageError) as info:
        make(**changes)
    assert flag in str(info.value)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"rate": math.inf}, "--rate"),
        ({"rate": 1e300}, "--rate"),
        ({"log_interval": 0}, "--log-interval"),
        ({"log_interval": -1.0}, "--log-interval"),
        ({"connect_timeout": 0}, "connect"),
        ({"connect_timeout": -1.0}, "connect"),
        ({"retry_after_max": -1.0}, "retry"),
    ],
    ids=case_id,
)
def test_values_that_break_later_are_refused_now(changes: dict[str, Any], flag: str) -> None:
    """Values that would crash or misbehave once running are refused up front."""
    with pytest.raises(UsageError) as info:
        make(**changes)
    assert flag in str(info.value)


def test_replace_revalidates() -> None:
    """``dataclasses.replace`` cannot sneak a bad value past validation."""
    with pytest.raises(UsageError, match="--rate"):
        dataclasses.replace(make(), rate=0)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "render.joinmassive.com",
        "ftp://render.joinmassive.com",
        "https://",
        "https:///ai",
        "file:///etc/passwd",
        "ws://localhost",
        "http://[::1",
        "https://example.com:99999",
        "https://example.com:port",
    ],
)
def test_bad_base_url(url: str) -> None:
    """A base URL that is not a usable http(s) URL is a ``UsageError`` naming --base-url."""
    with pytest.raises(UsageError, match="--base-url"):
        make(base_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "http://render.joinmassive.com",
        "http://10.0.0.5:8080",
        "http://0.0.0.0:8080",
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io",
        "http://[2001:db8::1]",
    ],
)
def test_plain_http_to_remote_host_refused(url: str) -> None:
    """The token is not sent over plain http to a non-loopback host without --allow-insecure."""
    with pytest.raises(UsageError, match="--allow-insecure"):
        make(base_url=url)


@pytest.mark.parametrize("url", ["http://render.joinmassive.com", "http://10.0.0.5:8080"])
def test_plain_http_allowed_with_allow_insecure(url: str) -> None:
    """--allow-insecure accepts plain http to any host."""
    assert make(base_url=url, allow_insecure=True).base_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.5.6.7",
        "http://localhost:8080",
        "http://LOCALHOST:8080",
        "http://[::1]:8080",
        "https://render.joinmassive.com",
        "https://10.0.0.5",
    ],
)
def test_loopback_http_and_any_https_allowed(url: str) -> None:
    """Plain http to loopback, and https anywhere, need no flag."""
    assert make(base_url=url).base_url == url


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.255.0.1", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
        ("localhost.example", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    """Only localhost, 127.0.0.0/8 and ::1 count as loopback."""
    assert is_loopback_host(host) is loopback


def test_repr_never_shows_the_token() -> None:
    """Neither repr nor str of the settings contains the token."""
    settings = make()
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings)
    assert TOKEN not in f"{settings!r} {settings}"


def test_errors_never_show_the_token() -> None:
    """A validation error does not echo the token."""
    with pytest.raises(UsageError) as info:
        make(rate=0)
    assert TOKEN not in str(info.value)
    with pytest.raises(UsageError) as info:
        make(base_url="http://example.com")
    assert TOKEN not in str(info.value)
