"""A stand-in Hugging Face Hub on loopback HTTP, for huggingface_hub's real client.

It serves the parts of the Hub's API that `HfApi.model_info` and `snapshot_download` use:
  GET  /api/models/<org>/<name>[/revision/<rev>]          repo info (sha, siblings, gated)
  GET  /api/models/<org>/<name>/tree/<rev>[/<path>]       file listing
  HEAD|GET /<org>/<name>/resolve/<rev>/<file>              file metadata headers / content
with the Hub's error signalling (status + X-Error-Code: RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound). A gated repo's info is public, its files answer 401 without a token and 403 with a wrong
one, as the Hub does.
Every file GET is counted in `downloads`, so tests can tell what was fetched and what came from cache.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    revisions: dict[str, dict[str, bytes]]
    """revision name (branch/tag) -> {path in repo: content}."""
    gated_token: str | None = None
    """If set, the repo is gated: only `Authorization: Bearer <gated_token>` may read it."""
    shas: dict[str, str] = field(default_factory=dict)

    def sha(self, rev: str) -> str:
        if rev not in self.shas:
            self.shas[rev] = hashlib.sha1(
                json.dumps(sorted(self.revisions[rev])).encode() + rev.encode()
            ).hexdigest()
        return self.shas[rev]

    def files_at(self, rev: str) -> dict[str, bytes] | None:
        if rev in self.revisions:
            return self.revisions[rev]
        for name in self.revisions:  # a commit sha works as a revision too
            if self.sha(name) == rev:
                return self.revisions[name]
        return None


def dir_files(path: Path) -> dict[str, bytes]:
    """Every file under a folder, by its relative path."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class StandInHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.downloads: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(
                self,
                code: int,
                body: bytes = b"",
                headers: dict | None = None,
                ctype: str = "application/json",
            ):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, code: int, error_code: str, message: str):
                self._send(
                    code,
                    json.dumps({"error": message}).encode(),
                    {"X-Error-Code": error_code, "X-Error-Message": message},
                )

            def _repo(self, repo_id: str, files: bool = False) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    # The real Hub answers 401 to anonymous callers for a missing repo, 404 to known ones.
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                # As on the Hub, a gated repo's info and file list are public; its files are not.
                if files and repo.gated_token is not None:
                    auth = self.headers.get("Authorization", "")
                    if not auth:
                        self._error(
                            401, "GatedRepo", "Access to model is restricted. You must be authenticated."
                        )
                        return None
                    if auth != f"Bearer {repo.gated_token}":
                        self._error(
                            403,
                            "GatedRepo",
                            "Access to model is restricted and you are not in the authorized list.",
                        )
                        return None
                return repo

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = "/".join(parts[2:4])
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    rest = parts[4:]
                    rev = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else "main"
                    files = repo.files_at(rev)
                    if files is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    sha = repo.sha(next(n for n in repo.revisions if repo.revisions[n] is files))
                    if rest[:1] == ["tree"]:
                        sub = "/".join(rest[2:])
                        listing = [
                            {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for p, b in sorted(files.items())
                            if p.startswith(sub)
                        ]
                        return self._send(200, json.dumps(listing).encode())
                    info = {
                        "id": repo_id,
                        "modelId": repo_id,
                        "sha": sha,
                        "private": False,
                        "gated": "manual" if repo.gated_token else False,
                        "disabled": False,
                        "tags": [],
                        "downloads": 0,
                        "likes": 0,
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    }
                    return self._send(200, json.dumps(info).encode())
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = self._repo("/".join(parts[:2]), files=True)
                    if repo is None:
                        return
                    rev, name = parts[3], "/".join(parts[4:])
                    files = repo.files_at(rev)
                    if files is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    if name not in files:
                        return self._error(404, "EntryNotFound", f"{name} does not exist")
                    sha = repo.sha(next(n for n in repo.revisions if repo.revisions[n] is files))
                    body = files[name]
                    etag = hashlib.sha256(body).hexdigest()
                    if self.command == "GET":
                        key = f"{'/'.join(parts[:2])}/{name}"
                        hub.downloads[key] = hub.downloads.get(key, 0) + 1
                    return self._send(
                        200,
                        body,
                        {
                            "X-Repo-Commit": sha,
                            "ETag": f'"{etag}"',
                            "X-Linked-Etag": f'"{etag}"',
                            "X-Linked-Size": str(len(body)),
                            "Accept-Ranges": "none",
                        },
                        ctype="application/octet-stream",
                    )
                return self._error(404, "EntryNotFound", f"not found: {path}")

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="stand-in-hub", daemon=True)

    def add(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        revisions: dict[str, dict[str, bytes]] | None = None,
        gated_token: str | None = None,
    ) -> Repo:
        self.repos[repo_id] = Repo({"main": files, **(revisions or {})}, gated_token)
        return self.repos[repo_id]

    def fetched(self, repo_id: str) -> set[str]:
        prefix = repo_id + "/"
        return {k[len(prefix) :] for k in self.downloads if k.startswith(prefix)}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
