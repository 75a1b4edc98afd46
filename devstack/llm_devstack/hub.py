"""A STAND-IN for the Hugging Face Hub (no Hub can be reached here): a small HTTP server that speaks enough of
the Hub's API for the real `huggingface_hub` client to download from it via `HF_ENDPOINT` / `endpoint=`.

It answers `GET /api/models/{ns}/{name}[/revision/{rev}]` (`sha`, `siblings` with `size`, `blobId` and
`lfs.sha256` when `?blobs=true`), `GET /api/models/{ns}/{name}/tree/{rev}[/{path}]` and `HEAD`/`GET
/{ns}/{name}/resolve/{rev}/{path}` (`X-Repo-Commit`, `ETag` = the git blob id, `X-Linked-Etag` = the sha256
and `X-Linked-Size` for LFS files, `Content-Length`, `Accept-Ranges`, `Range` → 206). Xet is not advertised:
files come over plain HTTP. Errors carry the Hub's `X-Error-Code` / `X-Error-Message` headers and
`{"error": ...}`: a private repo without an allowed token → 401 `RepoNotFound` (404 with a token that may not
read it), a gated repo's files without a token → 401 `GatedRepo` (403 with a token not on its list; its
metadata stays public), a missing repo → 404 `RepoNotFound`, a missing revision → 404 `RevisionNotFound`,
a missing file → 404 `EntryNotFound`.

In-process API::

    hub = StandInHub(host="127.0.0.1", port=0).start()      # or `with StandInHub() as hub:`; 0.0.0.0 for pods
    hub.url                                                  # "http://127.0.0.1:PORT": the HF_ENDPOINT
    sha1 = hub.add_repo("org/tiny", tiny_model_dir())        # a folder or {path: bytes}; branch "main"
    hub.add_repo("org/secret", files, private=True, tokens={"hf_ok"})   # gated=True likewise
    sha2 = hub.commit("org/tiny", {"config.json": b"..."})   # a new commit on "main", merged onto its parent
    hub.move_branch("org/tiny", "main", sha1)                # move (or create) a branch or tag
    hub.allow_token("org/secret", "hf_other")
    hub.throttle = 2_000_000                                 # file bodies at most 2 MB/s (None: full speed)
    hub.corrupt("org/tiny", "model.safetensors")             # served bytes differ from the advertised sha256
    hub.log                  # [HubRequest(method, path, repo_id, revision, commit, file, range_start, status,
                             #   bytes_sent)], oldest first
    hub.served_bytes("org/tiny", "model.safetensors")        # body bytes sent for one file, every request
    hub.clear_log(); hub.stop()

From a shell: `python -m llm_devstack.hub --repo org/tiny=DIR [--repo ...] [--host 0.0.0.0] [--port 8080]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".ckpt", ".model")
"""Files stored in LFS (as a repo's `.gitattributes` would say), besides any of LFS_MIN_SIZE or more."""
LFS_MIN_SIZE = 10 * 1024 * 1024
STREAM_CHUNK = 1024 * 1024
"""Body chunk at full speed; throttled bodies go in chunks of a twentieth of a second."""
CREATED = "2026-01-01T00:00:00.000Z"


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob holding `data`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of a commit, with the ids the Hub advertises for it."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The LFS pointer git stores in place of an LFS file."""
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:
        return git_blob_id(self.pointer if self.lfs else self.data)

    def sibling(self, path: str) -> dict[str, Any]:
        """The file's entry in a model info's `siblings` (with `?blobs=true`)."""
        entry: dict[str, Any] = {"rfilename": path, "size": len(self.data), "blobId": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"sha256": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry

    def tree_entry(self, path: str) -> dict[str, Any]:
        """The file's entry in a tree listing."""
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class _Repo:
    private: bool
    gated: bool
    tokens: set[str]
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


@dataclass
class HubRequest:
    """One request the stand-in Hub answered; `bytes_sent` grows while a body streams."""

    method: str
    path: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    file: str | None = None
    range_start: int | None = None
    status: int = 0
    bytes_sent: int = 0


class HubError(Exception):
    """An error the Hub answers with its own code and message."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def files_of(source: Mapping[str, bytes] | Path) -> dict[str, bytes]:
    """A repo's files from a mapping or from every file under a folder (paths relative to it)."""
    if isinstance(source, Path):
        return {
            p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()
        }
    return dict(source)


def _is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE


def _range_start(header: str | None, size: int) -> int | None:
    """The first byte of a `Range: bytes=N-[M]` header (None: no range); HubError 416 when past the end."""
    if not header or not header.startswith("bytes="):
        return None
    first = header[len("bytes=") :].split(",")[0].split("-")[0].strip()
    if not first.isdigit():
        return None
    start = int(first)
    if start >= size and size > 0:
        raise HubError(416, None, f"Range {header} is not satisfiable for {size} bytes")
    return start


class StandInHub:
    """The stand-in Hugging Face Hub: repos with commits, branches and files, served from a thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host, self._port = host, port
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._corrupt: set[tuple[str, str]] = set()
        self._log: list[HubRequest] = []
        self._counter = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.throttle: int | None = None
        """Bytes per second for file bodies; None: as fast as the socket takes them."""

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> StandInHub:
        """Serve in a background thread; returns once the socket listens."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            interface="asgi3",
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="stand-in-hub", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the stand-in Hub did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (open downloads are cut after a second)."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> StandInHub:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The endpoint to give huggingface_hub (`HF_ENDPOINT`); for 0.0.0.0 it names loopback."""
        host = "127.0.0.1" if self._host == "0.0.0.0" else self._host
        return f"http://{host}:{self._port}"

    # -- repos -----------------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | Path,
        *,
        private: bool = False,
        gated: bool = False,
        tokens: Iterable[str] = (),
        branch: str = "main",
    ) -> str:
        """Create `repo_id` ("namespace/name") with one commit of `files` on `branch`; returns the commit."""
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo ids here are namespace/name, not {repo_id!r}")
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo {repo_id} exists")
            self._repos[repo_id] = _Repo(private=private, gated=gated, tokens=set(tokens))
        return self.commit(repo_id, files, branch=branch)

    def commit(
        self, repo_id: str, files: Mapping[str, bytes] | Path, *, branch: str = "main", replace: bool = False
    ) -> str:
        """A new commit on `branch` with `files` added to (or, with `replace`, instead of) its parent's."""
        new = {path: HubFile(data, _is_lfs(path, data)) for path, data in files_of(files).items()}
        with self._lock:
            repo = self._repos[repo_id]
            parent = repo.refs.get(branch)
            tree = {} if replace or parent is None else dict(repo.commits[parent])
            tree.update(new)
            self._counter += 1
            seed = f"{repo_id}\0{parent}\0{self._counter}\0" + "\0".join(
                f"{p}:{f.blob_id}" for p, f in sorted(tree.items())
            )
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = tree
            repo.refs[branch] = sha
            return sha

    def move_branch(self, repo_id: str, branch: str, commit: str) -> None:
        """Point `branch` (or a tag) of `repo_id` at `commit`, creating it if needed."""
        with self._lock:
            repo = self._repos[repo_id]
            if commit not in repo.commits:
                raise ValueError(f"{repo_id} has no commit {commit}")
            repo.refs[branch] = commit

    def allow_token(self, repo_id: str, token: str) -> None:
        """Let `token` read the private or gated `repo_id`."""
        with self._lock:
            self._repos[repo_id].tokens.add(token)

    def corrupt(self, repo_id: str, path: str, on: bool = True) -> None:
        """Serve `path` of `repo_id` with one byte flipped (same size, other sha256), or stop doing so."""
        with self._lock:
            (self._corrupt.add if on else self._corrupt.discard)((repo_id, path))

    # -- the request log -------------------------------------------------------------------------------

    @property
    def log(self) -> list[HubRequest]:
        """Every request so far, oldest first."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def served_bytes(self, repo_id: str, path: str) -> int:
        """Body bytes sent for `path` of `repo_id` over every request."""
        return sum(r.bytes_sent for r in self.log if r.repo_id == repo_id and r.file == path)

    # -- HTTP ------------------------------------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        raw_path = scope.get("raw_path") or scope["path"].encode()
        entry = HubRequest(method=request.method, path=raw_path.decode("latin-1").split("?")[0])
        with self._lock:
            self._log.append(entry)
        try:
            response = self._route(request, entry)
        except HubError as error:
            response = _error_response(error, head=request.method == "HEAD")
        entry.status = response.status_code
        await response(scope, receive, send)

    def _route(self, request: Request, entry: HubRequest) -> Response:
        segments = [unquote(s) for s in entry.path.split("/")[1:]]
        token = _bearer(request.headers.get("authorization", ""))
        if len(segments) >= 4 and segments[:2] == ["api", "models"]:
            entry.repo_id = "/".join(segments[2:4])
            rest = segments[4:]
            if request.method != "GET":
                raise HubError(405, None, "Method not allowed")
            if not rest or (rest[0] == "revision" and len(rest) == 2):
                entry.revision = rest[1] if rest else "main"
                return self._model_info(entry, token, blobs=request.query_params.get("blobs") == "true")
            if rest[0] == "tree" and len(rest) >= 2:
                entry.revision = rest[1]
                recursive = request.query_params.get("recursive") in ("true", "True", "1")
                return self._tree(entry, token, "/".join(rest[2:]), recursive)
        if len(segments) >= 5 and segments[2] == "resolve" and request.method in ("GET", "HEAD"):
            entry.repo_id = "/".join(segments[:2])
            entry.revision, entry.file = segments[3], "/".join(segments[4:])
            return self._resolve(request, entry, token)
        raise HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _lookup(self, entry: HubRequest, token: str | None, files: bool) -> tuple[_Repo, str]:
        """The repo and commit a request names, with the Hub's access rules; raises HubError."""
        assert entry.repo_id is not None
        assert entry.revision is not None
        with self._lock:
            repo = self._repos.get(entry.repo_id)
            if repo is None:
                raise HubError(404, "RepoNotFound", "Repository not found")
            allowed = token is not None and token in repo.tokens
            if repo.private and not allowed:
                status = 401 if token is None else 404
                raise HubError(status, "RepoNotFound", "Repository not found")
            if repo.gated and files and not allowed:
                if token is None:
                    raise HubError(
                        401,
                        "GatedRepo",
                        f"Access to model {entry.repo_id} is restricted. You must have access to it and be "
                        "authenticated to access it. Please log in.",
                    )
                raise HubError(
                    403,
                    "GatedRepo",
                    f"Access to model {entry.repo_id} is restricted and you are not in the authorized list. "
                    f"Visit {self.url}/{entry.repo_id} to ask for access.",
                )
            commit = repo.refs.get(entry.revision) or (
                entry.revision if entry.revision in repo.commits else None
            )
            if commit is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {entry.revision}")
            entry.commit = commit
            return repo, commit

    def _model_info(self, entry: HubRequest, token: str | None, blobs: bool) -> Response:
        repo, commit = self._lookup(entry, token, files=False)
        tree = repo.commits[commit]
        siblings = [f.sibling(p) if blobs else {"rfilename": p} for p, f in sorted(tree.items())]
        author = (entry.repo_id or "").partition("/")[0]
        body = {
            "_id": commit[:24],
            "id": entry.repo_id,
            "modelId": entry.repo_id,
            "author": author,
            "sha": commit,
            "lastModified": CREATED,
            "createdAt": CREATED,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": siblings,
            "usedStorage": sum(len(f.data) for f in tree.values()),
        }
        return JSONResponse(body, headers={"X-Repo-Commit": commit})

    def _tree(self, entry: HubRequest, token: str | None, folder: str, recursive: bool) -> Response:
        repo, commit = self._lookup(entry, token, files=False)
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, hub_file in sorted(repo.commits[commit].items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                sub = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(
                        sub, {"type": "directory", "oid": git_blob_id(sub.encode()), "size": 0, "path": sub}
                    )
            if recursive or len(parts) == 1:
                entries[path] = hub_file.tree_entry(path)
        if folder and not entries:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist on {entry.revision}")
        return JSONResponse(list(entries.values()))

    def _resolve(self, request: Request, entry: HubRequest, token: str | None) -> Response:
        repo, commit = self._lookup(entry, token, files=True)
        assert entry.file is not None
        assert entry.repo_id is not None
        hub_file = repo.commits[commit].get(entry.file)
        if hub_file is None:
            raise HubError(404, "EntryNotFound", f'{entry.file} does not exist on "{entry.revision}"')
        data = hub_file.data
        with self._lock:
            corrupt = (entry.repo_id, entry.file) in self._corrupt
        if corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        size = len(data)
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{hub_file.blob_id}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if hub_file.lfs:
            headers["X-Linked-Etag"] = f'"{hub_file.sha256}"'
            headers["X-Linked-Size"] = str(size)
        start = _range_start(request.headers.get("range"), size)
        entry.range_start = start
        status = 200
        if start is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        body = data[start or 0 :]
        headers["Content-Length"] = str(len(body))
        if request.method == "HEAD":
            return Response(b"", status_code=status, headers=headers)
        return StreamingResponse(self._stream(body, entry), status_code=status, headers=headers)

    async def _stream(self, body: bytes, entry: HubRequest) -> AsyncIterator[bytes]:
        offset = 0
        while offset < len(body):
            rate = self.throttle
            chunk = body[offset : offset + (max(1024, rate // 20) if rate else STREAM_CHUNK)]
            yield chunk
            offset += len(chunk)
            entry.bytes_sent += len(chunk)
            if rate:
                await asyncio.sleep(len(chunk) / rate)


def _bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _error_response(error: HubError, head: bool) -> Response:
    headers = {"X-Error-Message": error.message}
    if error.code:
        headers["X-Error-Code"] = error.code
    if head:
        return Response(b"", status_code=error.status, headers=headers)
    return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


def main(argv: list[str] | None = None) -> None:
    """Serve folders as repos until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m llm_devstack.hub", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repo", action="append", default=[], metavar="NS/NAME=DIR", help="a folder as a repo"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    hub = StandInHub(args.host, args.port)
    for value in args.repo:
        name, _, folder = value.partition("=")
        print(f"{name} @ {hub.add_repo(name, Path(folder))}", flush=True)
    with hub:
        print(f"stand-in Hub at {hub.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
