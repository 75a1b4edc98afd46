"""What the routes share: the service (once the model is loaded), the loading progress, model facts, the key,
the drain flag."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_serving.config import Limits
from llm_serving.errors import DrainingError, UnhealthyError
from llm_serving.metrics import Metrics
from llm_serving.progress import Progress
from llm_serving.service import GenerationService


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_sha: str | None = None
    pipeline_tag: str | None = "text-generation"
    adapters: tuple[str, ...] = ()
    """The LoRA adapters served beside the base model (`--adapter` names)."""


@dataclass
class AppState:
    """Mutable server state: `service` is None until the model has loaded."""

    limits: Limits
    metrics: Metrics
    model: ModelInfo
    progress: Progress = field(default_factory=Progress)
    """Where loading stands (`/status`)."""
    api_key: str | None = None
    service: GenerationService | None = None
    draining: bool = False
    compute_type: str = "cpu+optimized"
    """TGI's `x-compute-type` header: set from the device (or env `COMPUTE_TYPE`) once the model is loaded."""

    def ready_service(self) -> GenerationService:
        """The service, or 503 while loading or draining."""
        if self.draining:
            raise DrainingError()
        if self.service is None:
            raise UnhealthyError("Model is not loaded yet")
        return self.service
