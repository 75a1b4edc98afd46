"""The loader's fast paths: a GGUF converted once to safetensors and reused on later loads, a cache that
cannot be written (read-only, full) still loading the GGUF, the weights' bytes counted on `LoadingWeights`,
and checkpoint files read straight into memory equal to safetensors' own reading."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_devstack.models import GGUF_NAME, smollm2_package_dir
from llm_serving.converted import converted_dir
from llm_serving.loading import build_from_state_dict, load, resolve
from llm_serving.progress import Progress
from llm_serving.weights import checkpoint_files, read_to_device, total_bytes
from tests.serving import models
from tests.serving.conftest import REPO

PROMPT = "The capital of France is"


def logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(torch.tensor([ids])).logits
    return out


def copy_gguf(folder: Path) -> Path:
    """A copy of the package's GGUF (never a link: a test overwrites its bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / GGUF_NAME
    shutil.copyfile(smollm2_package_dir() / GGUF_NAME, target)
    return target


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def reference(gguf: Path) -> tuple[list[int], torch.Tensor]:
    """The prompt's ids and float32 logits from transformers' own GGUF load."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer(PROMPT)["input_ids"]
    model.eval()  # type: ignore[no-untyped-call]
    return ids, logits(model, ids)


def test_gguf_is_converted_once_then_loaded_from_the_cache(
    reference: tuple[list[int], torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    gguf = copy_gguf(tmp_path / "model")
    source = resolve(str(gguf))
    target = converted_dir(source)
    assert target.is_relative_to(tmp_path / "hf")
    assert not target.exists()
    ids, expected = reference
    model, tokenizer = load(source, "float32")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in target.iterdir()
    }
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary folder left
    assert tokenizer(PROMPT)["input_ids"] == ids
    assert torch.equal(logits(model, ids), expected)

    # Zero 16 MiB of the GGUF's tensor data, keeping its size and mtime: a load that de-quantised the GGUF
    # again would give other logits; the converted copy gives the same.
    stat = gguf.stat()
    with gguf.open("r+b") as f:
        f.seek(stat.st_size - (32 << 20))
        f.write(bytes(16 << 20))
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert converted_dir(resolve(str(gguf))) == target
    again, _ = load(resolve(str(gguf)), "float32")
    assert torch.equal(logits(again, ids), expected)
    assert resolve(str(gguf)).model_id == gguf.stem


def test_read_only_cache_loads_the_gguf(
    gguf: Path, reference: tuple[list[int], torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_HOME under a regular file: no cache folder can be made (root ignores mode bits)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("HF_HOME", str(blocker / "hf"))
    model, _ = load(resolve(str(gguf)), "float32")
    ids, expected = reference
    assert torch.equal(logits(model, ids), expected)


FULL_DISK = """
import resource, signal, sys, torch
from llm_serving.loading import load, resolve
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
model, _ = load(resolve(sys.argv[1]), "float32")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
with torch.inference_mode():
    torch.save(model(torch.tensor([[int(i) for i in sys.argv[3].split(",")]])).logits, sys.argv[2])
"""


def test_cache_that_fills_up_loads_the_gguf(
    gguf: Path, reference: tuple[list[int], torch.Tensor], tmp_path: Path
) -> None:
    """Files may grow to 1 MiB only (RLIMIT_FSIZE): writing the converted copy fails part way, as on a full
    disk; the partial copy is removed and the GGUF is served."""
    ids, expected = reference
    out = tmp_path / "logits.pt"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    args = [sys.executable, "-c", FULL_DISK, str(gguf), str(out), ",".join(map(str, ids))]
    subprocess.run(args, env=env, cwd=REPO, check=True, timeout=600)
    assert torch.equal(torch.load(out), expected)
    converted = tmp_path / "hf" / "llm-serving" / "converted"
    assert list(converted.iterdir()) == []


class Recording(Progress):
    """A Progress that also keeps every byte count it reached."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int, int]] = []

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        status = self.snapshot()
        self.seen.append((status.phase, status.done_bytes, status.total_bytes))


def test_loading_weights_counts_the_checkpoint_bytes_up_to_the_total(tiny_dir: Path) -> None:
    progress = Recording()
    load(resolve(str(tiny_dir)), "float32", progress=progress)
    total = total_bytes(checkpoint_files(tiny_dir))
    assert total > 0
    done = [d for phase, d, t in progress.seen if phase == "LoadingWeights" and t == total]
    assert done == sorted(done)
    assert done[-1] == total
    final = progress.snapshot()
    assert (final.phase, final.done_bytes, final.total_bytes) == ("LoadingWeights", total, total)


@pytest.mark.parametrize("make", [models.tiny_model_dir, models.tiny_qwen3_dir, models.tiny_gemma3_dir])
def test_weights_read_into_memory_equal_safetensors_and_load_alike(make: Any) -> None:
    """The reader the GPU path streams through (here into CPU memory): every tensor equals safetensors'
    own, and a model built over them gives the loader's logits."""
    folder = make()
    files = checkpoint_files(folder)
    progress = Progress()
    state = read_to_device(files, torch.device("cpu"), progress)
    expected: dict[str, torch.Tensor] = {}
    for f in files:
        expected.update(load_file(f))
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in expected.items())
    assert progress.snapshot().done_bytes == total_bytes(files)
    built = build_from_state_dict(folder, state, "float32", "cpu").eval()
    loaded, tokenizer = load(resolve(str(folder)), "float32")
    ids = tokenizer(PROMPT)["input_ids"]
    assert torch.equal(logits(built, ids), logits(loaded, ids))
