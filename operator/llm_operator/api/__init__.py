"""The `LLMEndpoint` API (`llm-endpoints.io/v1alpha1`): pydantic models that are the sole schema."""
