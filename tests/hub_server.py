"""A small in-memory server that speaks the part of the Hugging Face Hub HTTP API the clients of this project use.

The public Hub is unreachable from the test machines, so the Hub tests start this server on 127.0.0.1 (a free port)
and point `huggingface_hub` / transformers at it with `HF_ENDPOINT`. The protocol follows what `huggingface_hub` 2.x
sends and expects (read from its sources: `hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py`,
`utils/_http.py`):

* upload: `POST /api/repos/create`, `POST /api/validate-yaml`, `POST /api/models/{repo}/preupload/{rev}`,
  `POST /{repo}.git/info/lfs/objects/batch` + `PUT` (basic transfer) + verify, `POST /api/models/{repo}/commit/{rev}`
  (NDJSON: `header`, `file`, `lfsFile`, `deletedFile`, `deletedFolder`), `POST /api/models/{repo}/branch/{branch}`;
* download: `GET /api/models/{repo}[/revision/{rev}]`, `GET /api/models/{repo}/tree/{rev}[/{path}]`,
  `POST /api/models/{repo}/paths-info/{rev}`, `GET /api/models/{repo}/commits/{rev}`,
  `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size` and
  byte ranges), 404s carrying `X-Error-Code: RepoNotFound / RevisionNotFound / EntryNotFound`;
* `GET /api/whoami-v2`.

Xet storage is not implemented: clients must run with `HF_HUB_DISABLE_XET=1`, which makes them use the LFS protocol.
Repositories are lists of commits (sha1 ids), each holding a complete map from path to file; LFS contents live in one
content-addressed store. Every `Authorization` header received is recorded so tests can check a token was sent.
Not a general Hub emulator: no pull requests, tags, pagination, multipart LFS or Spaces.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# The `.gitattributes` the Hub puts in the first commit of a new model repository (LFS-tracked patterns).
DEFAULT_GITATTRIBUTES = "\n".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
        "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
        "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
) + "\n"  # fmt: skip

# Files at least this large go through LFS whatever their name (the Hub's 10 MB rule for regular git blobs).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
REPO_TYPES = ("model", "dataset", "space")
_TYPE_PLURAL = "(?P<type>models|datasets|spaces)"
_REPO = "(?P<repo>[^/]+/[^/]+)"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, which is what the Hub reports as the `oid` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: regular files keep their bytes, LFS files point into the server's LFS store."""

    path: str
    size: int
    content: bytes | None = None  # regular files only
    lfs_sha256: str | None = None  # LFS files only

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None

    @property
    def git_oid(self) -> str:
        """The blob id git would give the file (for LFS files, the id of its pointer)."""
        if self.is_lfs:
            return git_blob_sha1(lfs_pointer(self.lfs_sha256, self.size))
        return git_blob_sha1(self.content)

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.lfs_sha256, self.size))


@dataclass
class Commit:
    commit_id: str
    parent_id: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    owner: str
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> head commit id

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or a full commit id points to (None when it does not exist)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)

    def history(self, revision: str) -> list[Commit]:
        """The commits reachable from `revision`, newest first."""
        commit = self.resolve(revision)
        history = []
        while commit is not None:
            history.append(commit)
            commit = self.commits.get(commit.parent_id) if commit.parent_id else None
        return history


@dataclass
class RecordedRequest:
    method: str
    path: str
    authorization: str | None


