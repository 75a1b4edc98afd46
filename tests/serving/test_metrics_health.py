"""Metrics under TGI and vLLM names, `/info`, `/health` before and after loading."""

from __future__ import annotations

import httpx

from tests.serving.conftest import Server

TGI_METRICS = [
    "tgi_request_count",
    "tgi_request_success",
    "tgi_queue_size",
    "tgi_batch_current_size",
    "tgi_batch_current_max_tokens",
    "tgi_batch_max_total_tokens",
    "tgi_request_duration_bucket",
    "tgi_request_queue_duration_bucket",
    "tgi_request_inference_duration_bucket",
    "tgi_request_mean_time_per_token_duration_bucket",
    "tgi_request_input_length_bucket",
    "tgi_request_generated_tokens_bucket",
    "tgi_batch_next_size_bucket",
    "tgi_batch_inference_count",
]
VLLM_METRICS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
]


def test_metrics_have_tgi_and_vllm_names(tiny_server: Server) -> None:
    with tiny_server.client() as client:
        assert (
            client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}).status_code
            == 200
        )
        assert client.post("/generate", json={"inputs": "hi", "parameters": {"top_k": 0}}).status_code == 422
        text = client.get("/metrics", headers={}).text
    assert 'tgi_request_failure{err="validation"}' in text
    names = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }
    for name in [*TGI_METRICS, *VLLM_METRICS, "llm_serving_requests_in_flight"]:
        assert name in names, name
    assert "# TYPE tgi_request_count counter" in text
    assert "tgi_request_count_total" not in names  # TGI's counters have no _total suffix


def test_info_and_health(tiny_server: Server) -> None:
    with tiny_server.client() as client:
        info = client.get("/info").json()
    assert info["model_id"] == "tiny-llama-0.1.2-v1"
    assert info["max_total_tokens"] == 512
    assert info["max_input_tokens"] == 256
    assert info["max_stop_sequences"] == 4
    assert info["max_best_of"] == 2
    assert info["validation_workers"] == 2
    health = httpx.get(f"{tiny_server.url}/health")
    assert health.status_code == 200
    assert health.content == b""
    assert tiny_server.health_seen[-1] == 200


def test_openapi_document(tiny_server: Server) -> None:
    with tiny_server.client() as client:
        doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/info"):
        assert path in doc["paths"]


def test_health_is_503_until_loaded(smollm2_server: Server) -> None:
    """SmolLM2 takes seconds to load: the probe saw 503 (or no listener) before 200."""
    assert smollm2_server.health_seen[-1] == 200
    assert 503 in smollm2_server.health_seen
