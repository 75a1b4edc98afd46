"""The project's images, built with buildah (no Docker daemon) from the same Dockerfiles a user builds with
`docker build`: the operator and serving images on a Debian base made by mmdebstrap, the pod sandbox (pause)
image from the kubernetes module's pause.c, and a local uv image standing in for ghcr.io/astral-sh/uv.

Layers are cached in buildah's storage under `CACHE/images` (outside the clone): the dependency layer is keyed
by the lock file, so a source change rebuilds only the application layer. The pause, operator and serving
images are exported as OCI archives (zstd layers: buildah compresses every OCI export, and zstd is the fastest
of its formats that containerd unpacks) for containerd; `manifest.json` records them.
`python -m llm_devstack.images build [--only NAMES] [--registry R] [--push]` is `make images`."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from llm_devstack.controlplane import HarnessError
from llm_devstack.paths import CACHE, ROOT, TOOLS


def _chart_app_version() -> str:
    chart = yaml.safe_load((ROOT / "charts" / "llm-endpoints" / "Chart.yaml").read_text())
    return str(chart["appVersion"])


def _make_variable(name: str) -> str:
    """A `NAME := value` setting of the Makefile (its single source)."""
    found = re.search(rf"^{name} := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert found, f"{name} is not set in the Makefile"
    return found.group(1)


REGISTRY = "ghcr.io/llm-endpoints"
TAG = _chart_app_version()
OPERATOR_IMAGE = f"{REGISTRY}/llm-operator:{TAG}"
SERVING_IMAGE = f"{REGISTRY}/llm-serving:{TAG}"
PAUSE_IMAGE = "localhost/llm-endpoints/pause:3.10"
BASE_IMAGE = "localhost/llm-endpoints/debian-python:bookworm"
UV_VERSION = _make_variable("UV_VERSION")
UV_IMAGE = f"localhost/llm-endpoints/uv:{UV_VERSION}"
UV = ROOT / ".cache" / "bootstrap" / "bin" / "uv"
"""The uv the Makefile bootstraps (version UV_VERSION): copied into the local uv image."""

IMAGES = CACHE / "images"
STORAGE = IMAGES / "storage"
RUNROOT = IMAGES / "runroot"
ROOTFS = IMAGES / "rootfs"
OCI = IMAGES / "oci"
CONTEXTS = IMAGES / "context"
MANIFEST = IMAGES / "manifest.json"
STORAGE_DRIVER = "overlay"
"""overlay shares unchanged layers between images and containers; vfs would copy each layer in full."""
CONTAINERFILES = ROOT / "devstack" / "images"

DEBIAN_SUITE = "bookworm"
DEBIAN_SOURCES = (
    f"deb http://deb.debian.org/debian {DEBIAN_SUITE} main",
    f"deb http://deb.debian.org/debian {DEBIAN_SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {DEBIAN_SUITE}-security main",
)
ROOTFS_LABEL = "io.llm-endpoints.rootfs"
"""The base image's label naming the rootfs tar it was made from."""
BASE_PACKAGES = ("python3", "ca-certificates")
"""Debian's Python 3.11 (the lock's `requires-python`) and the CA bundle for HTTPS (Hub, API server)."""

BUILD_UV_CACHE = "/mnt"
"""Where the host's uv cache is mounted during RUN steps (the Dockerfiles' UV_CACHE_DIR argument); a folder
every base has, so the mount point leaves nothing behind in the image."""
BUILD_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
"""The base's CA bundle (the Dockerfiles' SSL_CERT_FILE for uv): the host's SSL_CERT_FILE is mounted over it
during RUN steps."""


@dataclass(frozen=True)
class Built:
    """One image `build` made (or found cached): what `manifest.json` records."""

    name: str
    ref: str
    image_id: str
    image_bytes: int
    build_seconds: float
    archive: str | None = None
    archive_bytes: int | None = None
    export_seconds: float | None = None


