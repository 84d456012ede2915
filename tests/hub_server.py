"""A Hub-compatible HTTP server for tests, bound to 127.0.0.1 on a free port.

It implements the part of the Hugging Face Hub HTTP API that huggingface_hub (2.x), diffusers
and datasets call to create repositories, commit files (regular and Git LFS), list trees and
download files, and keeps everything in memory. Each commit stores a full snapshot of the
branch, so old commits stay downloadable by hash.

Tokens: a request whose Authorization header carries a token outside `valid_tokens` gets 401
with the Hub's "Invalid credentials" message. Requests without a token may read public
repositories only. `HubState.requests` records every request, so tests can count them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
# Suffixes committed through Git LFS, as in the .gitattributes the Hub writes into new repos.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".parquet", ".arrow", ".png",
                ".jpg", ".jpeg", ".npy", ".npz", ".h5", ".onnx", ".msgpack", ".zip", ".gz", ".tar")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def git_oid(self) -> str:
        """The git blob id: sha1 over 'blob <size>\\0' and the content."""
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    oid: str
    title: str
    files: dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_type: str  # "model" or "dataset"
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


class HubState:
    """Repositories, LFS objects and the request log of one server."""

    def __init__(self, valid_tokens: set[str]):
        self.valid_tokens = set(valid_tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        # (repo_id, path) pairs that stay in tree listings but return 404 on download.
        self.unavailable: set[tuple[str, str]] = set()
        self.lock = threading.RLock()
        self._commit_counter = 0

    def new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, StoredFile], title: str) -> Commit:
        self._commit_counter += 1
        seed = f"{repo.repo_id}:{parent.oid if parent else ''}:{self._commit_counter}:{title}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), title, files,
                        dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", ".000Z"))
        repo.commits[commit.oid] = commit
        return commit

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        initial = self.new_commit(repo, None, {".gitattributes": StoredFile(GITATTRIBUTES.encode(), False)},
                                  "initial commit")
        repo.branches["main"] = initial.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


_TYPES = {"models": "model", "datasets": "dataset"}
_REPO = r"([^/]+/[^/]+)"
_ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/(models|datasets)/{_REPO}", "repo_info"),
    ("GET", rf"/api/(models|datasets)/{_REPO}/revision/([^/]+)", "repo_info"),
    ("GET", rf"/api/(models|datasets)/{_REPO}/tree/([^/]+)(?:/(.+))?", "tree"),
    ("GET", rf"/api/(models|datasets)/{_REPO}/refs", "refs"),
    ("POST", rf"/api/(models|datasets)/{_REPO}/paths-info/([^/]+)", "paths_info"),
    ("POST", rf"/api/(models|datasets)/{_REPO}/preupload/([^/]+)", "preupload"),
    ("POST", rf"/api/(models|datasets)/{_REPO}/commit/([^/]+)", "commit"),
    ("POST", rf"/api/(models|datasets)/{_REPO}/branch/([^/]+)", "create_branch"),
    ("POST", rf"/(datasets/)?{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/([0-9a-f]{64})", "lfs_upload"),
    ("GET", rf"/(datasets/)?{_REPO}/resolve/([^/]+)/(.+)", "resolve"),
    ("HEAD", rf"/(datasets/)?{_REPO}/resolve/([^/]+)/(.+)", "resolve"),
]
_COMPILED = [(method, re.compile(f"^{pattern}$"), name) for method, pattern, name in _ROUTES]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes, so with Nagle's algorithm each response would
    # wait about 40 ms for the client's delayed ACK (measured on loopback).
    disable_nagle_algorithm = True
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass  # the request log lives in HubState.requests

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # ------------------------------------------------------------ plumbing

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.body = self._read_body() if method in ("POST", "PUT") else b""
        with self.state.lock:
            self.state.requests.append((method, self.path))
        try:
            for route_method, pattern, name in _COMPILED:
                match = pattern.match(url.path)
                if match and route_method == method:
                    self.user = self._authenticate()
                    groups = [unquote(g) if g is not None else None for g in match.groups()]
                    with self.state.lock:
                        getattr(self, "_" + name)(*groups)
                    return
            raise HubError(404, f"no route for {method} {url.path}")
        except HubError as error:
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers["X-Error-Message"] = " ".join(error.message.split())  # header values are one line
            self._send_json({"error": error.message}, status=error.status, headers=headers)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None,
              send_body: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if send_body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, headers: dict | None = None,
                   content_type: str = "application/json") -> None:
        self._send(status, json.dumps(payload).encode(), content_type, headers)

    def _authenticate(self) -> str | None:
        header = self.headers.get("Authorization")
        if header is None:
            return None
        token = header.split(" ", 1)[1] if header.lower().startswith("bearer ") else header
        if token not in self.state.valid_tokens:
            raise HubError(401, INVALID_CREDENTIALS)
        return USER

    def _require_user(self) -> None:
        if self.user is None:
            raise HubError(401, "You must be authenticated to write to a repository")

    def _repo(self, kind: str, repo_id: str) -> Repo:
        repo_type = _TYPES.get(kind, kind)
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self.user is None):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _url_prefix(self, repo: Repo) -> str:
        return "datasets/" if repo.repo_type == "dataset" else ""

    # ------------------------------------------------------------ account and validation

    def _whoami(self):
        if self.user is None:
            raise HubError(401, "Invalid username or password.")
        self._send_json({"type": "user", "name": USER, "fullname": "Test User", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}}})

    def _agent_harnesses(self):
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self):
        content = json.loads(self.body or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        try:
            yaml.safe_load(match.group(1) if match else "")
        except yaml.YAMLError as error:
            raise HubError(400, f"Invalid metadata in README.md: {error}")
        self._send_json({"errors": [], "warnings": []})

    # ------------------------------------------------------------ repositories

    def _create_repo(self):
        self._require_user()
        payload = json.loads(self.body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        prefix = "datasets/" if repo_type == "dataset" else ""
        url = f"{self.base_url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.state.repos:
            # create_repo(exist_ok=True) reads the url from the body of this 409.
            self._send_json({"error": "You already created this repo", "url": url}, status=409,
                            headers={"X-Error-Message": "You already created this repo"})
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.state.create_repo(repo_type, repo_id, private)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _create_branch(self, kind, repo_id, branch):
        self._require_user()
        repo = self._repo(kind, repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference {branch} already exists")
        payload = json.loads(self.body or b"{}")
        start = self._commit_of(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        self._send_json({})

    def _refs(self, kind, repo_id):
        repo = self._repo(kind, repo_id)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid} for name, oid in repo.branches.items()]
        self._send_json({"branches": branches, "tags": [], "converts": []})

    def _file_entry(self, path: str, stored: StoredFile) -> dict:
        entry = {"type": "file", "oid": stored.git_oid, "size": len(stored.content), "path": path}
        if stored.lfs:
            entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": 132}
        return entry

    def _folder_entry(self, path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    def _repo_info(self, kind, repo_id, revision="main"):
        repo = self._repo(kind, repo_id)
        commit = self._commit_of(repo, revision)
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if self.query.get("blobs", "").lower() == "true":
                sibling.update({"size": len(stored.content), "blobId": stored.git_oid})
                if stored.lfs:
                    sibling["lfs"] = {"sha256": stored.sha256, "size": len(stored.content), "pointerSize": 132}
            siblings.append(sibling)
        info = {"_id": repo_id, "id": repo_id, "author": repo_id.split("/")[0], "sha": commit.oid,
                "private": repo.private, "disabled": False, "gated": False, "lastModified": commit.date,
                "createdAt": commit.date, "tags": [], "downloads": 0, "likes": 0, "siblings": siblings}
        if repo.repo_type == "model":
            info["modelId"] = repo_id
        readme = commit.files.get("README.md")
        if readme is not None:
            info["cardData"] = _front_matter(readme.content.decode("utf-8", "replace"))
        self._send_json(info)

    def _tree(self, kind, repo_id, revision, path=None):
        repo = self._repo(kind, repo_id)
        commit = self._commit_of(repo, revision)
        prefix = (path or "").strip("/")
        recursive = self.query.get("recursive", "").lower() == "true"
        files = {p: f for p, f in commit.files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not files:
            raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        entries, folders = [], set()
        for file_path, stored in sorted(files.items()):
            relative = file_path[len(prefix) + 1:] if prefix else file_path
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if recursive or depth == 1:
                    folders.add(folder)
            if recursive or len(parts) == 1:
                entries.append(self._file_entry(file_path, stored))
        self._send_json([self._folder_entry(f) for f in sorted(folders)] + entries)

    def _paths_info(self, kind, repo_id, revision):
        repo = self._repo(kind, repo_id)
        commit = self._commit_of(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(self.body or b"{}").get("paths", [])
        else:
            paths = parse_qs(self.body.decode()).get("paths", [])
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                entries.append(self._file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                entries.append(self._folder_entry(path))
        self._send_json(entries)

    # ------------------------------------------------------------ uploads

    def _preupload(self, kind, repo_id, revision):
        self._require_user()
        repo = self._repo(kind, repo_id)
        self._commit_of(repo, revision)
        files = json.loads(self.body or b"{}").get("files", [])
        modes = []
        for item in files:
            lfs = item["path"].lower().endswith(LFS_SUFFIXES) or item.get("size", 0) > LFS_THRESHOLD_BYTES
            modes.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._send_json({"files": modes, "commitOid": repo.resolve(revision).oid})

    def _lfs_batch(self, dataset_prefix, repo_id):
        self._require_user()
        self._repo("datasets" if dataset_prefix else "models", repo_id)
        payload = json.loads(self.body or b"{}")
        objects = []
        for item in payload.get("objects", []):
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.base_url}/lfs-upload/{item['oid']}", "header": {}}}
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid):
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match sha256 {oid}")
        self.state.lfs_objects[oid] = self.body
        self._send(200, b"", "text/plain")

    def _commit(self, kind, repo_id, revision):
        self._require_user()
        repo = self._repo(kind, repo_id)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent = repo.commits[repo.branches[revision]]
        files = dict(parent.files)
        title = ""
        for line in self.body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value.get("summary", "")
                expected = value.get("parentCommit")
                if expected and expected != parent.oid:
                    raise HubError(412, f"parent commit {expected} is not the head of {revision}")
            elif key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                content = self.state.lfs_objects.get(value["oid"])
                if content is None or len(content) != value["size"]:
                    raise HubError(422, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = StoredFile(content, True)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        commit = self.state.new_commit(repo, parent, files, title)
        repo.branches[revision] = commit.oid
        self._send_json({"success": True, "commitOid": commit.oid, "hookOutput": "",
                         "commitUrl": f"{self.base_url}/{self._url_prefix(repo)}{repo_id}/commit/{commit.oid}"})

    # ------------------------------------------------------------ downloads

    def _resolve(self, dataset_prefix, repo_id, revision, path):
        repo = self._repo("datasets" if dataset_prefix else "models", repo_id)
        commit = self._commit_of(repo, revision)
        stored = commit.files.get(path)
        if stored is None or (repo_id, path) in self.state.unavailable:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {"ETag": f'"{stored.etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.content))})
        body, status = stored.content, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and stored.content:
            size = len(stored.content)
            start = int(match.group(1)) if match.group(1) else max(size - int(match.group(2)), 0)
            end = int(match.group(2)) if match.group(1) and match.group(2) else size - 1
            end = min(end, size - 1)
            if start >= size:
                raise HubError(416, f"range {self.headers['Range']} outside {size} bytes",
                               headers={"Content-Range": f"bytes */{size}"})
            body, status = stored.content[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, body, "application/octet-stream", headers)


def _front_matter(text: str) -> dict | None:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up stop()

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class LocalHub:
    """The server in a background thread: `start()`, `url`, `state`, `stop()`."""

    def __init__(self, valid_tokens: set[str] = frozenset({"hf_test_token"})):
        self.state = HubState(set(valid_tokens))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        self._server = _Server(self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def request_count(self) -> int:
        with self.state.lock:
            return len(self.state.requests)

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
