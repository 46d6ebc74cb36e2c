"""JSON over HTTP to an OpenAI-compatible server (vLLM, SGLang): retries with backoff on connection
errors, timeouts and 5xx answers; every failure that is left becomes one `KDTuneError` line naming
the server, the route and what went wrong."""

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from kdtune.errors import KDTuneError

RETRIED_STATUS = {429, 500, 502, 503, 504}  # busy or failing for now: worth another try


class ServerError(KDTuneError):
    """The server answered, but with an error (4xx, or 5xx after the retries)."""

    def __init__(self, message: str, status: int, detail: str):
        super().__init__(message)
        self.status, self.detail = status, detail


class ServerClient:
    """``base_url`` is the API root, as clients are given it (``http://host:port/v1``); routes outside
    it (``/tokenize``, ``/health``) are taken from the server's root."""

    def __init__(self, base_url: str, *, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 max_concurrency: int = 8, what: str = "teacher_server"):
        self.api = base_url.rstrip("/")
        self.root = self.api[: -len("/v1")] if self.api.endswith("/v1") else self.api
        self.timeout_s, self.retries, self.backoff_s, self.what = timeout_s, retries, backoff_s, what
        self.max_concurrency = max_concurrency
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn, items) -> list:
        """``[fn(item) for item in items]`` with up to ``max_concurrency`` calls in flight, in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=self.what)
        return list(self._pool.map(fn, items))

    def get(self, route: str):
        return self._call("GET", route, None)

    def post(self, route: str, body: dict):
        return self._call("POST", route, body)

    def url(self, route: str) -> str:
        """``/v1/...`` routes under ``base_url``; others under the server's root."""
        return self.api + route[len("/v1"):] if route.startswith("/v1/") else self.root + route

    def _call(self, method: str, route: str, body: dict | None):
        url = self.url(route)
        data = None if body is None else json.dumps(body).encode()
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except ValueError:  # some routes answer plain text (vLLM's load_lora_adapter)
                    return raw.decode(errors="replace")
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code not in RETRIED_STATUS or attempt == self.retries:
                    raise ServerError(f"{self.what}: {method} {url} answered {e.code}: {detail}", e.code,
                                      detail) from None
                failure = f"{e.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                failure = str(reason) or type(reason).__name__
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    failure = f"no answer within timeout_s={self.timeout_s:g}"
        tries = f"{self.retries + 1} tries" if self.retries else "1 try"
        raise KDTuneError(f"{self.what}: cannot reach {url} ({failure}; {tries}); is the server running at "
                          f"{self.api}?")


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error body, else the body's first line."""
    try:
        raw = e.read().decode(errors="replace")
    except OSError:
        return e.reason or ""
    try:
        body = json.loads(raw)
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        return " ".join(str(message or body).split())
    except (ValueError, AttributeError):
        return " ".join(raw.split())[:300]
