"""The names both images share (`llm_contract`): how a bearer token is read from `Authorization`."""

from __future__ import annotations

import pytest

from llm_contract import bearer


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer s3cret", "s3cret"),
        ("bearer  s3cret ", "s3cret"),
        ("BEARER a b", "a b"),
        ("Bearer ", None),
        ("Bearer", None),
        ("Basic s3cret", None),
        ("s3cret", None),
        ("", None),
    ],
)
def test_only_a_bearer_scheme_with_a_token_yields_one(header: str, token: str | None) -> None:
    assert bearer(header) == token
