"""What `--model` names: a local directory, a GGUF file, a Hub repo at a revision, or a model in a package.
Torch-free, so the server can read its flags before the heavy imports."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from llm_serving.progress import LoadError

PACKAGE_PREFIX = "pkg:"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from, as `from_pretrained` arguments."""

    model_id: str
    location: str
    gguf_file: str | None = None
    revision: str | None = None
    token: str | None = None


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise FileNotFoundError(f"package {name!r} is not installed")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin is None:
        raise FileNotFoundError(f"package {name!r} has no files")
    return Path(spec.origin).parent


def resolve(spec: str, revision: str | None = None, token: str | None = None) -> ModelSource:
    """Interpret `--model`: `pkg:<package>`, a `.gguf` path, a local directory, or a Hub repo id."""
    if spec.startswith(PACKAGE_PREFIX):
        folder = _package_dir(spec[len(PACKAGE_PREFIX) :])
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return ModelSource(model_id=ggufs[0].stem, location=str(folder), gguf_file=ggufs[0].name)
        return ModelSource(model_id=folder.name, location=str(folder))
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(model_id=path.stem, location=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        return ModelSource(model_id=path.name, location=str(path))
    return ModelSource(model_id=spec, location=spec, revision=revision, token=token)


def _looks_local(spec: str) -> bool:
    """A spec no Hub repo id can be: an absolute or relative path, or a `.gguf` file name."""
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf")


def check_local(source: ModelSource) -> None:
    """A `--model` that names a local path which does not exist: `LoadError` ModelNotFound (it is no repo id
    to ask the Hub about)."""
    if _looks_local(source.location) and not Path(source.location).expanduser().exists():
        raise LoadError("ModelNotFound", f"no model at the local path {source.location!r}")
