"""progress.py: a loading replica's `/status` as the endpoint's reason, message and gauge value."""

from __future__ import annotations

import pytest

from llm_contract import LoadStatus
from llm_operator.progress import (
    amount,
    failed,
    fraction,
    least_advanced,
    loaded_adapters,
    loading_message,
    progress_text,
)

GB = 10**9


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (LoadStatus("Downloading", int(6.9 * GB), int(16.1 * GB)), "Downloading 6.9/16.1 GB (43%)"),
        (LoadStatus("Downloading", 2_500_000, 10_000_000), "Downloading 2.5/10.0 MB (25%)"),
        (LoadStatus("Downloading", 225, 900), "Downloading 225/900 B (25%)"),
        (LoadStatus("Downloading", 3 * GB), "Downloading 3.0 GB"),
        (LoadStatus("LoadingWeights", 8, 10), "LoadingWeights 80%"),
        (LoadStatus("LoadingWeights"), "LoadingWeights"),
        (LoadStatus("WarmingUp"), "WarmingUp"),
        (LoadStatus("Resolving"), "Resolving"),
        (LoadStatus("Starting"), "Starting"),
    ],
)
def test_progress_text(status: LoadStatus, text: str) -> None:
    assert progress_text(status) == text


def test_percent_is_never_rounded_up_to_done() -> None:
    assert progress_text(LoadStatus("Downloading", 999, 1000)) == "Downloading 1.0/1.0 kB (99%)"
    assert progress_text(LoadStatus("Downloading", 1000, 1000)) == "Downloading 1.0/1.0 kB (100%)"
    assert amount(16_100_000_000, 16_100_000_000) == "16.1/16.1 GB"


def test_fraction() -> None:
    assert fraction(LoadStatus("Downloading", 1, 4)) == 0.25
    assert fraction(LoadStatus("Downloading", 9, 4)) == 1.0
    assert fraction(LoadStatus("Downloading")) == 0.0
    assert fraction(LoadStatus("WarmingUp")) == 1.0


def test_the_least_advanced_replica_is_shown() -> None:
    downloading = LoadStatus("Downloading", 1, 4)
    statuses = [LoadStatus("WarmingUp"), LoadStatus("Downloading", 3, 4), downloading, LoadStatus("Ready")]
    assert least_advanced(statuses) == downloading
    assert least_advanced([LoadStatus("Ready")]) is None
    assert loading_message([downloading], 1) == ("Downloading", "Downloading 1/4 B (25%)")
    assert loading_message(statuses, 3) == ("Downloading", "Downloading 1/4 B (25%) (3 replicas loading)")
    assert loading_message([], 2) is None


def test_failed_and_adapters() -> None:
    broken = LoadStatus("Failed", reason="CacheFull", message="disk full")
    assert failed([LoadStatus("Downloading"), broken]) == broken
    assert failed([LoadStatus("Failed")]) is None  # no reason: nothing to say
    assert loaded_adapters(
        [LoadStatus("WarmingUp", adapters=("b", "a")), LoadStatus("Ready", adapters=("a",))]
    ) == [
        "a",
        "b",
    ]
    assert loaded_adapters([]) is None


def test_ready_replicas_are_asked_until_status_shows_every_adapter() -> None:
    from llm_operator.progress import adapters_unconfirmed
    from tests.unit.operator_tests.factories import endpoint

    spec = {"adapters": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b"}]}
    assert adapters_unconfirmed(endpoint(spec))
    assert adapters_unconfirmed(endpoint(spec, status={"adapters": ["a"]}))
    assert not adapters_unconfirmed(endpoint(spec, status={"adapters": ["a", "b"]}))
    assert not adapters_unconfirmed(endpoint())
