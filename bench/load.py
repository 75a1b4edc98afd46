"""Weight-loading benchmark: the server's loader against a plain sequential read of the same files.

The benchmark writes a ~2 GB random-weight Llama checkpoint (bfloat16, several safetensors shards, SmolLM2's
tokenizer) into a temporary folder on the real disk (under .cache/, not /dev/shm; deleted at the end), then
runs the arms in interleaved rounds (A B C ..., A B C ...); every figure is the median over rounds.

1. cold page cache before each arm (`sync; echo 3 > /proc/sys/vm/drop_caches`, then the libraries this
   process maps read back; posix_fadvise(DONTNEED) per checkpoint file where drop_caches is refused):
   `llm_serving.loading.load` to CPU memory (bfloat16, the checkpoint's dtype), then one byte of every 4 KiB
   page of every weight touched, so that memory-mapped weights count as loaded, timed from its
   `LoadingWeights` phase on (the whole call, its tokenizer first, is reported too), vs reading every file
   once with 16 MiB `readinto` calls; goal: loader >= 0.8x the raw read bandwidth;
2. the same with a warm page cache (each arm after a run that filled it);
3. the alternatives evaluated for the loader, in the same rounds: transformers' `from_pretrained` alone
   (memory-mapped, the pages faulted in by the touch), safetensors' `load_file` (mmap and pread backends),
   and reading each file into one buffer of its size (`llm_serving.weights.read_to_device` on the CPU);
4. where `torch.cuda.is_available()`: the loader to `cuda:0` (warm page cache) vs the host->device copy
   bandwidth of a pinned buffer measured in the same run; goal >= 0.7x.

Prints one line per arm with GB/s and its ratio to the raw read; writes bench/results/load.json.
Run: `.venv/bin/python -m bench.load [--rounds 3] [--gb 2.0] [--output PATH]`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from llm_devstack.models import tokenizer_dir
from llm_devstack.paths import ROOT
from llm_serving.loading import load, resolve
from llm_serving.progress import Progress
from llm_serving.weights import INDEX_NAME, READ_CHUNK, checkpoint_files, read_to_device, total_bytes

PAGE = 4096
SHARDS = 4
HIDDEN, INTERMEDIATE, KV_HEADS, HEAD_DIM = 2048, 5632, 4, 128


def layer_count(gigabytes: float, vocab: int) -> int:
    """Layers of the benchmark's Llama that make about `gigabytes` of bfloat16 weights."""
    per_layer = 2 * HIDDEN * HIDDEN + 2 * KV_HEADS * HEAD_DIM * HIDDEN + 3 * HIDDEN * INTERMEDIATE
    embeddings = 2 * vocab * HIDDEN
    return max(1, round((gigabytes * 1e9 / 2 - embeddings) / per_layer))


