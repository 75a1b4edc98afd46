"""Reading safetensors checkpoints at the disk's sequential bandwidth: into the page cache ahead of a
memory-mapped load (CPU), or straight into device memory through pinned staging buffers (CUDA)."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from llm_serving.progress import Progress

READ_CHUNK = 16 << 20
"""Bytes per read call: large enough that the disk streams, small enough to report progress often."""

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PREFETCH_THREADS = 4

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: those its index names, else `model.safetensors`; [] when
    the weights are in another format."""
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / SINGLE_NAME
    return [single] if single.is_file() else []


def total_bytes(files: Iterable[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def prefetch(
    files: Iterable[Path], progress: Progress, chunk: int = READ_CHUNK, threads: int = PREFETCH_THREADS
) -> None:
    """Bring every file into the page cache, `chunk`-byte reads in order by `threads` readers (several
    requests in flight stream faster than one on network-backed disks), so that a memory-mapped load that
    follows finds its pages there instead of faulting them in one by one; counts the bytes."""
    paths = list(files)
    jobs = [(i, offset) for i, path in enumerate(paths) for offset in range(0, path.stat().st_size, chunk)]
    buffers = threading.local()
    fds: list[int] = []

    def read(job: tuple[int, int]) -> None:
        buffer = getattr(buffers, "buffer", None)
        if buffer is None:
            buffer = buffers.buffer = bytearray(chunk)
        progress.advance(os.preadv(fds[job[0]], [buffer], job[1]))

    try:
        fds.extend(os.open(path, os.O_RDONLY) for path in paths)
        with ThreadPoolExecutor(threads, thread_name_prefix="prefetch") as pool:
            for _ in pool.map(read, jobs):
                pass
    finally:
        for fd in fds:
            os.close(fd)


def read_header(path: Path) -> tuple[dict[str, dict[str, object]], int]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets) and where its data starts."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, dict[str, object]] = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _views(data: torch.Tensor, header: dict[str, dict[str, object]]) -> dict[str, torch.Tensor]:
    """The tensors of one file as views into its data bytes (a copy only where an offset is unaligned)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = _DTYPES[str(info["dtype"])]
        start, end = (int(x) for x in info["data_offsets"])  # type: ignore[attr-defined]
        shape = [int(x) for x in info["shape"]]  # type: ignore[attr-defined]
        raw = data[start:end]
        if start % dtype.itemsize:
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(shape)
    return tensors


def _read_into(f: io.FileIO, target: torch.Tensor, progress: Progress, chunk: int) -> None:
    """Fill a CPU uint8 tensor from the file's current position."""
    view = target.numpy().data
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + chunk])
        if not n:
            raise EOFError(f"{f.name} ended early")
        done += n
        progress.advance(n)


def _stream_to_cuda(f: io.FileIO, target: torch.Tensor, progress: Progress, chunk: int) -> None:
    """Fill a device uint8 tensor from the file: reads into two pinned buffers in turn, each copied to the
    device asynchronously while the next one is read."""
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    size = target.numel()
    done = 0
    turn = 0
    while done < size:
        event = copied[turn]
        if event is not None:
            event.synchronize()
        n = min(chunk, size - done)
        _read_into(f, staging[turn][:n], progress, chunk)
        target[done : done + n].copy_(staging[turn][:n], non_blocking=True)
        recorded = torch.cuda.Event()  # type: ignore[no-untyped-call]
        recorded.record()
        copied[turn] = recorded
        done += n
        turn ^= 1
    torch.cuda.current_stream(target.device).synchronize()


def read_to_device(
    files: Iterable[Path], device: torch.device, progress: Progress, chunk: int = READ_CHUNK
) -> dict[str, torch.Tensor]:
    """Every tensor of the files on `device`, each file's data read sequentially into one device buffer
    and its tensors viewed out of it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        header, start = read_header(path)
        data = torch.empty(path.stat().st_size - start, dtype=torch.uint8, device=device)
        with path.open("rb", buffering=0) as f:
            f.seek(start)
            progress.advance(start)
            if device.type == "cuda":
                _stream_to_cuda(f, data, progress, chunk)
            else:
                _read_into(f, data, progress, chunk)
        tensors.update(_views(data, header))
    return tensors
