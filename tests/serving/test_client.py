"""The HTTP client under a served teacher: which failures it retries (with backoff) and how every
failure it gives up on reads, against a small HTTP server of the test's own."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kdtune.errors import KDTuneError
from kdtune.serving import ServerClient, ServerError
from tests.serving.conftest import free_port


@pytest.fixture
def server():
    """Answers POSTs from a script of (status, body) pairs, one per request; records the requests."""
    script, seen = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            status, body = script.pop(0)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", script, seen
    httpd.shutdown()


def test_busy_and_failing_answers_are_retried_until_one_succeeds(server):
    url, script, seen = server
    script += [(503, {"error": {"message": "busy"}}), (500, {}), (200, {"ok": 1})]
    client = ServerClient(url, retries=3, backoff_s=0.01)
    assert client.post("/v1/completions", {"prompt": [1]}) == {"ok": 1}
    assert [path for path, _ in seen] == ["/v1/completions"] * 3


def test_a_refused_request_is_not_retried_and_reads_as_one_line(server):
    url, script, seen = server
    script += [(400, {"error": {"message": "Requested prompt logprobs of 64, which is greater than max allowed: 20",
                                "code": 400}})]
    with pytest.raises(ServerError) as raised:
        ServerClient(url, retries=3, backoff_s=0.01).post("/v1/completions", {})
    assert len(seen) == 1 and raised.value.status == 400
    assert str(raised.value) == (f"teacher_server: POST {url}/completions answered 400: Requested prompt logprobs "
                                 f"of 64, which is greater than max allowed: 20")


def test_failing_after_every_retry_names_the_address_and_the_tries(server):
    url, script, _ = server
    script += [(502, {"error": {"message": "bad gateway"}})] * 3
    with pytest.raises(ServerError, match="answered 502: bad gateway"):
        ServerClient(url, retries=2, backoff_s=0.01).post("/v1/completions", {})


def test_no_server_is_one_line_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(KDTuneError) as raised:
        ServerClient(url, retries=1, backoff_s=0.01).get("/v1/models")
    message = str(raised.value)
    assert message.startswith(f"teacher_server: cannot reach {url}/models (") and "2 tries" in message
    assert "\n" not in message


def test_routes_outside_the_api_root_come_from_the_servers_root():
    client = ServerClient("http://host:8000/v1/")
    assert client.url("/v1/completions") == "http://host:8000/v1/completions"
    assert client.url("/tokenize") == "http://host:8000/tokenize"
