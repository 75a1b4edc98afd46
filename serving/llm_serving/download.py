"""Fetching a Hub repo at a revision into huggingface_hub's cache: resolve the revision to its commit,
download only the files a model needs with byte progress, resumable from a killed process, verify every
file's hash once, and turn every Hub failure into a LoadError (a reason of LOAD_FAILURE_REASONS). Torch-free.

The cache layout is huggingface_hub's (`models--ns--name/{blobs,snapshots/<commit>}`, blobs named by their
ETag), so `from_pretrained` and `hf_hub_download` read what this writes. Blobs are fetched here rather than by
`hf_hub_download` because huggingface_hub 2.x writes each download to a process-unique `.incomplete` file and
never resumes one a killed process left; here `<etag>.incomplete` is resumed with a `Range` request under the
library's own lock file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx2
from filelock import FileLock
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    get_session,
    hf_hub_url,
    hf_raise_for_status,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoSibling

from llm_serving.progress import LoadError, Progress

COMMIT = re.compile(r"[0-9a-f]{40}")
VERIFIED_MARKER = ".llm-serving-verified.json"
"""Written into a snapshot once all its selected files passed their hash: later starts skip the network."""
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
"""Config, generation config, tokenizer and chat-template files."""
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
"""Weight formats in order of preference: the first one the repo has is the only one fetched."""
TRANSFER_ATTEMPTS = 3
"""Tries per file when the connection breaks mid-body (each resumes where the last stopped)."""
READ_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Fetched:
    """A local snapshot of a Hub repo at one commit."""

    path: Path
    commit: str


def select_files(names: Iterable[str]) -> list[str]:
    """The files of a repo a model load needs: the top-level config, tokenizer and chat-template files and one
    weight format (safetensors, else GGUF, else PyTorch `.bin`) with its index; nothing in subfolders."""
    top = sorted(n for n in names if "/" not in n)
    weights = next((s for s in WEIGHT_SUFFIXES if any(n.endswith(s) for n in top)), None)
    stale_indexes = tuple(f"{s}.index.json" for s in WEIGHT_SUFFIXES if s != weights)
    return [
        n
        for n in top
        if (weights is not None and n.endswith(weights))
        or (n.endswith(CONFIG_SUFFIXES) and not n.endswith(stale_indexes))
    ]


def load_error(error: Exception, repo_id: str, revision: str | None, endpoint: str) -> LoadError:
    """The LoadError for a failure of fetching `repo_id` at `revision` from `endpoint`: what to fix, and the
    Hub's own message."""
    hub = getattr(error, "server_message", None) or str(error) or type(error).__name__
    status = error.response.status_code if isinstance(error, HfHubHTTPError) else None
    if isinstance(error, GatedRepoError):
        return LoadError(
            "ModelAccessDenied",
            f"{repo_id} is gated: set spec.model.tokenSecretRef to a Secret whose token belongs to an "
            f"account that was granted access to it (request access on the Hub). Hub: {hub}",
        )
    if isinstance(error, RevisionNotFoundError):
        return LoadError(
            "RevisionNotFound",
            f"revision {revision or 'main'} does not exist in {repo_id}: set spec.model.revision to a "
            f"branch, tag or commit of the repo. Hub: {hub}",
        )
    if status in (401, 403):
        return LoadError(
            "ModelAccessDenied",
            f"{repo_id} cannot be read without a valid token (it is private or gated, or the token is "
            f"invalid): set spec.model.tokenSecretRef to a Secret with a token that can read the repo. "
            f"Hub: {hub}",
        )
    if isinstance(error, RepositoryNotFoundError):
        return LoadError(
            "ModelNotFound",
            f"repository {repo_id} does not exist on {endpoint} (or it is private and the token cannot read "
            f"it): check spec.model.repository and spec.model.tokenSecretRef. Hub: {hub}",
        )
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return LoadError(
            "CacheFull",
            f"the weights cache is full while fetching {repo_id}: give the endpoint a larger cache "
            f"(spec.cache.size) or free space on it. {error}",
        )
    return LoadError("LoadFailed", f"fetching {repo_id}@{revision or 'main'} from {endpoint} failed: {hub}")