def buildah(*args: str) -> list[str]:
    """A buildah command line on the project's storage (root and runroot under CACHE/images)."""
    return [
        "buildah",
        "--root",
        str(STORAGE),
        "--runroot",
        str(RUNROOT),
        "--storage-driver",
        STORAGE_DRIVER,
        *args,
    ]


def _run(command: Sequence[str], *, cwd: Path | None = None, show: bool = False) -> str:
    """`command`'s stdout; with `show`, its stderr goes to the terminal as it runs (long builds)."""
    stderr = None if show else subprocess.PIPE
    result = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=cwd)
    if result.returncode != 0:
        detail = "" if show else f":\n{result.stderr[-4000:]}"
        raise HarnessError(f"{' '.join(command[:6])} ... failed ({result.returncode}){detail}")
    return result.stdout


def _rootfs() -> Path:
    """The Debian rootfs tar for the base image, made once per package list and sources."""
    key = hashlib.sha256("\n".join((DEBIAN_SUITE, *DEBIAN_SOURCES, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    target = ROOTFS / f"{DEBIAN_SUITE}-{key}.tar"
    if not target.exists():
        ROOTFS.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial.tar")
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=" + ",".join(BASE_PACKAGES),
                DEBIAN_SUITE,
                str(partial),
                *DEBIAN_SOURCES,
            ]
        )
        partial.rename(target)
    return target


def pause_source() -> Path:
    """pause.c of the kubernetes module the control plane is built from."""
    module = _run(["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"], cwd=TOOLS / "kubernetes")
    return Path(module.strip()) / "build" / "pause" / "linux" / "pause.c"


def _context(name: str, files: dict[str, Path]) -> Path:
    """A small build context of `files` (hard links where possible) for a devstack/images Containerfile."""
    context = CONTEXTS / name
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for target, source in files.items():
        try:
            (context / target).hardlink_to(source)
        except OSError:
            shutil.copy2(source, context / target)
    return context


def _uv_cache_dir() -> str:
    return _run([str(UV), "cache", "dir"]).strip()


def _bud(name: str, ref: str, containerfile: Path, context: Path, *extra: str) -> Built:
    started = time.monotonic()
    _bud_run(ref, containerfile, context, *extra)
    return _built(name, ref, started)


def _bud_run(ref: str, containerfile: Path, context: Path, *extra: str) -> None:
    _run(
        buildah(
            "bud",
            "--quiet",
            "--layers",
            "--isolation",
            "chroot",
            "--file",
            str(containerfile),
            "--tag",
            ref,
            *extra,
            str(context),
        ),
        show=True,
    )


def _built(name: str, ref: str, started: float) -> Built:
    info = inspect(ref)
    layers = json.loads(info["Manifest"])["layers"]
    seconds = round(time.monotonic() - started, 1)
    return Built(name, ref, info["FromImageID"], sum(layer["size"] for layer in layers), seconds)


def inspect(ref: str) -> dict[str, Any]:
    """`buildah inspect` of an image: its OCI config under "OCIv1", its manifest (a JSON string), its id."""
    info: dict[str, Any] = json.loads(_run(buildah("inspect", "--type", "image", ref)))
    return info


def _build_pause() -> Built:
    context = CONTEXTS / "pause"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    _run(["gcc", "-static", "-O2", "-Wall", "-o", str(context / "pause"), str(pause_source())])
    return _bud("pause", PAUSE_IMAGE, CONTAINERFILES / "pause.Containerfile", context)


def _build_base() -> Built:
    """The base image, rebuilt only when its rootfs tar (named by its package list) is another one."""
    started = time.monotonic()
    rootfs = _rootfs()
    try:
        current = inspect(BASE_IMAGE)["OCIv1"]["config"].get("Labels", {}).get(ROOTFS_LABEL)
    except HarnessError:
        current = None
    if current != rootfs.name:
        context = _context("base", {"rootfs.tar": rootfs})
        _bud_run(
            BASE_IMAGE,
            CONTAINERFILES / "base.Containerfile",
            context,
            "--label",
            f"{ROOTFS_LABEL}={rootfs.name}",
        )
    return _built("base", BASE_IMAGE, started)


def _build_uv() -> Built:
    if not UV.exists():
        raise HarnessError(f"{UV} is missing: run `make venv` (it bootstraps uv {UV_VERSION})")
    context = _context("uv", {"uv": UV})
    return _bud("uv", UV_IMAGE, CONTAINERFILES / "uv.Containerfile", context)


def _host_ca_bundle() -> tuple[str, ...]:
    """The host's SSL_CERT_FILE (a CA bundle that may trust a TLS-intercepting proxy) over the base's."""
    bundle = os.environ.get("SSL_CERT_FILE")
    if not bundle or not Path(bundle).is_file():
        return ()
    return ("--volume", f"{bundle}:{BUILD_CA_BUNDLE}:ro")


@contextmanager
def _storage_lock() -> Iterator[None]:
    """One build or prune at a time on the storage: a prune would take a running build's newest layer."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    with (IMAGES / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_component(name: str, ref: str, *, context: Path = ROOT) -> Built:
    """`name`/Dockerfile (operator or serving) built from `context` as `ref`, on the local base and uv
    (which `build` makes)."""
    with _storage_lock():
        return _build_component(name, ref, context)


def _build_component(name: str, ref: str, context: Path = ROOT) -> Built:
    dockerfile = ROOT / name / "Dockerfile"
    return _bud(
        name,
        ref,
        dockerfile,
        context,
        "--ignorefile",
        str(dockerfile.with_name("Dockerfile.dockerignore")),
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        "--build-arg",
        f"UV_IMAGE={UV_IMAGE}",
        "--build-arg",
        f"UV_CACHE_DIR={BUILD_UV_CACHE}",
        "--volume",
        f"{_uv_cache_dir()}:{BUILD_UV_CACHE}",
        *_host_ca_bundle(),
    )


BUILDERS: dict[str, Callable[[], Built]] = {
    "pause": _build_pause,
    "base": _build_base,
    "uv": _build_uv,
    "operator": lambda: _build_component("operator", OPERATOR_IMAGE),
    "serving": lambda: _build_component("serving", SERVING_IMAGE),
}
"""In build order."""
NEEDS = {"operator": ("base", "uv"), "serving": ("base", "uv")}
"""The images a Dockerfile build starts from (built first, in seconds when cached)."""
EXPORTED = ("pause", "operator", "serving")
"""The images containerd imports (base and uv only feed the other builds)."""


def _archive(ref: str) -> Path:
    """Where an image's OCI archive goes: oci/<name>-<tag>.tar."""
    name, tag = ref.rsplit("/", 1)[1].split(":")
    return OCI / f"{name}-{tag}.tar"


def _read_manifest() -> dict[str, dict[str, object]]:
    if not MANIFEST.exists():
        return {}
    return {entry["name"]: entry for entry in json.loads(MANIFEST.read_text())["images"]}


def _export(built: Built, previous: dict[str, object] | None) -> Built:
    """`built` with its OCI archive, written unless the archive already holds this image id."""
    archive = _archive(built.ref)
    if previous and previous.get("image_id") == built.image_id and archive.exists():
        return Built(**{**asdict(built), "archive": str(archive), "archive_bytes": archive.stat().st_size})
    OCI.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".partial.tar")
    partial.unlink(missing_ok=True)
    started = time.monotonic()
    _run(
        buildah(
            "push", "--quiet", "--compression-format", "zstd", built.ref, f"oci-archive:{partial}:{built.ref}"
        )
    )
    partial.rename(archive)
    seconds = round(time.monotonic() - started, 1)
    return Built(
        **{
            **asdict(built),
            "archive": str(archive),
            "archive_bytes": archive.stat().st_size,
            "export_seconds": seconds,
        }
    )


