"""nginx on loopback answering every ``GET /ai/completions`` (and ``/ai``) with one fixed body.

A server far faster than any Python client (about 120k requests/s here), so a client benchmark
measures the client. Needs the ``nginx`` binary (Debian: ``apt-get install nginx-light``);
``find_nginx`` returns None where it is missing so callers can skip with a clear line.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ._common import free_port

_CONFIG = """
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /ai {{
            default_type application/json;
            try_files /completion.json =404;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary, or None (``apt-get install nginx-light`` provides it)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


@contextlib.contextmanager
def nginx_serving(body: bytes) -> Iterator[str]:
    """Run nginx answering ``body`` as JSON to every /ai... request; yield its base URL."""
    binary = find_nginx()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    with tempfile.TemporaryDirectory(prefix="harvester-nginx-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # nginx's workers run as another user when started by root
        (root / "tmp").mkdir()
        (root / "completion.json").write_bytes(body)
        port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(_CONFIG.format(root=root, port=port))
        proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    urllib.request.urlopen(f"{url}/ai/completions?id=x", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(
                            f"nginx did not start: {(root / 'error.log').read_text()[-500:]}"
                        ) from None
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)