class HubState:
    """Everything the server knows; shared by all handler threads behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.pending_uploads: dict[str, tuple[str, int]] = {}  # upload key -> (sha256, size)
        self.tokens: dict[str, tuple[str, list[str]]] = {}  # token -> (user name, organisations)
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # requests the server did not understand (a test can assert there are none)

    def add_token(self, token: str, user: str, orgs: list[str] | None = None) -> None:
        """Registers a write token for `user`, who may also write to the namespaces in `orgs`."""
        with self.lock:
            self.tokens[token] = (user, list(orgs or []))


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every response carries a Content-Length
    server: _HubHTTPServer

    # ----------------------------------------------------------------------------------------------------- plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature fixed by the base class
        pass  # keep test output clean; requests are recorded in `HubState.requests` instead

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None, content_type: str = "") -> None:
        self._send(status, json.dumps(payload).encode(), content_type or "application/json", headers)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        extra = {"X-Error-Message": message, **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self._json(status, {"error": message}, extra)

    def _user(self) -> tuple[str, list[str]] | None:
        value = self.headers.get("Authorization", "")
        if not value.lower().startswith("bearer "):
            return None
        return self.state.tokens.get(value[len("bearer ") :].strip())

    def _require_user(self) -> tuple[str, list[str]] | None:
        """The authenticated user, or None after answering 401 (missing or unknown token)."""
        user = self._user()
        if user is None:
            self._error(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
        return user

    def _repo_for_read(self, repo_type: str, repo_id: str) -> Repo | None:
        """The repo, or None after answering 404 RepoNotFound (also for private repos the caller may not see)."""
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is not None and repo.private:
            user = self._user()
            if user is None or repo.owner not in (user[0], *user[1]):
                repo = None
        if repo is None:
            self._error(HTTPStatus.NOT_FOUND, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, repo_type: str, repo_id: str) -> Repo | None:
        user = self._require_user()
        if user is None:
            return None
        repo = self._repo_for_read(repo_type, repo_id)
        if repo is None:
            return None
        if repo.owner not in (user[0], *user[1]):
            self._error(HTTPStatus.FORBIDDEN, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    def _commit_for_read(self, repo: Repo, revision: str) -> Commit | None:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------------------------------------------ routing
    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        raw_path, query = split.path, parse_qs(split.query)
        with self.state.lock:
            self.state.requests.append(RecordedRequest(self.command, self.path, self.headers.get("Authorization")))
        for method, pattern, handler in _ROUTES:
            if method != self.command and not (method == "GET" and self.command == "HEAD"):
                continue
            match = pattern.fullmatch(raw_path)
            if match:
                params = {name: unquote(value) for name, value in match.groupdict().items() if value is not None}
                if "type" in params:
                    params["type"] = params["type"].rstrip("s")
                try:
                    with self.state.lock:
                        handler(self, query=query, **params)
                except Exception as error:  # a bug here must show up in the test, not hang the client
                    self.state.errors.append(f"{self.command} {self.path}: {error!r}")
                    self.close_connection = True  # the request body may be unread: do not reuse the connection
                    self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"test server error: {error!r}")
                return
        self._read_body()
        self.state.errors.append(f"unhandled {self.command} {self.path}")
        self._error(HTTPStatus.NOT_FOUND, f"test server: no route for {self.command} {raw_path}")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ----------------------------------------------------------------------------------------------------- account
    def whoami(self, query) -> None:
        user = self._require_user()
        if user is None:
            return
        name, orgs = user
        self._json(
            HTTPStatus.OK,
            {
                "type": "user",
                "id": hashlib.sha1(name.encode()).hexdigest()[:24],
                "name": name,
                "fullname": name,
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": "write"}},
            },
        )

    def agent_harnesses(self, query) -> None:
        # huggingface_hub fetches this registry for its user-agent string; an empty one means "no agent detected".
        self._json(HTTPStatus.OK, {"standardEnvVars": [], "harnesses": {}})

    # ------------------------------------------------------------------------------------------------------ upload
    def create_repo(self, query) -> None:
        payload = json.loads(self._read_body() or b"{}")
        user = self._require_user()
        if user is None:
            return
        namespace = payload.get("organization") or user[0]
        repo_id = f"{namespace}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            self._error(HTTPStatus.BAD_REQUEST, f"Invalid repo type {repo_type!r}")
            return
        if namespace not in (user[0], *user[1]):
            self._error(HTTPStatus.FORBIDDEN, f"You don't have the rights to create a repo under {namespace}")
            return
        url = self.endpoint + ("" if repo_type == "model" else f"/{repo_type}s") + f"/{repo_id}"
        if (repo_type, repo_id) in self.state.repos:
            self._json(HTTPStatus.CONFLICT, {"error": "You already created this model repo", "url": url})
            return
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repo = Repo(repo_id, repo_type, private, owner=namespace, created_at=_now_iso())
        self.state.repos[(repo_type, repo_id)] = repo
        gitattributes = DEFAULT_GITATTRIBUTES.encode()
        files = {".gitattributes": StoredFile(".gitattributes", len(gitattributes), content=gitattributes)}
        self._add_commit(repo, "main", "initial commit", "", user[0], files)
        self._json(HTTPStatus.OK, {"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def validate_yaml(self, query) -> None:
        payload = json.loads(self._read_body() or b"{}")
        content = payload.get("content", "")
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "YAML metadata must be a mapping"})
            except yaml.YAMLError as error:
                errors.append({"message": f"Invalid YAML: {error}"})
        if errors:
            self._json(HTTPStatus.BAD_REQUEST, {"errors": errors, "warnings": []})
        else:
            self._json(HTTPStatus.OK, {"errors": [], "warnings": []})

    def preupload(self, query, type: str, repo: str, rev: str) -> None:  # noqa: A002
        payload = json.loads(self._read_body() or b"{}")
        target = self._repo_for_write(type, repo)
        if target is None:
            return
        commit = self._commit_for_read(target, rev)
        if commit is None:
            return
        lfs_patterns = self._lfs_patterns(commit)
        answers = []
        for entry in payload.get("files", []):
            path, size = entry["path"], int(entry["size"])
            sample = base64.b64decode(entry.get("sample", ""))
            is_lfs = size >= LFS_SIZE_THRESHOLD or b"\0" in sample or self._matches(path, lfs_patterns)
            answer = {"path": path, "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False}
            existing = commit.files.get(path)
            if existing is not None:
                # The client compares this with its own hash to skip unchanged files (sha256 for LFS files,
                # git blob sha1 for regular ones): that is how the Hub avoids empty commits.
                answer["oid"] = existing.lfs_sha256 if existing.is_lfs else existing.git_oid
            answers.append(answer)
        self._json(HTTPStatus.OK, {"files": answers, "commitOid": commit.commit_id})

    def lfs_batch(self, query, repo: str, type: str = "model") -> None:  # noqa: A002
        payload = json.loads(self._read_body() or b"{}")
        target = self._repo_for_write(type, repo)
        if target is None:
            return
        if payload.get("operation") != "upload":
            self._error(HTTPStatus.BAD_REQUEST, "test server only supports LFS uploads")
            return
        objects = []
        for item in payload.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.state.lfs_objects:
                # Like a pre-signed storage URL: the client PUTs to it without its Authorization header.
                upload_key = secrets.token_hex(16)
                self.state.pending_uploads[upload_key] = (oid, size)
                prefix = "" if type == "model" else f"/{type}s"
                answer["actions"] = {
                    "upload": {"href": f"{self.endpoint}/__lfs_upload/{upload_key}"},
                    "verify": {"href": f"{self.endpoint}{prefix}/{target.repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        self._json(
            HTTPStatus.OK, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    def lfs_upload(self, query, key: str) -> None:
        body = self._read_body()
        pending = self.state.pending_uploads.pop(key, None)
        if pending is None:
            self._error(HTTPStatus.FORBIDDEN, "Unknown or already used upload URL")
            return
        oid, size = pending
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            self._error(HTTPStatus.BAD_REQUEST, "Uploaded content does not match the announced oid/size")
            return
        self.state.lfs_objects[oid] = body
        self._send(HTTPStatus.OK, headers={"ETag": f'"{oid}"'})

    def lfs_verify(self, query, repo: str, type: str = "model") -> None:  # noqa: A002
        payload = json.loads(self._read_body() or b"{}")
        if self._repo_for_write(type, repo) is None:
            return
        stored = self.state.lfs_objects.get(payload.get("oid"))
        if stored is None or len(stored) != payload.get("size"):
            self._error(HTTPStatus.NOT_FOUND, "LFS object not found")
            return
        self._json(HTTPStatus.OK, {"success": True})

    def commit(self, query, type: str, repo: str, rev: str) -> None:  # noqa: A002
        body = self._read_body()
        target = self._repo_for_write(type, repo)
        if target is None:
            return
        user = self._user()
        if query.get("create_pr"):
            self._error(HTTPStatus.BAD_REQUEST, "test server does not support pull requests")
            return
        if rev not in target.branches:
            self._error(HTTPStatus.NOT_FOUND, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
            return
        head = target.commits[target.branches[rev]]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            self._error(HTTPStatus.BAD_REQUEST, "The first NDJSON line must be the commit header")
            return
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not head.commit_id.startswith(parent):
            self._error(HTTPStatus.PRECONDITION_FAILED, "A commit has happened since. Please refresh and try again.")
            return
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    self._error(HTTPStatus.BAD_REQUEST, f"Unsupported encoding for {path}")
                    return
                content = base64.b64decode(value["content"])
                files[path] = StoredFile(path, len(content), content=content)
            elif key == "lfsFile":
                stored = self.state.lfs_objects.get(value["oid"])
                if stored is None:
                    self._error(HTTPStatus.UNPROCESSABLE_ENTITY, f"LFS object {value['oid']} of {path} not uploaded")
                    return
                files[path] = StoredFile(path, len(stored), lfs_sha256=value["oid"])
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    self._error(HTTPStatus.NOT_FOUND, "A file with this name doesn't exist", "EntryNotFound")
                    return
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [name for name in files if name.startswith(prefix)]:
                    del files[name]
            else:
                self._error(HTTPStatus.BAD_REQUEST, f"Unknown commit operation {key!r}")
                return
        commit = self._add_commit(
            target, rev, header.get("summary", ""), header.get("description", ""), user[0], files
        )
        prefix = "" if type == "model" else f"/{type}s"
        self._json(
            HTTPStatus.OK,
            {
                "success": True,
                "commitOid": commit.commit_id,
                "commitUrl": f"{self.endpoint}{prefix}/{target.repo_id}/commit/{commit.commit_id}",
                "hookOutput": "",
            },
        )

    def create_branch(self, query, type: str, repo: str, branch: str) -> None:  # noqa: A002
        payload = json.loads(self._read_body() or b"{}")
        target = self._repo_for_write(type, repo)
        if target is None:
            return
        if branch in target.branches:
            self._error(HTTPStatus.CONFLICT, f"Reference refs/heads/{branch} already exists")
            return
        start = self._commit_for_read(target, payload.get("startingPoint") or "main")
        if start is None:
            return
        target.branches[branch] = start.commit_id
        self._json(HTTPStatus.OK, {})

    # ---------------------------------------------------------------------------------------------------- download
    def repo_info(self, query, type: str, repo: str, rev: str = "main") -> None:  # noqa: A002
        target = self._repo_for_read(type, repo)
        if target is None:
            return
        commit = self._commit_for_read(target, rev)
        if commit is None:
            return
        with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for stored in sorted(commit.files.values(), key=lambda stored: stored.path):
            sibling = {"rfilename": stored.path}
            if with_blobs:
                sibling.update(size=stored.size, blobId=stored.git_oid)
                if stored.is_lfs:
                    sibling["lfs"] = {
                        "size": stored.size,
                        "sha256": stored.lfs_sha256,
                        "pointerSize": stored.pointer_size,
                    }
            siblings.append(sibling)
        card_data = self._card_metadata(commit)
        info = {
            "_id": hashlib.sha1(target.repo_id.encode()).hexdigest()[:24],
            "id": target.repo_id,
            "author": target.owner,
            "sha": commit.commit_id,
            "lastModified": commit.date,
            "createdAt": target.created_at,
            "private": target.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card_data.get("tags") or []),
            "siblings": siblings,
        }
        if type == "model":
            info["modelId"] = target.repo_id
            for key in ("pipeline_tag", "library_name"):
                if key in card_data:
                    info[key] = card_data[key]
            config = self._json_file(commit, "config.json")
            if isinstance(config, dict):
                info["config"] = {
                    key: config[key] for key in ("architectures", "model_type", "auto_map") if key in config
                }
        if card_data:
            info["cardData"] = card_data
        self._json(HTTPStatus.OK, info)

    def tree(self, query, type: str, repo: str, rev: str, path: str = "") -> None:  # noqa: A002
        target = self._repo_for_read(type, repo)
        if target is None:
            return
        commit = self._commit_for_read(target, rev)
        if commit is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        base = path.strip("/")
        prefix = f"{base}/" if base else ""
        if base and base in commit.files:
            self._error(HTTPStatus.BAD_REQUEST, f"{base} is a file, not a folder")
            return
        entries: dict[str, dict] = {}
        for name, stored in commit.files.items():
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            # Folders on the way to the file (all of them when recursive, only the first level otherwise).
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder, {"type": "directory", "oid": self._tree_oid(commit, folder), "path": folder}
                )
            if recursive or len(parts) == 1:
                entries[name] = self._file_entry(stored)
        if base and not entries:
            self._error(HTTPStatus.NOT_FOUND, f"{base} does not exist on {rev}", "EntryNotFound")
            return
        self._json(HTTPStatus.OK, [entries[name] for name in sorted(entries)])

    def paths_info(self, query, type: str, repo: str, rev: str) -> None:  # noqa: A002
        body = self._read_body()
        form = parse_qs(body.decode()) if body and not body.lstrip().startswith(b"{") else {}
        paths = form.get("paths") or json.loads(body or b"{}").get("paths", [])
        target = self._repo_for_read(type, repo)
        if target is None:
            return
        commit = self._commit_for_read(target, rev)
        if commit is None:
            return
        result = []
        for path in paths:
            if path in commit.files:
                result.append(self._file_entry(commit.files[path]))
            elif any(name.startswith(path.rstrip("/") + "/") for name in commit.files):
                result.append({"type": "directory", "oid": self._tree_oid(commit, path), "path": path})
        self._json(HTTPStatus.OK, result)

    def list_commits(self, query, type: str, repo: str, rev: str) -> None:  # noqa: A002
        target = self._repo_for_read(type, repo)
        if target is None:
            return
        if self._commit_for_read(target, rev) is None:
            return
        self._json(
            HTTPStatus.OK,
            [
                {
                    "id": commit.commit_id,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": commit.author}],
                    "date": commit.date,
                }
                for commit in target.history(rev)
            ],
        )

    def resolve(self, query, repo: str, rev: str, path: str, type: str = "model") -> None:  # noqa: A002
        target = self._repo_for_read(type, repo)
        if target is None:
            return
        commit = self._commit_for_read(target, rev)
        if commit is None:
            return
        stored = commit.files.get(path)
        if stored is None:
            # The commit header lets the client cache the file's absence for this commit.
            self._error(HTTPStatus.NOT_FOUND, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.commit_id})
            return
        content = self.state.lfs_objects[stored.lfs_sha256] if stored.is_lfs else stored.content
        headers = {"X-Repo-Commit": commit.commit_id, "ETag": f'"{stored.git_oid}"', "Accept-Ranges": "bytes"}
        if stored.is_lfs:
            # The client keys its cache on X-Linked-Etag (the sha256) for LFS files, as for CDN-served files.
            headers.update({"X-Linked-Etag": f'"{stored.lfs_sha256}"', "X-Linked-Size": str(stored.size)})
        status = HTTPStatus.OK
        byte_range = self.headers.get("Range")
        if byte_range:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range.strip())
            if not match or not (match.group(1) or match.group(2)):
                self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"Unsupported range {byte_range}")
                return
            if match.group(1):
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(content) - 1
            else:  # suffix range: the last N bytes
                start, end = max(len(content) - int(match.group(2)), 0), len(content) - 1
            end = min(end, len(content) - 1)
            if start >= len(content) or start > end:
                self._error(
                    HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                    f"Range {byte_range} outside a file of {len(content)} bytes",
                    headers={"Content-Range": f"bytes */{len(content)}"},
                )
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], HTTPStatus.PARTIAL_CONTENT
        self._send(status, content, "application/octet-stream", headers)

    # ----------------------------------------------------------------------------------------------------- helpers
    def _add_commit(
        self, repo: Repo, branch: str, title: str, message: str, author: str, files: dict[str, StoredFile]
    ) -> Commit:
        parent = repo.branches.get(branch)
        digest = hashlib.sha1()
        for part in (parent or "", title, message, author, _now_iso(), str(len(repo.commits))):
            digest.update(part.encode() + b"\0")
        for name in sorted(files):
            digest.update(f"{name}\0{files[name].git_oid}\0".encode())
        commit = Commit(digest.hexdigest(), parent, title, message, author, _now_iso(), files)
        repo.commits[commit.commit_id] = commit
        repo.branches[branch] = commit.commit_id
        return commit

    @staticmethod
    def _file_entry(stored: StoredFile) -> dict:
        entry = {"type": "file", "oid": stored.git_oid, "size": stored.size, "path": stored.path}
        if stored.is_lfs:
            entry["lfs"] = {"oid": stored.lfs_sha256, "size": stored.size, "pointerSize": stored.pointer_size}
        return entry

    @staticmethod
    def _tree_oid(commit: Commit, folder: str) -> str:
        prefix = folder.rstrip("/") + "/"
        digest = hashlib.sha1(b"tree\0")
        for name in sorted(name for name in commit.files if name.startswith(prefix)):
            digest.update(f"{name}\0{commit.files[name].git_oid}\0".encode())
        return digest.hexdigest()

    def _lfs_patterns(self, commit: Commit) -> list[str]:
        attributes = commit.files.get(".gitattributes")
        if attributes is None or attributes.content is None:
            return []
        return [line.split()[0] for line in attributes.content.decode().splitlines() if "filter=lfs" in line]

    @staticmethod
    def _matches(path: str, patterns: list[str]) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(path, pattern) for pattern in patterns)

    def _json_file(self, commit: Commit, path: str):
        stored = commit.files.get(path)
        if stored is None:
            return None
        content = self.state.lfs_objects[stored.lfs_sha256] if stored.is_lfs else stored.content
        try:
            return json.loads(content)
        except ValueError:
            return None

    def _card_metadata(self, commit: Commit) -> dict:
        """The README's YAML header, which the Hub exposes as `cardData` (and uses for pipeline_tag etc.)."""
        readme = commit.files.get("README.md")
        if readme is None or readme.content is None:
            return {}
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.content.decode(errors="replace"), re.DOTALL)
        if not match:
            return {}
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError:
            return {}
        return metadata if isinstance(metadata, dict) else {}


