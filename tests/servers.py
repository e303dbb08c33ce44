"""Real servers on the loopback interface for the remote-data tests: an HTTP file server with faults on demand
(a connection dropped half-way through a file, a server that never answers, a first request that fails) and an
S3-compatible server (moto's server mode) that s3fs talks to through the usual AWS_* environment."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import s3fs
from moto import server as moto_server


class _Handler(SimpleHTTPRequestHandler):
    """Files under the served folder; a path under /drop/ sends half the file then closes the connection, under
    /hang/ answers nothing for as long as the server lives, under /flaky/ fails (503) its first request, under
    /slow/ answers after a second, under /error/ fails (500) every request, HEAD included."""

    def log_message(self, *args):  # quiet: requests are counted, not printed
        pass

    def do_HEAD(self):  # sizes answer at once, whatever the path's fault
        if self.path.startswith("/error/"):
            self.send_error(500, "broken on purpose")
            return
        self.path = self.path.removeprefix("/flaky").removeprefix("/drop").removeprefix("/slow").removeprefix("/hang")
        super().do_HEAD()

    def do_GET(self):
        server = self.server
        server.requests[self.path] += 1
        server.arrivals.append((self.path, time.monotonic()))
        if self.path.startswith("/error/"):
            self.send_error(500, "broken on purpose")
            return
        if self.path.startswith("/slow/"):
            server.stopping.wait(1.0)
        if self.path.startswith("/hang/"):
            server.stopping.wait(60)
            return
        if self.path.startswith("/flaky/") and server.requests[self.path] == 1:
            self.send_error(503, "try again")
            return
        target = Path(self.directory) / self.path[len("/drop/"):]
        if self.path.startswith("/drop/") and target.is_file():
            data = target.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            # The client reads the first half before the connection goes: what it delivers is the same each time.
            server.stopping.wait(0.3)
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        self.path = self.path.removeprefix("/flaky").removeprefix("/drop").removeprefix("/slow")
        super().do_GET()


class HttpServer:
    """A folder served over HTTP on 127.0.0.1 from a thread; `url` is its root, `requests` counts paths asked for."""

    def __init__(self, root: Path):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.server.daemon_threads = True
        self.server.requests = Counter()
        self.server.arrivals = []  # (path, time.monotonic()) of each GET as it arrives
        self.server.stopping = threading.Event()
        self.requests, self.arrivals = self.server.requests, self.server.arrivals
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def http_server(root: Path):
    server = HttpServer(root)
    try:
        yield server
    finally:
        server.close()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-logged",
           "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1, and the environment the S3 clients read (credentials, endpoint) set for
    this process and the ones it starts. Yields (endpoint URL, an s3fs filesystem on it)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance cached for another endpoint must not answer
    try:
        yield endpoint, s3fs.S3FileSystem()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload_tree(fs, local: Path, bucket_path: str) -> None:
    """Copy a local folder's files into a bucket path, keeping the relative layout."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{bucket_path}/{path.relative_to(local).as_posix()}")


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
