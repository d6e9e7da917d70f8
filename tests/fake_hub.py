"""A stand-in for the Hugging Face Hub, for tests on machines that cannot reach it.

A standard-library HTTP server on 127.0.0.1 (a free port) that answers the endpoints huggingface_hub
2.4 calls to download a snapshot and to push a folder, and keeps every repo in memory:

    GET  /api/models/{repo}[/revision/{rev}]      model info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}            the file listing snapshot_download filters
    HEAD /{repo}/resolve/{rev}/{path}             X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}             the bytes
    POST /api/validate-yaml                       the card's front matter: always fine
    POST /api/repos/create                        409 when it exists (create_repo's exist_ok)
    POST /api/models/{repo}/branch/{branch}       a branch from main
    POST /api/models/{repo}/preupload/{rev}       every file "regular"
    POST /api/models/{repo}/commit/{rev}          NDJSON: header, base64 "file" lines

Preupload answers "regular" for every file, so uploads travel base64 inside the commit and neither
the LFS batch API nor Xet storage is needed (the real Hub answers "lfs" for weights, and then
huggingface_hub uploads them through Xet; that protocol is not emulated). A gated repo answers file
downloads with 403 and X-Error-Code GatedRepo, a missing repo or revision 404 with RepoNotFound or
RevisionNotFound, as huggingface_hub's hf_raise_for_status expects. Every request is logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Repo:
    """Commits as whole file maps, and the branches that point at them."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    private: bool = False
    gated: bool = False

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = self.refs.get(branch, "")
        digest = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha], self.refs[branch], self.messages[sha] = dict(files), sha, message
        return sha

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


class FakeHub:
    """Start with `with FakeHub() as hub:`; point HF_ENDPOINT at `hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, folder: Path, *, gated: bool = False) -> str:
        """Serve every file under `folder` as one commit on main; returns the commit sha."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo_id] = Repo(gated=gated)
        return self.repos[repo_id].commit("main", files, "initial commit")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def fetched(self) -> list[str]:
        """Paths of the files downloaded (GET on resolve), in request order."""
        pattern = re.compile(rf"^/{REPO}/resolve/[^/]+/(?P<path>.+)$")
        return [
            unquote(m["path"]) for method, path, _ in self.requests if method == "GET" and (m := pattern.match(path))
        ]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the hub keeps its own log
            pass

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def _route(self, method: str) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((method, path, self.headers.get("authorization")))
            body = self.rfile.read(int(self.headers.get("content-length") or 0)) if method == "POST" else b""
            for route_method, pattern, handler in ROUTES:
                if method in route_method and (match := re.fullmatch(pattern, path)):
                    return handler(self, body=body, head=method == "HEAD", **match.groupdict())
            self._error(404, "EntryNotFound", f"no route for {method} {path}")

        # --- reading -------------------------------------------------------------------------
        def model_info(self, repo: str, rev: str | None = None, **_) -> None:
            found = self._repo_at(repo, unquote(rev or "main"))
            if found:
                sha, files = found
                siblings = [{"rfilename": name} for name in sorted(files)]
                gated = "auto" if hub.repos[repo].gated else False
                self._json({"id": repo, "sha": sha, "private": False, "gated": gated, "siblings": siblings})

        def tree(self, repo: str, rev: str, **_) -> None:
            found = self._repo_at(repo, unquote(rev))
            if found:
                entries = [
                    {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                    for name, data in sorted(found[1].items())
                ]
                self._json(entries)

        def resolve(self, repo: str, rev: str, path: str, head: bool, **_) -> None:
            found = self._repo_at(repo, unquote(rev))
            if not found:
                return
            sha, files = found
            name = unquote(path)
            if hub.repos[repo].gated:
                return self._error(403, "GatedRepo", f"Access to model {repo} is restricted.", commit=sha)
            if name not in files:
                return self._error(404, "EntryNotFound", f"{name} does not exist", commit=sha)
            data = files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{_git_oid(data)}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        # --- writing -------------------------------------------------------------------------
        def validate_yaml(self, **_) -> None:
            self._json({"errors": [], "warnings": []})

        def create_repo(self, body: bytes, **_) -> None:
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._error(409, None, "You already created this model repo", url=f"{hub.url}/{repo_id}")
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            hub.repos[repo_id].commit("main", {".gitattributes": b""}, "initial commit")
            self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def create_branch(self, repo: str, branch: str, **_) -> None:
            if self._repo_at(repo, "main"):
                existing = hub.repos[repo].refs
                if unquote(branch) in existing:
                    return self._error(409, None, "Reference already exists")
                existing[unquote(branch)] = existing["main"]
                self._json({})

        def preupload(self, repo: str, rev: str, body: bytes, **_) -> None:
            found = self._repo_at(repo, unquote(rev))
            if found:
                files = found[1]
                answer = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": _git_oid(files[f["path"]]) if f["path"] in files else None,
                    }
                    for f in json.loads(body)["files"]
                ]
                self._json({"files": answer})

        def commit(self, repo: str, rev: str, body: bytes, **_) -> None:
            branch = unquote(rev)
            found = self._repo_at(repo, branch)
            if not found:
                return
            files, message = dict(found[1]), ""
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    message = item["value"]["summary"]
                elif item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
                else:
                    return self._error(400, None, f"the fake hub does not take {item['key']!r} lines")
            sha = hub.repos[repo].commit(branch, files, message)
            self._json({"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        # --- helpers -------------------------------------------------------------------------
        def _repo_at(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return sha, repo.commits[sha]

        def _json(self, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, code: str | None, message: str, *, commit: str | None = None, **extra) -> None:
            data = json.dumps({"error": message, **extra}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    ROUTES = [
        ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", Handler.model_info),
        ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)", Handler.tree),
        ("GET HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", Handler.resolve),
        ("POST", r"/api/validate-yaml", Handler.validate_yaml),
        ("POST", r"/api/repos/create", Handler.create_repo),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", Handler.create_branch),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", Handler.preupload),
        ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", Handler.commit),
    ]
    return Handler


def _git_oid(data: bytes) -> str:
    """The id git gives a blob, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
