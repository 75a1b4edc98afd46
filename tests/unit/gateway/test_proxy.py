"""The proxy's pure decisions: accepted request targets, the upstream URL, when a request is tried again."""

from __future__ import annotations

import pytest

from llm_operator.gateway.proxy import (
    BadRequest,
    Failure,
    candidates,
    request_target,
    should_retry,
    upstream_url,
)


def test_only_absolute_paths_of_visible_ascii_are_accepted() -> None:
    assert request_target(b"/x/%252e%252e/metrics", b"a=%2F&b") == ("/x/%252e%252e/metrics", "a=%2F&b")
    assert request_target(b"//evil/x", b"") == ("//evil/x", "")  # a path on the chosen replica all the same
    for raw, query in (
        (b"*@10.0.0.9:8080/generate", b""),
        (b"http://10.0.0.9/generate", b""),
        (b"*", b""),
        (b"", b""),
        (b"/caf\xc3\xa9", b""),
        (b"/x", b"a=\x00"),
    ):
        with pytest.raises(BadRequest) as caught:
            request_target(raw, query)
        assert (caught.value.status, caught.value.error_type) == (400, "validation")


def test_the_upstream_url_takes_host_and_port_from_the_table_and_the_path_as_sent() -> None:
    url = upstream_url("10.0.0.1:8080", "/x/%252e%252e/metrics", "a=%2F")
    assert (url.host, url.port, url.raw_path_qs) == ("10.0.0.1", 8080, "/x/%252e%252e/metrics?a=%2F")
    assert str(upstream_url("10.0.0.1:8080", "//10.0.0.9:80/generate", "")) == (
        "http://10.0.0.1:8080//10.0.0.9:80/generate"
    )
    assert upstream_url("10.0.0.1:8080", "/a/../b", "").raw_path == "/a/../b"  # not normalised
    assert str(upstream_url("[fd00::5]:8080", "/x%2Fy", "")) == "http://[fd00::5]:8080/x%2Fy"


def test_candidates_are_the_untried_replicas_then_all() -> None:
    assert candidates(("a", "b", "c"), ["a"]) == ("b", "c")
    assert candidates(("a", "b"), ["a", "b"]) == ("a", "b")


def test_retries() -> None:
    def retry(failure: Failure, tries: int = 1, untried: bool = True, reused: bool = False) -> bool:
        return should_retry(failure, tries=tries, max_tries=3, untried=untried, reused=reused)

    assert retry("connect")
    assert retry("connect", untried=False)  # it never reached a replica
    assert not retry("connect", tries=3)
    assert retry("unavailable")
    assert not retry("unavailable", untried=False)  # the only replica's 503 is passed through
    assert retry("stale_key")  # a replica started before the key was rotated: a newer one has it
    assert not retry("stale_key", untried=False)
    assert retry("disconnect")  # another replica
    assert retry("disconnect", untried=False, reused=True)  # a pooled connection the replica closed
    assert not retry("disconnect", untried=False)  # a fresh connection: it may have run
    assert not retry("disconnect", tries=3, reused=True)
