"""What a loading replica's `/status` shows in the endpoint's status: `Downloading 6.9/16.1 GB (43%)`,
`LoadingWeights 80%`, `WarmingUp`, and the 0..1 the progress gauge exports. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from llm_contract import LOAD_PHASES, LoadStatus
from llm_operator.api.v1alpha1 import LLMEndpoint

LOADING_PHASES = ("Starting", "Resolving", "Downloading", "LoadingWeights", "WarmingUp")
"""The phases a replica reports before it is Ready: each is the endpoint's Ready/Progressing reason."""
assert set(LOADING_PHASES) <= set(LOAD_PHASES)
LOADING_REQUEUE_SECONDS = 2.0
"""How often the operator reads a loading replica's `/status` again."""
_UNITS = ((10**9, "GB"), (10**6, "MB"), (10**3, "kB"))


def amount(done: int, total: int) -> str:
    """`6.9/16.1 GB`, in the unit of the total (decimal, as the Hub shows sizes); `512/2048 B` when small."""
    scale, unit = next(((s, u) for s, u in _UNITS if max(done, total) >= s), (1, "B"))
    if scale == 1:
        return f"{done}/{total} B" if total else f"{done} B"
    text = f"{done / scale:.1f}/{total / scale:.1f}" if total else f"{done / scale:.1f}"
    return f"{text} {unit}"


def fraction(status: LoadStatus) -> float:
    """How far, 0..1, the replica is through its phase (0 when the phase's size is unknown)."""
    if status.total_bytes <= 0:
        return 1.0 if status.phase in ("WarmingUp", "Ready") else 0.0
    return min(1.0, status.done_bytes / status.total_bytes)


def percent(status: LoadStatus) -> int:
    """The whole percentage of `fraction`, rounded, but 100 % only when done."""
    whole = round(fraction(status) * 100)
    return min(whole, 99) if status.done_bytes < status.total_bytes else whole


def progress_text(status: LoadStatus) -> str:
    """The condition message of one loading replica."""
    if status.phase == "Downloading":
        size = amount(status.done_bytes, status.total_bytes)
        return f"Downloading {size} ({percent(status)}%)" if status.total_bytes else f"Downloading {size}"
    if status.phase == "LoadingWeights" and status.total_bytes:
        return f"LoadingWeights {percent(status)}%"
    return status.phase


def least_advanced(statuses: Sequence[LoadStatus]) -> LoadStatus | None:
    """The loading replica furthest from ready (earliest phase, then least progress), if any loads."""
    loading = [s for s in statuses if s.phase in LOADING_PHASES]
    if not loading:
        return None
    return min(loading, key=lambda s: (LOADING_PHASES.index(s.phase), fraction(s)))


def loading_message(statuses: Sequence[LoadStatus], replicas: int) -> tuple[str, str] | None:
    """(reason, message) of the endpoint while `replicas` replicas load, from the ones whose `/status` was
    read; None when none of those reports a loading phase."""
    slowest = least_advanced(statuses)
    if slowest is None:
        return None
    text = progress_text(slowest)
    return slowest.phase, text if replicas <= 1 else f"{text} ({replicas} replicas loading)"


def failed(statuses: Sequence[LoadStatus]) -> LoadStatus | None:
    """A replica that reports its model cannot load (phase Failed with a reason), if any."""
    return next((s for s in statuses if s.phase == "Failed" and s.reason), None)


def loaded_adapters(statuses: Sequence[LoadStatus]) -> list[str] | None:
    """The adapters the read replicas report loaded (sorted, each once); None when none was read."""
    if not statuses:
        return None
    return sorted({name for s in statuses for name in s.adapters})


def adapters_unconfirmed(endpoint: LLMEndpoint) -> bool:
    """Whether status does not yet show every adapter spec.adapters names as loaded: the pass reads the ready
    replicas' `/status` too (a replica may have turned ready between two reads while it loaded)."""
    wanted = {adapter.name for adapter in endpoint.spec.adapters or ()}
    return bool(wanted) and not wanted <= set(endpoint.status.adapters or ())
