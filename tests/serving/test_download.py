"""Fetching a tiny random model from the stand-in Hub with the real huggingface_hub client: progress, pinned
commits, resume after a kill, and every failure reason."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download

from llm_contract import HF_ENDPOINT_ENV, LoadStatus
from llm_devstack.hub import StandInHub, files_of
from llm_serving.download import VERIFIED_MARKER, Fetched, fetch
from llm_serving.progress import LoadError, Progress
from tests.serving.models import tiny_model_dir

REPO_ID = "org/tiny"
WEIGHTS = "model.safetensors"
UNWANTED = {"pytorch_model.bin": b"\0" * 64, "onnx/model.onnx": b"\0" * 64, "README.md": b"# tiny\n"}
"""Files the repo has that a model load does not need."""
SMALL = {"config.json": b'{"model_type": "llama"}', WEIGHTS: os.urandom(64 * 1024)}
"""A repo small enough for the failure cases."""


@pytest.fixture
def hub() -> Iterator[StandInHub]:
    with StandInHub() as started:
        yield started


@pytest.fixture
def model_files() -> dict[str, bytes]:
    return files_of(tiny_model_dir()) | UNWANTED


def _fetch(
    hub: StandInHub, cache: Path, revision: str | None = "main", token: str | None = None, repo: str = REPO_ID
) -> Fetched:
    return fetch(repo, revision, token, Progress(), endpoint=hub.url, cache_dir=cache)


def test_progress_grows_while_a_throttled_download_runs(
    hub: StandInHub, model_files: dict[str, bytes], tmp_path: Path
) -> None:
    commit = hub.add_repo(REPO_ID, model_files)
    wanted = {n: d for n, d in model_files.items() if n not in UNWANTED}
    hub.throttle = len(model_files[WEIGHTS]) * 2  # about half a second of weights
    progress, done = Progress(), threading.Event()
    seen: list[LoadStatus] = []

    def watch() -> None:
        while not done.is_set():
            seen.append(progress.snapshot())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fetched = fetch(REPO_ID, "main", None, progress, endpoint=hub.url, cache_dir=tmp_path)
    finally:
        done.set()
        watcher.join()

    total = sum(len(d) for d in wanted.values())
    downloading = [s for s in seen if s.phase == "Downloading"]
    partial = sorted({s.done_bytes for s in downloading if 0 < s.done_bytes < total})
    assert len(partial) >= 2, f"progress seen only at {partial}"
    assert {s.total_bytes for s in downloading} == {total}
    assert any(s.phase == "Resolving" for s in seen)
    assert progress.snapshot().revision == commit
    assert fetched.commit == commit
    assert {p.name for p in fetched.path.iterdir()} == set(wanted) | {VERIFIED_MARKER}
    assert all((fetched.path / n).read_bytes() == d for n, d in wanted.items())
    assert not {r.file for r in hub.log} & set(UNWANTED)


def test_a_recorded_commit_loads_its_files_without_the_network_after_the_branch_moved(
    hub: StandInHub, model_files: dict[str, bytes], tmp_path: Path
) -> None:
    old = hub.add_repo(REPO_ID, model_files)
    first = _fetch(hub, tmp_path)
    new = hub.commit(REPO_ID, {"config.json": b'{"model_type": "llama", "pushed": true}'})
    hub.clear_log()

    again = _fetch(hub, tmp_path, revision=first.commit)

    assert (first.commit, again.commit, again.path) == (old, old, first.path)
    assert (again.path / "config.json").read_bytes() == model_files["config.json"]
    assert hub.log == []
    moved = _fetch(hub, tmp_path)
    assert moved.commit == new
    assert b"pushed" in (moved.path / "config.json").read_bytes()
    assert (tmp_path / "models--org--tiny" / "refs" / "main").read_text() == new
    assert [r.file for r in hub.log if r.method == "GET" and r.file] == ["config.json"], (
        "only the changed file"
    )


def test_a_download_killed_mid_file_resumes_with_a_range_request(
    hub: StandInHub, model_files: dict[str, bytes], tmp_path: Path
) -> None:
    hub.add_repo(REPO_ID, model_files)
    size = len(model_files[WEIGHTS])
    hub.throttle = size // 3  # three seconds of weights: time to kill it a third of the way in
    script = (
        "from llm_serving.download import fetch\nfrom llm_serving.progress import Progress\n"
        f"fetch({REPO_ID!r}, 'main', None, Progress())\n"
    )
    env = os.environ | {HF_ENDPOINT_ENV: hub.url, "HF_HOME": str(tmp_path)}  # as a serving pod gets them
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    cache = tmp_path / "hub"
    blobs = cache / "models--org--tiny" / "blobs"
    deadline = time.monotonic() + 60
    written = 0
    while written < size // 4:
        assert time.monotonic() < deadline, "the download never got a quarter through"
        assert child.poll() is None, "the download ended before it was killed"
        written = max((p.stat().st_size for p in blobs.glob("*.incomplete")), default=0)
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    hub.throttle = None

    fetched = _fetch(hub, cache)

    gets = [r for r in hub.log if r.method == "GET" and r.file == WEIGHTS]
    assert gets[-1].range_start is not None
    assert gets[-1].range_start >= written
    assert gets[-1].status == 206
    assert hub.served_bytes(REPO_ID, WEIGHTS) < 1.5 * size
    assert (fetched.path / WEIGHTS).read_bytes() == model_files[WEIGHTS]


def test_a_missing_repo_or_revision_says_which(hub: StandInHub, tmp_path: Path) -> None:
    hub.add_repo(REPO_ID, SMALL)
    with pytest.raises(LoadError) as missing_repo:
        _fetch(hub, tmp_path, repo="org/absent")
    with pytest.raises(LoadError) as missing_revision:
        _fetch(hub, tmp_path, revision="v9")
    assert missing_repo.value.reason == "ModelNotFound"
    assert "spec.model.repository" in missing_repo.value.message
    assert "Repository not found" in missing_repo.value.message
    assert missing_revision.value.reason == "RevisionNotFound"
    assert "spec.model.revision" in missing_revision.value.message
    assert "Invalid rev id: v9" in missing_revision.value.message


def test_a_gated_or_private_repo_needs_a_token_that_can_read_it(hub: StandInHub, tmp_path: Path) -> None:
    hub.add_repo("org/gated", SMALL, gated=True, tokens={"hf_granted"})
    hub.add_repo("org/private", SMALL, private=True, tokens={"hf_granted"})
    hub_says = {
        ("org/gated", None): "You must have access to it and be authenticated",
        ("org/gated", "hf_other"): "you are not in the authorized list",
        ("org/private", None): "Repository not found",
    }
    for (repo, token), message in hub_says.items():
        with pytest.raises(LoadError) as denied:
            _fetch(hub, tmp_path, repo=repo, token=token)
        assert denied.value.reason == "ModelAccessDenied", (repo, token)
        assert "spec.model.tokenSecretRef" in denied.value.message
        assert message in denied.value.message
    for repo in ("org/gated", "org/private"):
        fetched = _fetch(hub, tmp_path, repo=repo, token="hf_granted")
        assert (fetched.path / WEIGHTS).read_bytes() == SMALL[WEIGHTS]


def test_a_file_that_fails_its_hash_is_deleted_and_downloaded_again(hub: StandInHub, tmp_path: Path) -> None:
    hub.add_repo(REPO_ID, SMALL)
    hub.corrupt(REPO_ID, WEIGHTS)
    with pytest.raises(LoadError) as corrupt:
        _fetch(hub, tmp_path)
    assert corrupt.value.reason == "WeightsCorrupt"
    assert WEIGHTS in corrupt.value.message
    blobs = tmp_path / "models--org--tiny" / "blobs"
    assert hashlib.sha256(SMALL[WEIGHTS]).hexdigest() not in {p.name.split(".")[0] for p in blobs.iterdir()}
    hub.corrupt(REPO_ID, WEIGHTS, on=False)
    fetched = _fetch(hub, tmp_path)
    assert (fetched.path / WEIGHTS).read_bytes() == SMALL[WEIGHTS]


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs as the cache: a disk that fills up."""
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(volume)], check=True)
    try:
        yield volume
    finally:
        subprocess.run(["umount", str(volume)], check=True)


