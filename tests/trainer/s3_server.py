"""A real S3-compatible server for the export tests: SeaweedFS (``weed server -s3``, built from
the Go module proxy by ``make tools``), on loopback, with one identity whose keys it checks."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devcluster.build import tool
from devcluster.cluster import component_port

ACCESS_KEY = "gft-test-access"
SECRET_KEY = "gft-test-secret-0123456789"


@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def client(self, secret: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret or self.secret_key,
        )


@contextmanager
def seaweedfs(root: Path, timeout: float = 120.0, host: str = "127.0.0.1") -> Iterator[S3]:
    """SeaweedFS on ``host``: loopback, or the proving ground's node address for pods on the
    runner to reach it (their network namespaces do not see this machine's loopback)."""
    weed = tool("weed")
    if not weed.is_file():
        raise RuntimeError(f"{weed} is missing: run `make tools` (it builds SeaweedFS once)")
    root.mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "gft",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))  # fmt: skip
    port = {k: component_port(host) for k in ("m", "mg", "v", "vg", "f", "fg", "s", "sg")}
    cmd = [
        str(weed), "server", f"-dir={root / 'data'}", f"-ip={host}", f"-ip.bind={host}",
        f"-master.port={port['m']}", f"-master.port.grpc={port['mg']}",
        f"-volume.port={port['v']}", f"-volume.port.grpc={port['vg']}",
        "-filer", f"-filer.port={port['f']}", f"-filer.port.grpc={port['fg']}",
        "-s3", f"-s3.port={port['s']}", f"-s3.port.grpc={port['sg']}", f"-s3.config={config}",
        "-volume.max=4", "-master.volumeSizeLimitMB=64",
    ]  # fmt: skip
    (root / "data").mkdir(exist_ok=True)
    log = (root / "weed.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    s3 = S3(endpoint=f"http://{host}:{port['s']}")
    try:
        _wait_ready(s3, proc, root / "weed.log", timeout)
        yield s3
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(s3: S3, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until a signed bucket listing answers (the filer behind the S3 gateway is up)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(s3.endpoint, timeout=2)
        except urllib.error.HTTPError:
            try:
                s3.client().list_buckets()
                return
            except Exception as e:  # not ready yet: the filer or the volume server is starting
                last = str(e)
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(
        f"SeaweedFS S3 not ready in {timeout:.0f}s ({last}):\n{log.read_text()[-3000:]}"
    )