def write_checkpoint(folder: Path, gigabytes: float) -> None:
    """A random-weight Llama in `SHARDS` safetensors files with an index, config and tokenizer."""
    tokenizer = tokenizer_dir()
    for item in tokenizer.iterdir():
        shutil.copy(item, folder / item.name)
    vocab = json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_size = len(vocab) + 64
    layers = layer_count(gigabytes, vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HIDDEN // HEAD_DIM,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.save_pretrained(folder)
    kv = KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        }
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (vocab_size, HIDDEN)}
    names = list(shapes)
    per_shard = -(-len(names) // SHARDS)
    weight_map: dict[str, str] = {}
    generator = torch.Generator().manual_seed(0)
    for s in range(SHARDS):
        file = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {
            name: (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            for name in names[s * per_shard : (s + 1) * per_shard]
        }
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    os.sync()


def rewarm_mapped_files() -> None:
    """Read back the files this process maps (torch's and other libraries' code), which drop_caches evicted
    too: the arms then meet a cold checkpoint, not cold library code."""
    mapped = {line.split(maxsplit=5)[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
    for name in mapped:
        path = Path(name.strip())
        if path.is_absolute() and path.is_file():
            raw_read([path])


class PageCache:
    """Empties the page cache: drop_caches where allowed (root), else posix_fadvise(DONTNEED) per file."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.method = "drop_caches"

    def drop(self) -> None:
        os.sync()
        if self.method == "drop_caches":
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                rewarm_mapped_files()
                return
            except OSError:
                self.method = "posix_fadvise"
        for path in self.files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def touch(tensors: Any) -> int:
    """Read one byte of every page of every tensor (memory-mapped pages are faulted in)."""
    total = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        flat = t.detach().reshape(-1).view(torch.uint8)
        total += int(flat[::PAGE].sum())
    return total


def raw_read(files: list[Path]) -> None:
    buffer = memoryview(bytearray(READ_CHUNK))
    for path in files:
        with path.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


class Timed(Progress):
    """A Progress that notes when `LoadingWeights` began."""

    weights_started = 0.0

    def phase(self, phase: str, total_bytes: int = 0, message: str | None = None) -> None:
        if phase == "LoadingWeights":
            self.weights_started = time.perf_counter()
        super().phase(phase, total_bytes, message)


class Arms:
    """Every way of loading the checkpoint, each returning when its weights are in memory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = checkpoint_files(folder)
        self.loader_calls: list[float] = []
        """Each loader run's whole call (tokenizer and model build included) + touch, in seconds."""

    def loader(self) -> float:
        """Counts from `LoadingWeights` on; the whole call goes to `loader_calls`."""
        progress = Timed()
        start = time.perf_counter()
        model, _ = load(resolve(str(self.folder)), "bfloat16", progress=progress)
        touch(model.state_dict().values())
        end = time.perf_counter()
        self.loader_calls.append(end - start)
        return end - progress.weights_started

    def raw(self) -> None:
        raw_read(self.files)

    def transformers_only(self) -> None:
        model = transformers.AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.bfloat16)
        touch(model.state_dict().values())

    def load_file_mmap(self) -> None:
        for path in self.files:
            touch(load_file(path).values())

    def load_file_pread(self) -> None:
        for path in self.files:
            touch(load_file(path, backend="pread").values())

    def whole_file_reads(self) -> None:
        touch(read_to_device(self.files, torch.device("cpu"), Progress()).values())

    def cuda_loader(self) -> None:
        model, _ = load(resolve(str(self.folder)), "bfloat16", device="cuda:0")
        torch.cuda.synchronize()
        del model

    def all(self) -> dict[str, Arm]:
        return {
            "loader": self.loader,
            "raw_read": self.raw,
            "transformers_from_pretrained": self.transformers_only,
            "safetensors_load_file_mmap": self.load_file_mmap,
            "safetensors_load_file_pread": self.load_file_pread,
            "whole_file_reads": self.whole_file_reads,
        }


def h2d_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a pinned host buffer copied to cuda:0 (the best of `repeats`)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


Arm = Callable[[], float | None]
"""Loads the checkpoint; returns the seconds to count, or None: the whole call counts."""


def timed(arm: Arm, before: Callable[[], None]) -> float:
    before()
    start = time.perf_counter()
    counted = arm()
    return time.perf_counter() - start if counted is None else counted


def run_rounds(
    arms: dict[str, Arm], rounds: int, before: Callable[[], None], nbytes: int
) -> dict[str, dict[str, Any]]:
    """Interleaved rounds; per arm each round's seconds, the median and its GB/s."""
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds):
        for name, arm in arms.items():
            seconds[name].append(timed(arm, before))
            print(f"  round {r + 1} {name}: {seconds[name][-1]:.2f} s", flush=True)
    out: dict[str, dict[str, Any]] = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        out[name] = {"seconds": values, "median_s": median, "gb_per_s": nbytes / median / 1e9}
    return out


def with_ratios(results: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    base = results[baseline]["gb_per_s"]
    return {name: r | {"ratio_to_raw": r["gb_per_s"] / base} for name, r in results.items()}


def report(title: str, results: dict[str, dict[str, Any]], goal: float | None) -> None:
    print(title)
    for name, r in results.items():
        mark = ""
        if name == "loader" and goal is not None:
            mark = f"  goal >= {goal:g}x: {'met' if r['ratio_to_raw'] >= goal else 'MISSED'}"
        figures = f"{r['median_s']:6.2f} s  {r['gb_per_s']:5.2f} GB/s  {r['ratio_to_raw']:.2f}x"
        print(f"  {name:32s} {figures}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "load.json"))
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    (ROOT / ".cache").mkdir(exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-load-", dir=ROOT / ".cache") as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, args.gb)
        arms = Arms(folder)
        nbytes = total_bytes(arms.files)
        cache = PageCache(arms.files)
        print(f"checkpoint: {nbytes / 1e9:.2f} GB in {len(arms.files)} files under {folder}")
        arms.loader()  # imports and first-call costs, outside the timings
        print("cold page cache:")
        arms.loader_calls.clear()
        cold = with_ratios(run_rounds(arms.all(), args.rounds, cache.drop, nbytes), "raw_read")
        cold["loader"]["whole_call_s"] = arms.loader_calls[:]
        print("warm page cache:")
        arms.loader_calls.clear()
        warm = with_ratios(run_rounds(arms.all(), args.rounds, arms.raw, nbytes), "raw_read")
        warm["loader"]["whole_call_s"] = arms.loader_calls[:]
        result: dict[str, Any] = {
            "checkpoint_bytes": nbytes,
            "files": len(arms.files),
            "rounds": args.rounds,
            "page_cache_drop": cache.method,
            "cold": cold,
            "warm": warm,
        }
        if torch.cuda.is_available():
            bandwidth = h2d_bandwidth()
            cuda = run_rounds({"loader_to_cuda": arms.cuda_loader}, args.rounds, arms.raw, nbytes)
            cuda_result = cuda["loader_to_cuda"] | {
                "h2d_pinned_gb_per_s": bandwidth / 1e9,
                "ratio_to_h2d": cuda["loader_to_cuda"]["gb_per_s"] / (bandwidth / 1e9),
            }
            result["cuda"] = cuda_result
    report("cold page cache (ratio to the raw sequential read):", cold, 0.8)
    report("warm page cache (ratio to the raw sequential read):", warm, 0.8)
    if "cuda" in result:
        c = result["cuda"]
        verdict = "met" if c["ratio_to_h2d"] >= 0.7 else "MISSED"
        print(
            f"to cuda:0 (warm page cache): {c['gb_per_s']:.2f} GB/s vs pinned host->device "
            f"{c['h2d_pinned_gb_per_s']:.2f} GB/s: {c['ratio_to_h2d']:.2f}x  goal >= 0.7x: {verdict}"
        )
    result |= {
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
        "seconds": time.perf_counter() - started,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
