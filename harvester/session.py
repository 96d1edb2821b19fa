"""The aiohttp transport: the tuned session harvester makes (``--transport aiohttp``, and
``harvester bench``) and ``SessionTransport``, polls over any aiohttp session (tests inject
theirs). Imported only when one is used: ``harvester run`` on its default transport
(``http1.py``) does not load aiohttp's client.

Every aiohttp exception is converted here into the package's error families, with the labels
``http1.py`` uses (``raise ... from exc``).
"""

from __future__ import annotations

import aiohttp
from yarl import URL

from .errors import BadResponseError, TransientError, TransportError
from .http1 import Reply, os_cause, tls_error


def make_session(
    token: str, *, limit: int, connect_timeout: float, request_timeout: float
) -> aiohttp.ClientSession:
    """A session with auth and JSON headers set once, not per request; call inside the loop.

    Tuned for one API and many small requests (measured in ``benchmarks/throughput.py``): no
    cookie jar (the API sets none, and a real jar filters cookies on every request), and one
    timer a request (``total``) rather than a read timer re-armed on every chunk received.
    """
    timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=300)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=headers,
        raise_for_status=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    # aiohttp resends a GET once, by itself, when a kept-alive connection drops before the
    # answer: a request the pacer never saw, which could push the server past --rate. The
    # scheduler retries such an id through the pacer instead. (No public switch; aiohttp's
    # own test client sets the same attribute.)
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


class SessionTransport:
    """Polls over an aiohttp session (injected by tests, or ``--transport aiohttp``)."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: str, max_body_bytes: int) -> None:
        self._session = session
        self._prefix = endpoint + "?id="
        self._max_body = max_body_bytes

    async def fetch(self, conversation_id: str) -> Reply:
        """One poll; every aiohttp exception comes out as one of the package's families."""
        # The id is a canonical uuid (validated upstream), so the URL needs no quoting.
        url = URL(self._prefix + conversation_id, encoded=True)
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                body = await self._read_body(resp)
                headers = resp.headers
                return Reply(
                    resp.status, headers.get("Content-Type", ""), headers.get("Retry-After"), body
                )
        except TransientError:
            raise
        except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one
            raise TransportError("timeout", "connect timeout") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise TransportError("timeout", "request timed out") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise tls_error(self._prefix.split("/")[2], exc) from exc
        except aiohttp.ClientSSLError as exc:
            # Not the certificate: a handshake refused or garbled (a plain-http port, a busy
            # balancer). Retried like any failed connection; exit 5 if it never answers.
            raise TransportError("connect_error", f"TLS handshake failed ({exc})") from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportError("connect_error", connect_cause(exc)) from exc
        except aiohttp.ClientPayloadError as exc:
            raise BadResponseError("truncated_body", "body ended early") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise TransportError("disconnected", "connection dropped") from exc
        except aiohttp.ClientError as exc:
            raise TransportError("client_error", type(exc).__name__) from exc

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        length = resp.content_length
        if length is not None and length > self._max_body:
            raise BadResponseError("too_large", f"body of {length} bytes over the cap")
        if length is not None and "Content-Encoding" not in resp.headers:
            # The common case: the size is known and the body is sent as is, so it cannot
            # grow past the cap; one read, not a chunk loop.
            return await resp.read()
        # Counted as it is read, after decompression: a small gzip body can inflate past
        # the cap, and Content-Length only gives the compressed size.
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_body:
                raise BadResponseError("too_large", f"body over the {self._max_body}-byte cap")
            chunks.append(chunk)
        return b"".join(chunks)


def connect_cause(exc: aiohttp.ClientConnectorError) -> str:
    """Why aiohttp could not connect, in the words ``http1.os_cause`` uses."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"DNS lookup of {exc.host} failed ({exc.os_error.strerror or exc.os_error})"
    return os_cause(exc.host, exc.os_error)