def build(
    names: Sequence[str] = tuple(BUILDERS), *, registry: str = REGISTRY, push: bool = False
) -> list[Built]:
    """Build `names` (cached layers: unchanged ones take seconds), export the archives, update the manifest.
    With another `registry`, operator and serving also get that registry's tags (pushed with `push`)."""
    unknown = set(names) - set(BUILDERS)
    if unknown:
        raise HarnessError(f"unknown images {sorted(unknown)}: choose from {', '.join(BUILDERS)}")
    for command in ("buildah", "mmdebstrap", "gcc", "go"):
        if shutil.which(command) is None:
            raise HarnessError(
                f"{command} is missing: run `make system-packages` (buildah, mmdebstrap) or install it"
            )
    wanted = set(names).union(*(NEEDS.get(name, ()) for name in names))
    results = []
    with _storage_lock():
        manifest = _read_manifest()
        for name in (name for name in BUILDERS if name in wanted):
            built = BUILDERS[name]()
            if name in EXPORTED:
                built = _export(built, manifest.get(name))
            manifest[name] = asdict(built)
            MANIFEST.write_text(json.dumps({"images": list(manifest.values())}, indent=2) + "\n")
            results.append(built)
            print(_row(built), flush=True)
            if name in ("operator", "serving") and registry != REGISTRY:
                theirs = built.ref.replace(REGISTRY, registry, 1)
                _run(buildah("tag", built.ref, theirs))
                print(f"  tagged {theirs}", flush=True)
                if push:
                    _run(buildah("push", theirs, f"docker://{theirs}"))
                    print(f"  pushed {theirs}", flush=True)
        _prune()
    return results


