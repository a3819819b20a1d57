"""A small stand-in for the Hugging Face Hub on loopback: enough of its HTTP protocol for the real huggingface_hub
client to create repositories and branches and to push commits through the plain LFS path (``HF_HUB_DISABLE_XET=1``).

    with HubServer(token="hf_write") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_write", "HF_HUB_DISABLE_XET": "1"}
        ...                                   # push with the client
        hub.files("user/model")               # path → bytes at main
        hub.requests                          # every request: method, path, bytes of body received, status
        hub.fail_commits = 1                  # the next commit is answered 500 (an interrupted push)
        hub.fail_uploads = {oid}              # the first PUT of that LFS object is refused (400)

Endpoints: whoami, repo create / info, branch create, validate-yaml, preupload, LFS batch + PUT (objects stored by
oid, SHA-256 and size checked), commit (NDJSON) with per-revision file trees and pull requests. The configured token
may write; another token gets 403, none 401. Anything else is 404, as unknown paths are on the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".model")
LFS_MIN_SIZE = 10 * 1000 * 1000
RELATIONS = ("adapter", "merge", "quantized", "finetune")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # method, path pattern, handler method name
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)", "create_branch"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", "lfs_put"),  # the "presigned" upload URL: no token needed
]


class Reply(Exception):
    """An HTTP answer other than 200, raised from a handler."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