def fetch(
    repo_id: str,
    revision: str | None,
    token: str | None,
    progress: Progress,
    *,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> Fetched:
    """Download `repo_id` at `revision` (a branch, tag or commit; None: `main`) into the cache and return its
    snapshot folder and commit. Reports `Resolving` (then `progress.resolved(commit)`) and `Downloading`
    with byte counts; a commit already complete in the cache needs no network. `token` None: anonymous.
    `endpoint` defaults to HF_ENDPOINT, `cache_dir` to huggingface_hub's (under HF_HOME). Raises LoadError."""
    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    storage = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    progress.phase("Resolving", message=f"{repo_id}@{revision or 'main'}")
    if revision is not None and COMMIT.fullmatch(revision) and _is_verified(storage / "snapshots" / revision):
        progress.resolved(revision)
        return Fetched(storage / "snapshots" / revision, revision)
    try:
        return _download(repo_id, revision, token or False, progress, hub, storage)
    except LoadError:
        raise
    except Exception as error:
        raise load_error(error, repo_id, revision, hub) from error


def _is_verified(snapshot: Path) -> bool:
    """Whether `snapshot` holds every file its marker lists."""
    try:
        names = json.loads((snapshot / VERIFIED_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((snapshot / name).is_file() for name in names)


def _download(
    repo_id: str, revision: str | None, token: str | bool, progress: Progress, endpoint: str, storage: Path
) -> Fetched:
    info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    assert info.sha is not None, "the Hub answers a model's commit"
    commit = info.sha
    progress.resolved(commit)
    if revision is not None and revision != commit:
        with contextlib.suppress(
            OSError
        ):  # as huggingface_hub records the commit a branch or tag resolved to
            _write(storage / "refs" / revision, commit)
    snapshot = storage / "snapshots" / commit
    if _is_verified(snapshot):
        return Fetched(snapshot, commit)
    listed = {s.rfilename: s for s in info.siblings or []}
    wanted = [listed[name] for name in select_files(listed)]
    if not any(s.rfilename.endswith(WEIGHT_SUFFIXES) for s in wanted):
        raise LoadError(
            "LoadFailed",
            f"{repo_id}@{commit} has no safetensors, GGUF or PyTorch weights at its top level: "
            "check spec.model.repository",
        )
    sizes = {s.rfilename: s.size or 0 for s in wanted}
    present = sum(size for name, size in sizes.items() if (snapshot / name).is_file())
    progress.phase("Downloading", sum(sizes.values()), message=f"{repo_id}@{commit}")
    progress.set_done(present)
    _check_space(storage, sum(_bytes_to_write(storage, commit, s) for s in wanted), repo_id, commit)
    for sibling in wanted:
        _fetch_file(repo_id, commit, sibling, token, endpoint, storage, progress)
    _write(snapshot / VERIFIED_MARKER, json.dumps({"files": sorted(sizes)}))
    return Fetched(snapshot, commit)


def _write(path: Path, text: str) -> None:
    """Replace `path` with `text` at once (readers see the old or the new file, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _bytes_to_write(storage: Path, commit: str, sibling: RepoSibling) -> int:
    """What is left to download of `sibling`: nothing when its snapshot file or its blob (named, as the Hub
    names it, by its sha256 or git blob id; another commit may share it) exists, less a partial download."""
    blob = storage / "blobs" / str(sibling.lfs.sha256 if sibling.lfs else sibling.blob_id)
    if (storage / "snapshots" / commit / sibling.rfilename).is_file() or blob.is_file():
        return 0
    partial = blob.with_name(blob.name + ".incomplete")
    return max(0, (sibling.size or 0) - (partial.stat().st_size if partial.is_file() else 0))


def _check_space(storage: Path, needed: int, repo_id: str, commit: str) -> None:
    storage.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(storage).free
    if free < needed:
        raise LoadError(
            "CacheFull",
            f"the weights cache has {free / 1e6:.1f} MB free but {repo_id}@{commit} needs "
            f"{needed / 1e6:.1f} MB more: give the endpoint a larger cache (spec.cache.size) or free space "
            "on it",
        )


class _Digest:
    """The hash the Hub advertises for a file: sha256 for LFS files, the git blob id for the others."""

    def __init__(self, sibling: RepoSibling) -> None:
        self._sibling = sibling
        self.reset()

    def reset(self) -> None:
        if self._sibling.lfs is not None:
            self.expected: str | None = self._sibling.lfs.sha256
            self._hash = hashlib.sha256()
        else:
            self.expected = self._sibling.blob_id
            self._hash = hashlib.sha1(b"blob %d\0" % (self._sibling.size or 0))

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def check(self, repo_id: str, commit: str, bad: Path) -> None:
        """WeightsCorrupt (after deleting `bad`, so the next try downloads again) when the hash differs."""
        got = self._hash.hexdigest()
        if self.expected is not None and got != self.expected:
            bad.unlink(missing_ok=True)
            raise LoadError(
                "WeightsCorrupt",
                f"{self._sibling.rfilename} of {repo_id}@{commit} does not match the Hub's hash "
                f"(expected {self.expected}, got {got}); the bad copy was deleted and the next start "
                "downloads it again",
            )


def _hash_file(path: Path, digest: _Digest) -> None:
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)


def _fetch_file(
    repo_id: str,
    commit: str,
    sibling: RepoSibling,
    token: str | bool,
    endpoint: str,
    storage: Path,
    progress: Progress,
) -> None:
    """Put `sibling` of `commit` into the snapshot, verified: downloading or resuming its blob if needed."""
    pointer = storage / "snapshots" / commit / sibling.rfilename
    digest = _Digest(sibling)
    if pointer.is_file():
        _hash_file(pointer, digest)
        digest.check(repo_id, commit, pointer.resolve())
        return
    url = hf_hub_url(repo_id, sibling.rfilename, revision=commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    if meta.etag is None:
        raise LoadError("LoadFailed", f"the Hub gave no ETag for {sibling.rfilename} of {repo_id}@{commit}")
    blob = storage / "blobs" / meta.etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = storage.parent / ".locks" / storage.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        if blob.is_file():
            _hash_file(blob, digest)
            digest.check(repo_id, commit, blob)
            progress.advance(blob.stat().st_size)
        else:
            partial = blob.with_name(blob.name + ".incomplete")
            same_origin = meta.location.startswith(endpoint + "/")  # a CDN's signed URL gets no token
            auth = {"Authorization": f"Bearer {token}"} if isinstance(token, str) and same_origin else {}
            _transfer(meta.location, partial, meta.size, auth, digest, progress)
            digest.check(repo_id, commit, partial)
            partial.replace(blob)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    link = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(blob, pointer.parent))
    link.replace(pointer)


def _transfer(
    url: str, partial: Path, size: int | None, auth: dict[str, str], digest: _Digest, progress: Progress
) -> None:
    """Download `url` into `partial`, continuing from the bytes it already holds (a `Range` request)."""
    with os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as out:
        _hash_file(partial, digest)
        have = out.seek(0, os.SEEK_END)
        if size is not None and have > size:
            out.truncate(0)
            digest.reset()
            have = 0
        progress.advance(have)
        for attempt in range(TRANSFER_ATTEMPTS):
            if size is not None and have == size:
                return
            headers = {"Accept-Encoding": "identity"} | auth
            if have:
                headers["Range"] = f"bytes={have}-"
            try:
                with get_session().stream(
                    "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
                ) as response:
                    hf_raise_for_status(response)
                    if have and response.status_code != 206:
                        out.seek(0)
                        out.truncate()
                        digest.reset()
                        progress.advance(-have)
                        have = 0
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        digest.update(chunk)
                        have += len(chunk)
                        progress.advance(len(chunk))
                if size is None:
                    return
            except (httpx2.TransportError, httpx2.StreamError):
                if attempt == TRANSFER_ATTEMPTS - 1:
                    raise
        if size is not None and have != size:
            raise LoadError(
                "LoadFailed", f"{url} ended at {have} of {size} bytes after {TRANSFER_ATTEMPTS} tries"
            )
