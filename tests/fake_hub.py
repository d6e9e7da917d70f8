"""A stand-in for the Hugging Face Hub, for tests on machines that cannot reach it.

A standard-library HTTP server on 127.0.0.1 (a free port) that answers the endpoints huggingface_hub
2.4 calls to download a snapshot and to push a folder, and keeps every repo in memory:

    GET  /api/models/{repo}[/revision/{rev}]      model info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}            the file listing, with "lfs": {"oid": sha256} for LFS files
    HEAD /{repo}/resolve/{rev}/{path}             X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}             the bytes; a Range header gets 206 and those bytes
    POST /api/validate-yaml                       the card's front matter: always fine
    POST /api/repos/create                        409 when it exists (create_repo's exist_ok)
    POST /api/models/{repo}/branch/{branch}       a branch from main
    POST /api/models/{repo}/preupload/{rev}       "lfs" for weights and files of 10 KB or more, else "regular"
    POST /{repo}.git/info/lfs/objects/batch       LFS batch API: a basic-transfer upload and verify action
    PUT  /lfs-upload/{oid}                        the object's bytes, refused unless they hash to oid
    POST /lfs-verify/{oid}                        200 once the object is stored
    POST /api/models/{repo}/commit/{rev}          NDJSON: header, base64 "file" and "lfsFile" lines

LFS files are those the real Hub's .gitattributes sends to LFS (weights) and those of 10 KB or more.
They are uploaded as the real Hub takes them without Xet: preupload says "lfs", the LFS batch API
hands out an upload URL, the bytes are PUT there, and the commit names them by sha256 ("lfsFile"),
which the commit refuses for an object never uploaded. The real Hub offers Xet storage instead, which
huggingface_hub prefers when hf_xet is installed; that protocol is not emulated, so tests set
HF_HUB_DISABLE_XET=1. A gated repo answers file downloads with 403 and X-Error-Code GatedRepo, a
missing repo or revision 404 with RepoNotFound or RevisionNotFound, as huggingface_hub's
hf_raise_for_status expects. Every request is logged, and every byte range served (`served`).
`serve_instead` makes a file's download answer other bytes than its listing describes (a corrupted
or truncated transfer), `refuse_uploads` refuses LFS uploads.
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
LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack")
LFS_THRESHOLD = 10_000


def is_lfs(name: str, data: bytes) -> bool:
    return name.endswith(LFS_EXTENSIONS) or len(data) >= LFS_THRESHOLD


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
        self.served: list[tuple[str, int, int]] = []  # (file path, first byte, bytes) of each download
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256
        self.serve_instead: dict[str, bytes] = {}  # file path -> bytes its download answers
        self.on_request = None  # called with (method, path) before each request is answered
        self.refuse_uploads: str | None = None  # an LFS upload is answered 403 with this message
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

    def bytes_served(self) -> dict[str, int]:
        """Bytes of each file sent in downloads, ranges included."""
        total: dict[str, int] = {}
        for name, _, length in self.served:
            total[name] = total.get(name, 0) + length
        return total

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

        def do_PUT(self) -> None:
            self._route("PUT")

        def _route(self, method: str) -> None:
            path = urlsplit(self.path).path
            hub.requests.append((method, path, self.headers.get("authorization")))
            if hub.on_request is not None:
                hub.on_request(method, path)
            body = self._body() if method in ("POST", "PUT") else b""
            for route_method, pattern, handler in ROUTES:
                if method in route_method and (match := re.fullmatch(pattern, path)):
                    return handler(self, body=body, head=method == "HEAD", **match.groupdict())
            self._error(404, "EntryNotFound", f"no route for {method} {path}")

        def _body(self) -> bytes:
            if "chunked" not in (self.headers.get("transfer-encoding") or ""):
                return self.rfile.read(int(self.headers.get("content-length") or 0))
            data = b""
            while size := int(self.rfile.readline().strip().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data

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
                    {
                        "type": "file",
                        "path": name,
                        "size": len(data),
                        "oid": _git_oid(data),
                        **(
                            {"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                            if is_lfs(name, data)
                            else {}
                        ),
                    }
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
            etag = _git_oid(data)
            data = hub.serve_instead.get(name, data)
            start, end = 0, len(data)
            asked = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range") or "")
            if asked:
                start = int(asked[1])
                end = min(len(data), int(asked[2]) + 1) if asked[2] else len(data)
                if start >= len(data):
                    return self._error(416, None, f"range {start}- past the end of {name}")
            self.send_response(206 if asked else 200)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not head:
                hub.served.append((name, start, end - start))
                self.wfile.write(data[start:end])

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
                        "uploadMode": "lfs"
                        if f["path"].endswith(LFS_EXTENSIONS) or f["size"] >= LFS_THRESHOLD
                        else "regular",
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
                elif item["key"] == "lfsFile":
                    value = item["value"]
                    stored = hub.lfs.get(value["oid"])
                    if stored is None or len(stored) != value["size"]:
                        return self._error(400, None, f"{value['path']}: no uploaded LFS object {value['oid']}")
                    files[value["path"]] = stored
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
                else:
                    return self._error(400, None, f"the fake hub does not take {item['key']!r} lines")
            sha = hub.repos[repo].commit(branch, files, message)
            self._json({"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def lfs_batch(self, repo: str, body: bytes, **_) -> None:
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            objects = []
            for item in json.loads(body)["objects"]:
                entry = {"oid": item["oid"], "size": item["size"]}
                if item["oid"] not in hub.lfs:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs-upload/{item['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs-verify/{item['oid']}"},
                    }
                objects.append(entry)
            self._json({"transfer": "basic", "objects": objects})

        def lfs_upload(self, oid: str, body: bytes, **_) -> None:
            if hub.refuse_uploads:
                return self._error(403, None, hub.refuse_uploads)
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, None, f"uploaded bytes do not hash to {oid}")
            hub.lfs[oid] = body
            self._json({})

        def lfs_verify(self, oid: str, **_) -> None:
            if oid not in hub.lfs:
                return self._error(404, None, f"no LFS object {oid}")
            self._json({})

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
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", Handler.lfs_batch),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", Handler.lfs_upload),
        ("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", Handler.lfs_verify),
    ]
    return Handler


def _git_oid(data: bytes) -> str:
    """The id git gives a blob, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