_ROUTES = [
    (method, re.compile(pattern), handler)
    for method, pattern, handler in (
        ("GET", r"/api/whoami-v2", HubRequestHandler.whoami),
        ("GET", r"/api/agent-harnesses", HubRequestHandler.agent_harnesses),
        ("POST", r"/api/repos/create", HubRequestHandler.create_repo),
        ("POST", r"/api/validate-yaml", HubRequestHandler.validate_yaml),
        ("POST", rf"/api/{_TYPE_PLURAL}/{_REPO}/preupload/(?P<rev>[^/]+)", HubRequestHandler.preupload),
        ("POST", rf"/api/{_TYPE_PLURAL}/{_REPO}/commit/(?P<rev>[^/]+)", HubRequestHandler.commit),
        ("POST", rf"/api/{_TYPE_PLURAL}/{_REPO}/branch/(?P<branch>[^/]+)", HubRequestHandler.create_branch),
        ("POST", rf"/api/{_TYPE_PLURAL}/{_REPO}/paths-info/(?P<rev>[^/]+)", HubRequestHandler.paths_info),
        ("GET", rf"/api/{_TYPE_PLURAL}/{_REPO}(?:/revision/(?P<rev>[^/]+))?", HubRequestHandler.repo_info),
        ("GET", rf"/api/{_TYPE_PLURAL}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", HubRequestHandler.tree),
        ("GET", rf"/api/{_TYPE_PLURAL}/{_REPO}/commits/(?P<rev>[^/]+)", HubRequestHandler.list_commits),
        ("POST", r"(?:/(?P<type>datasets|spaces))?/" + _REPO + r"\.git/info/lfs/objects/batch",
         HubRequestHandler.lfs_batch),
        ("POST", r"(?:/(?P<type>datasets|spaces))?/" + _REPO + r"\.git/info/lfs/objects/verify",
         HubRequestHandler.lfs_verify),
        ("PUT", r"/__lfs_upload/(?P<key>[0-9a-f]+)", HubRequestHandler.lfs_upload),
        ("GET", r"(?:/(?P<type>datasets|spaces))?/" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
         HubRequestHandler.resolve),
    )
]  # fmt: skip


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """Runs the test Hub in a background thread: `with HubServer() as hub: ... hub.url ...`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = HubState()
        self._httpd = _HubHTTPServer((host, port), HubRequestHandler)  # port 0: the OS picks a free port
        self._httpd.state = self.state
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="test-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Helpers for assertions (read the state directly rather than through the HTTP API).
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.state.repos[(repo_type, repo_id)]

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The commits of a branch, newest first."""
        with self.state.lock:
            return self.repo(repo_id).history(branch)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self.state.lock:
            stored = self.repo(repo_id).resolve(revision).files[path]
            return self.state.lfs_objects[stored.lfs_sha256] if stored.is_lfs else stored.content

    def request_count(self) -> int:
        with self.state.lock:
            return len(self.state.requests)


def main() -> None:
    """Serves a test Hub in the foreground, for rehearsing a publication locally (see the README)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1 (default: a free one).")
    parser.add_argument("--token", required=True, help="The write token clients must send (as HF_TOKEN).")
    parser.add_argument("--user", default="me", help="The user the token belongs to.")
    parser.add_argument("--orgs", nargs="*", default=[], help="Organisations the user may publish under.")
    args = parser.parse_args()
    server = HubServer(port=args.port)
    server.state.add_token(args.token, args.user, args.orgs)
    print(f"Test Hub at {server.url}: export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