def _prune() -> None:
    """Remove the working containers buildah leaves of the uv stage (the RUN steps mount it), then the images
    no tag leads to any more (the layers of earlier sources or locks), pass by pass: each frees the parents
    of the last."""
    stale = _run(buildah("containers", "--quiet", "--filter", f"ancestor={UV_IMAGE}")).split()
    if stale:
        _run(buildah("rm", *stale))
    while _run(buildah("rmi", "--prune")).strip():
        pass


def _row(built: Built) -> str:
    row = f"{built.name:<9} {built.ref:<48} built in {built.build_seconds:6.1f} s"
    row += f"  image {built.image_bytes / 1e6:8.1f} MB"
    if built.archive_bytes is not None:
        export = "unchanged" if built.export_seconds is None else f"exported in {built.export_seconds:.1f} s"
        row += f"  archive {built.archive_bytes / 1e6:8.1f} MB ({export})"
    return row


def archives() -> dict[str, Path]:
    """Image reference -> OCI archive of the images containerd imports (pause, operator, serving)."""
    manifest = _read_manifest()
    found = {}
    for name in EXPORTED:
        archive = manifest.get(name, {}).get("archive")
        if not archive or not Path(str(archive)).exists():
            raise HarnessError(f"the {name} image's OCI archive is missing: run `make images`")
        found[str(manifest[name]["ref"])] = Path(str(archive))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_devstack.images", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser(
        "build", help="build the images (cached) and export their OCI archives"
    )
    build_parser.add_argument(
        "--only", default=",".join(BUILDERS), help=f"comma-separated, of {','.join(BUILDERS)}"
    )
    build_parser.add_argument(
        "--registry", default=REGISTRY, help="also tag operator and serving for this registry"
    )
    build_parser.add_argument("--push", action="store_true", help="push those tags (`buildah login` first)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        build([name for name in args.only.split(",") if name], registry=args.registry, push=args.push)
    except HarnessError as error:
        print(f"images: {error}", file=sys.stderr)
        return 1
    print(f"images: done in {time.monotonic() - started:.1f} s; manifest {MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
