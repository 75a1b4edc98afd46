"""Every refusal a client can see is a typed error, answered through the one table in errors.py."""

from __future__ import annotations

import json

import pytest

from llm_serving import errors
from llm_serving.http.io import error_response


def _all(cls: type[errors.ServingError]) -> list[type[errors.ServingError]]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_all(direct))]


@pytest.mark.parametrize("cls", _all(errors.ServingError), ids=lambda cls: cls.__name__)
def test_each_error_is_answered_with_its_status_and_body(cls: type[errors.ServingError]) -> None:
    error = cls("what went wrong")
    response = error_response(error)
    assert response.status_code == cls.status
    assert error.text == f"{cls.prefix}what went wrong"
    if cls.plain:
        assert response.media_type == "text/plain"
        assert bytes(response.body).decode() == error.text
    elif cls.body is not errors.ServingError.body:  # OpenAI's shape (ModelNotFoundError): its own tests
        assert json.loads(bytes(response.body)) == error.body()
    else:
        assert json.loads(bytes(response.body)) == {"error": error.text, "error_type": cls.error_type}
    for name, value in error.headers().items():
        assert response.headers[name] == value


def test_the_health_probe_answers_tgis_body() -> None:
    response = error_response(errors.HealthCheckError())
    assert response.status_code == 503
    assert json.loads(bytes(response.body)) == {"error": "unhealthy", "error_type": "healthcheck"}
    assert "connection" not in response.headers


def test_a_missing_token_is_a_401_with_a_body_and_a_challenge() -> None:
    response = error_response(errors.UnauthorizedError())
    assert response.status_code == 401
    assert json.loads(bytes(response.body)) == {
        "error": "Missing or invalid bearer token",
        "error_type": "unauthorized",
    }
    assert response.headers["www-authenticate"] == "Bearer"


def test_draining_closes_the_connection() -> None:
    response = error_response(errors.DrainingError())
    assert (response.status_code, response.headers["connection"]) == (503, "close")


def test_a_cut_generation_is_incomplete_in_both_stream_formats() -> None:
    error = errors.IncompleteGenerationError("Server is shutting down")
    assert error.body() == {"error": "Server is shutting down", "error_type": "incomplete_generation"}
    assert error.openai_stream_body() == {
        "error": {"message": "Server is shutting down", "http_status_code": 500}
    }