def test_a_full_cache_says_so(hub: StandInHub, model_files: dict[str, bytes], small_volume: Path) -> None:
    hub.add_repo(REPO_ID, model_files)
    with pytest.raises(LoadError) as full:
        _fetch(hub, small_volume)
    assert full.value.reason == "CacheFull"
    assert "spec.cache.size" in full.value.message


def test_the_stand_in_hub_serves_the_real_client(hub: StandInHub, tmp_path: Path) -> None:
    commit = hub.add_repo(REPO_ID, SMALL | {"sub/notes.txt": b"notes"})
    info = HfApi(endpoint=hub.url).model_info(REPO_ID, revision="main", files_metadata=True)
    lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs}
    assert info.sha == commit
    assert lfs == {WEIGHTS: hashlib.sha256(SMALL[WEIGHTS]).hexdigest()}
    snapshot = Path(snapshot_download(REPO_ID, endpoint=hub.url, cache_dir=tmp_path))
    assert (snapshot / "sub" / "notes.txt").read_bytes() == b"notes"
    path = hf_hub_download(REPO_ID, WEIGHTS, revision=commit, endpoint=hub.url, cache_dir=tmp_path / "other")
    assert Path(path).read_bytes() == SMALL[WEIGHTS]
    ranged = httpx.get(f"{hub.url}/{REPO_ID}/resolve/main/{WEIGHTS}", headers={"Range": "bytes=100-"})
    assert ranged.status_code == 206
    assert ranged.content == SMALL[WEIGHTS][100:]
    assert ranged.headers["X-Repo-Commit"] == commit
    assert ranged.headers["Content-Range"] == f"bytes 100-{len(SMALL[WEIGHTS]) - 1}/{len(SMALL[WEIGHTS])}"


def test_a_new_commit_that_shares_the_weights_fits_a_nearly_full_cache(
    hub: StandInHub, small_volume: Path
) -> None:
    hub.add_repo(REPO_ID, {"config.json": b"{}", WEIGHTS: os.urandom(1_300_000)})
    _fetch(hub, small_volume)
    new = hub.commit(REPO_ID, {"config.json": b'{"pushed": true}'})
    assert _fetch(hub, small_volume).commit == new
