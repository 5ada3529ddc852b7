"""A local stand-in for the Hugging Face Hub's upload API, on loopback: the three requests
``HfApi.create_repo`` and ``HfApi.upload_folder`` make (create, preupload, commit), answered as
the hub answers them, or every request refused with one status code. Every file is asked for
as a "regular" upload, so the commit carries the files themselves and the server keeps them."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Hub:
    url: str
    refuse: int | None = None
    repos: dict[str, dict] = field(default_factory=dict)  # repo id -> create payload
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> path -> bytes
    tokens: list[str] = field(default_factory=list)


@contextmanager
def hub_server() -> Iterator[Hub]:
    hub = Hub(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(hub.refuse or 404, {"error": "not found"})

        def do_POST(self) -> None:
            hub.tokens.append(self.headers.get("Authorization", ""))
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if hub.refuse:
                self._answer(hub.refuse, {"error": f"refused with {hub.refuse}"})
                return
            if self.path == "/api/repos/create":
                payload = json.loads(body)
                repo = f"{payload.get('organization')}/{payload['name']}"
                hub.repos[repo] = payload
                self._answer(200, {"url": f"{hub.url}/{repo}"})
                return
            found = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)", self.path)
            if not found:
                self._answer(404, {"error": f"no route {self.path}"})
                return
            repo, what, _revision = found.groups()
            if what == "preupload":
                files = json.loads(body)["files"]
                self._answer(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in files
                ]})  # fmt: skip
                return
            for line in body.splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    value = item["value"]
                    hub.files.setdefault(repo, {})[value["path"]] = base64.b64decode(
                        value["content"]
                    )
            self._answer(200, {"commitUrl": f"{hub.url}/{repo}/commit/1", "commitOid": "1" * 40,
                               "pullRequestUrl": None})  # fmt: skip

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
