"""The proxy's pure decisions: accepted request targets, the upstream URL, when a request is tried again."""

from __future__ import annotations

import pytest

from llm_operator.gateway.errors import BadRequest
from llm_operator.gateway.proxy import (
    Failure,
    Replicas,
    Tries,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
    candidates,
    refusal,
    refused_answer,
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


def test_timeouts_and_other_failures_are_never_retried() -> None:
    for failure in ("timeout", "failed"):
        assert not should_retry(failure, tries=1, max_tries=3, untried=True, reused=True)


def test_only_a_503_or_a_protected_endpoint_s_401_may_be_tried_elsewhere() -> None:
    assert refused_answer(503, protected=False) == "unavailable"
    assert refused_answer(401, protected=True) == "stale_key"
    assert refused_answer(401, protected=False) is None  # the replica's own answer, passed through
    for status in (200, 400, 404, 429, 500, 502):
        assert refused_answer(status, protected=True) is None


def test_a_broken_attempt_not_tried_again_is_refused_by_how_it_broke() -> None:
    connect = refusal("connect", "Connection refused", 300)
    assert isinstance(connect, UpstreamUnavailable)
    assert (connect.status, connect.error_type, str(connect)) == (
        502,
        "upstream_unavailable",
        "no replica answered: Connection refused",
    )
    timeout = refusal("timeout", "", 2.5)
    assert isinstance(timeout, UpstreamTimeout)
    assert (timeout.status, timeout.error_type, str(timeout)) == (
        504,
        "upstream_timeout",
        "the replica sent nothing for 2.5s",
    )
    for how in ("disconnect", "failed"):
        failed = refusal(how, "Server disconnected", 300)
        assert isinstance(failed, UpstreamFailed)
        assert (failed.status, failed.error_type, str(failed)) == (
            502,
            "upstream_failed",
            "the replica failed before answering: Server disconnected",
        )


def test_tries_go_to_untried_replicas_first_then_stop_at_the_bound() -> None:
    replicas, tries = Replicas(), Tries(max_tries=3)
    first = replicas.choose(("a", "b"), tries)
    assert tries.again("unavailable", ("a", "b"), reused=False)
    second = replicas.choose(("a", "b"), tries)
    assert {first, second} == {"a", "b"}
    assert not tries.again("unavailable", ("a", "b"), reused=False)  # both answered 503: relay the last
    assert tries.again("connect", ("a", "b"), reused=False)  # never reached one: any replica again
    replicas.choose(("a", "b"), tries)
    assert len(tries.tried) == 3
    assert not tries.again("connect", ("a", "b"), reused=False)
    assert not tries.again("unavailable", ("a", "b", "c"), reused=False)  # the bound holds


def test_replicas_count_requests_in_flight_and_prefer_the_least_loaded() -> None:
    replicas = Replicas()
    with replicas.sending("a"):
        assert replicas.in_flight == {"a": 1}
        assert replicas.choose(("a", "b"), Tries(max_tries=3)) == "b"
        with replicas.sending("b"), replicas.sending("b"):
            assert replicas.choose(("a", "b"), Tries(max_tries=3)) == "a"
    assert replicas.in_flight == {}
    with pytest.raises(RuntimeError), replicas.sending("a"):
        raise RuntimeError("the attempt failed")
    assert replicas.in_flight == {}
