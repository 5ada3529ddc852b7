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


# -- The review of issue 24's dashboard, finding 6: a slow or malformed pod stalls nobody ------

GPU_METRICS = b'# TYPE gft_gpu_utilization_ratio gauge\ngft_gpu_utilization_ratio{gpu="0"} 0.5\n'


def raw(reply: bytes, trickle: float = 0.0):
    """A handler that writes ``reply`` as it is (no status line of its own), a byte each
    ``trickle`` seconds when given: a pod that is not an HTTP server, or one that crawls."""

    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        try:
            for i in range(len(reply)) if trickle else [None]:
                h.wfile.write(reply[i : i + 1] if i is not None else reply)
                h.wfile.flush()
                if trickle:
                    time.sleep(trickle)
        except OSError:
            pass  # the reader gave up: what the test wants

    return handle


def in_thread(f, limit: float):
    """``f()`` in a thread; (its result or exception, seconds) or a failure after ``limit``."""
    import pytest

    out: list = []

    def call() -> None:
        try:
            out.append(f())
        except BaseException as e:  # handed to the test as it is
            out.append(e)

    started = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"the read was still going after {limit:g} s")
    return out[0], time.monotonic() - started


def test_a_trickling_pod_is_given_up_at_the_deadline_not_read_for_ever() -> None:
    slow = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + METRICS * 50
    trickler, _ = serve(raw(slow, trickle=0.25))
    got, took = in_thread(lambda: read(trickler.server_address[1]), limit=12)
    assert not isinstance(got, BaseException), got
    reading, problem = got
    assert reading is None and problem is not None and problem.reason == "MetricsTimeout"
    assert took < 2 + 2, f"a 2 s read took {took:.1f} s"


def test_a_reply_that_is_not_http_is_a_problem_named_in_our_words_not_a_crash() -> None:
    for reply in (f"{SECRET} <script>\r\n\r\n".encode(), b"HTTP/1.1 2000000 OK\r\n\r\n"):
        port = serve(raw(reply))[0].server_address[1]
        got, _ = in_thread(lambda port=port: read(port), limit=10)
        assert not isinstance(got, BaseException), f"{type(got).__name__}: {got}"
        reading, problem = got
        assert reading is None and problem is not None and problem.reason == "MetricsUnreachable"
        assert SECRET not in problem.message and "script" not in problem.message, problem.message


def _on_loopbacks(handlers: list) -> int:
    """Servers on 127.0.0.1, .2, .3... (one per handler) on one port, as a run's pods on their
    own IPs share the metrics port."""
    import socket

    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for i, handle in enumerate(handlers):
                server = _server(handle, (f"127.0.0.{i + 1}", port))
                threading.Thread(target=server.serve_forever, daemon=True).start()
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every loopback address")


def _server(handle, address) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            handle(self)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    return server


def test_a_bad_or_trickling_peer_is_a_missing_peer_and_frees_its_reader() -> None:
    pod0 = METRICS + GPU_METRICS
    port = _on_loopbacks([
        answer(200, pod0),  # pod 0
        answer(200, GPU_METRICS),  # a good peer
        raw(b"SECRET not http\r\n\r\n"),  # a peer that is not an HTTP server
        raw(b"HTTP/1.0 200 OK\r\n\r\n" + GPU_METRICS * 40, trickle=0.25),  # one that crawls
    ])  # fmt: skip
    scraper = Scraper(None, Access.POD_IP, interval=1, timeout=2, sink=lambda *a: False,  # type: ignore[arg-type]
                      workers=2)  # fmt: skip
    peers = (("good", "127.0.0.2"), ("liar", "127.0.0.3"), ("slow", "127.0.0.4"))
    target = Target("ml", "mn", "mn-0", "127.0.0.1", port, 1, time.time(), peers=peers)
    got, took = in_thread(lambda: scraper.read(target), limit=15)
    assert not isinstance(got, BaseException), f"{type(got).__name__}: {got}"
    reading, problem = got
    assert problem is None and reading is not None, problem
    assert len(reading.peer_gpus) == 1, reading.peer_gpus  # the good peer alone
    assert took < 2 + 3, f"a 2 s read took {took:.1f} s"
    # Whoever gave up on the crawling peer, its reader is free again by the deadline.
    free, waited = in_thread(lambda: scraper.peer_pool.submit(lambda: "free").result(), limit=10)
    assert free == "free" and waited < 3, f"the peer readers were busy {waited:.1f} s more"


def test_a_pod_on_an_ipv6_address_is_read() -> None:
    import socket

    class Server6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer(200, METRICS)(self)

        def log_message(self, *args: object) -> None:
            pass

    server = Server6(("::1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scraper = Scraper(None, Access.POD_IP, interval=1, timeout=2, sink=lambda *a: False)  # type: ignore[arg-type]
    target = Target("ml", "run", "run-pod", "::1", server.server_address[1], 1, time.time())
    assert scraper.where(target).startswith("http://[::1]:")
    reading, problem = scraper.read(target)
    assert problem is None and reading is not None, problem
    server.shutdown()
