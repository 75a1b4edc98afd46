"""What the routes share: the service (once the model is loaded), model facts, the key, the drain flag."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_serving.config import Limits
from llm_serving.errors import DrainingError, UnhealthyError
from llm_serving.metrics import Metrics
from llm_serving.service import GenerationService


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_sha: str | None = None
    pipeline_tag: str | None = "text-generation"


@dataclass
class AppState:
    """Mutable server state: `service` is None until the model has loaded."""

    limits: Limits
    metrics: Metrics
    model: ModelInfo
    api_key: str | None = None
    service: GenerationService | None = None
    draining: bool = False
    load_error: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def ready_service(self) -> GenerationService:
        """The service, or 503 while loading or draining."""
        if self.draining:
            raise DrainingError()
        if self.service is None:
            raise UnhealthyError("Model is not loaded yet")
        return self.service
