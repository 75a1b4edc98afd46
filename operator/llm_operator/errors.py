"""Typed failures of the operator; the controller maps each to retry-or-not in one place.

The API server's refusals are subclasses, in `llm_operator.kube.errors`.
"""

from __future__ import annotations


class OperatorError(Exception):
    """Base of every error the operator raises on purpose."""

    retryable = True
    """Whether reconciling again later may succeed without anyone changing anything."""


class InvalidEndpointError(OperatorError):
    """A stored LLMEndpoint does not parse (it bypassed the CRD schema, e.g. an older CRD version)."""

    retryable = False
