"""What a trainer's pod answers at /metrics is foreign text, and its author chooses it (issue
24, finding 12): the operator's reader follows no redirect (which would point it anywhere the
operator can reach) and copies none of the answer's words into the status, which every reader
of the fine-tune (and the dashboard's list) shows."""

from __future__ import annotations

import http.server
import threading
import time

from gft_operator.scraper import Access, Scraper, Target

SECRET = "SECRET-FROM-THE-POD"
METRICS = b"# TYPE gft_global_step gauge\ngft_global_step 5\n"


def serve(handle) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    """A server on loopback whose GETs ``handle(request)`` answers; the paths it was asked."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            handle(self)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, asked


def answer(code: int, body: bytes, *headers: tuple[str, str], reason: str | None = None):
    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(code, reason)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


def read(port: int):
    scraper = Scraper(None, Access.POD_IP, interval=1, timeout=2, sink=lambda *a: False)  # type: ignore[arg-type]
    return scraper.read(Target("ml", "run", "run-pod", "127.0.0.1", port, 1, time.time()))


def test_the_scraper_follows_no_redirect_and_copies_no_foreign_text() -> None:
    elsewhere, asked_elsewhere = serve(answer(200, METRICS))
    moved_to = f"http://127.0.0.1:{elsewhere.server_address[1]}/metrics"
    moving, _ = serve(answer(302, SECRET.encode(), ("Location", moved_to)))
    reading, problem = read(moving.server_address[1])
    assert reading is None and problem is not None, "the redirect was followed"
    assert problem.reason == "MetricsUnreachable" and "redirect" in problem.message
    assert "302" in problem.message and SECRET not in problem.message
    assert asked_elsewhere == []
    garbage, _ = serve(answer(200, f"{SECRET} <script>alert(1)</script>\n".encode()))
    _, problem = read(garbage.server_address[1])
    assert problem is not None and problem.reason == "MetricsInvalid"
    assert SECRET not in problem.message and "script" not in problem.message, problem.message
    failing, _ = serve(answer(500, b"", reason=SECRET))
    _, problem = read(failing.server_address[1])
    assert problem is not None and "HTTP 500" in problem.message
    assert SECRET not in problem.message, problem.message
    for server in (elsewhere, moving, garbage, failing):
        server.shutdown()