def git_blob_id(content: bytes) -> str:
    """The id git gives a regular file, which the client compares to decide whether a file changed."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    refs: dict[str, str] = field(default_factory=dict)    # branch or refs/pr/N → commit id
    trees: dict[str, dict] = field(default_factory=dict)  # commit id → {path: ("regular" | "lfs", blob id or oid)}
    pull_requests: int = 0


class HubServer:
    def __init__(self, token: str, user: str = "user"):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS storage: sha256 → content
        self.blobs: dict[str, bytes] = {}    # regular files: git blob id → content
        self.announced: dict[str, int] = {}  # oid → size, handed an upload URL by the batch endpoint
        self.requests: list[dict] = []
        self.fail_commits = 0
        self.fail_uploads: set[str] = set()
        self.lock = threading.Lock()

    def __enter__(self) -> "HubServer":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.handle(self)

            do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- what tests read

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        tree = repo.trees[repo.refs[revision]]
        return {path: (self.objects if kind == "lfs" else self.blobs)[key] for path, (kind, key) in tree.items()}

    def uploaded(self) -> list[tuple[str, int]]:
        """(oid, bytes) of every LFS object stored, in order of arrival."""
        return [(r["path"].rsplit("/", 1)[1], r["bytes"]) for r in self.requests
                if r["method"] == "PUT" and r["status"] == 200]

    # ---- HTTP plumbing

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urlsplit(request.path)
        body = read_body(request)
        record = {"method": request.command, "path": url.path, "bytes": len(body), "status": None}
        with self.lock:
            self.requests.append(record)
        status, payload, headers = 200, {}, {}
        try:
            name, match = self.route(request.command, url.path)
            if name != "lfs_put":
                self.check_token(request.headers.get("Authorization"))
            args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            with self.lock:
                payload = getattr(self, name)(body=body, query=parse_qs(url.query), **args)
        except Reply as reply:
            status, payload = reply.status, {"error": str(reply), **reply.extra}
            headers = {"X-Error-Code": reply.code} if reply.code else {}
        record["status"] = status
        data = json.dumps(payload).encode()
        request.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            request.send_header(key, value)
        request.end_headers()
        request.wfile.write(data)

    @staticmethod
    def route(method: str, path: str) -> tuple[str, re.Match]:
        for verb, pattern, name in ROUTES:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                return name, match
        raise Reply(404, "Not Found")

    def check_token(self, header: str | None) -> None:
        if not header:
            raise Reply(401, "Invalid username or password.")
        if header != f"Bearer {self.token}":
            raise Reply(403, "You don't have the rights to write to this repository (read-only token)")

    def repo(self, repo: str, rev: str | None = None) -> Repo:
        if repo not in self.repos:
            raise Reply(404, f"Repository {repo} not found", "RepoNotFound")
        if rev is not None and rev not in self.repos[repo].refs:
            raise Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self.repos[repo]

    def new_commit(self, repo: Repo, tree: dict, salt: bytes) -> str:
        commit = hashlib.sha1(json.dumps(sorted(tree.items())).encode() + salt).hexdigest()
        repo.trees[commit] = tree
        return commit

    # ---- endpoints

    def whoami(self, **_) -> dict:
        return {"type": "user", "name": self.user, "auth": {"accessToken": {"displayName": "test", "role": "write"}}}

    def create_repo(self, body: bytes, **_) -> dict:
        request = json.loads(body)
        repo_id = f"{request.get('organization') or self.user}/{request['name']}"
        if repo_id in self.repos:
            raise Reply(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        repo = self.repos[repo_id] = Repo(private=request.get("visibility") == "private")
        repo.refs["main"] = self.new_commit(repo, {}, repo_id.encode())
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def repo_info(self, repo: str, rev: str = "main", **_) -> dict:
        found = self.repo(repo, rev)
        commit = found.refs[rev]
        return {"id": repo, "sha": commit, "private": found.private,
                "siblings": [{"rfilename": path} for path in sorted(found.trees[commit])]}

    def create_branch(self, repo: str, rev: str, body: bytes, **_) -> dict:
        found = self.repo(repo)
        if rev in found.refs:
            raise Reply(409, f"Reference {rev} already exists")
        found.refs[rev] = found.refs[(json.loads(body or b"{}")).get("startingPoint") or "main"]
        return {}

    def validate_yaml(self, body: bytes, **_) -> dict:
        content = json.loads(body)["content"]
        match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        metadata = (yaml.safe_load(match.group(1)) if match else None) or {}
        relation = metadata.get("base_model_relation")
        if relation is not None and relation not in RELATIONS:
            message = f'"base_model_relation" must be one of {", ".join(RELATIONS)}'
            raise Reply(400, message, errors=[{"message": message}])
        return {"errors": [], "warnings": []}

    def preupload(self, repo: str, rev: str, body: bytes, **_) -> dict:
        found = self.repo(repo, rev)
        tree = found.trees[found.refs[rev]]
        answers = []
        for file in json.loads(body)["files"]:
            mode = "lfs" if file["path"].endswith(LFS_SUFFIXES) or file["size"] >= LFS_MIN_SIZE else "regular"
            kind, key = tree.get(file["path"], (None, None))
            answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False,
                            "oid": key if kind == mode else None})
        return {"files": answers, "commitOid": found.refs[rev]}

    def lfs_batch(self, repo: str, body: bytes, **_) -> dict:
        self.repo(repo)
        objects = []
        for item in json.loads(body)["objects"]:
            answer = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.objects:  # already stored objects get no action: the client skips them
                self.announced[item["oid"]] = item["size"]
                answer["actions"] = {"upload": {"href": f"{self.url}/lfs-storage/{item['oid']}"}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, body: bytes, **_) -> dict:
        if oid not in self.announced:
            raise Reply(403, "upload URL not issued")
        if oid in self.fail_uploads:
            self.fail_uploads.discard(oid)
            raise Reply(400, "simulated: the upload broke off")
        if len(body) != self.announced[oid] or hashlib.sha256(body).hexdigest() != oid:
            raise Reply(400, f"object {oid}: content does not match its oid and size")
        self.objects[oid] = body
        return {}

    def commit(self, repo: str, rev: str, body: bytes, query: dict, **_) -> dict:
        found = self.repo(repo, rev)
        if self.fail_commits:
            self.fail_commits -= 1
            raise Reply(500, "Internal Error (simulated: the commit did not go through)")
        tree = dict(found.trees[found.refs[rev]])
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                content = base64.b64decode(value["content"])
                self.blobs[git_blob_id(content)] = content
                tree[value["path"]] = ("regular", git_blob_id(content))
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.objects:
                    raise Reply(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                tree[value["path"]] = ("lfs", value["oid"])
            elif item["key"] == "deletedFile":
                tree.pop(value["path"], None)
        commit = self.new_commit(found, tree, body)
        pull_request = None
        if query.get("create_pr") == ["1"]:
            found.pull_requests += 1
            found.refs[f"refs/pr/{found.pull_requests}"] = commit
            pull_request = f"{self.url}/{repo}/discussions/{found.pull_requests}"
        else:
            found.refs[rev] = commit
        return {"commitUrl": f"{self.url}/{repo}/commit/{commit}", "commitOid": commit,
                "pullRequestUrl": pull_request}


def read_body(request: BaseHTTPRequestHandler) -> bytes:
    """The request body, whether sent with a Content-Length or in chunks."""
    if request.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return request.rfile.read(int(request.headers.get("Content-Length") or 0))
    chunks = []
    while size := int(request.rfile.readline().split(b";")[0], 16):
        chunks.append(request.rfile.read(size))
        request.rfile.readline()
    request.rfile.readline()
    return b"".join(chunks)
