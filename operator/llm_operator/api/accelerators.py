"""The accelerator types an LLMEndpoint may ask for, and the GPU nodes that satisfy each. Pure.

`ACCELERATORS` is the one table: the API's `spec.accelerator.type` enum is its keys, and render's node
affinity is its values.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource a GPU replica requests (the NVIDIA device plugin's)."""
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
"""The node label GPU feature discovery sets to the GPU model."""
ACCELERATORS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "nvidia-a100-40gb": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
        "nvidia-a100-80gb": ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
        "nvidia-h100-80gb": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
        "nvidia-h200-141gb": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
        "nvidia-l4": ("NVIDIA-L4",),
        "nvidia-l40s": ("NVIDIA-L40S",),
        "nvidia-a10g": ("NVIDIA-A10G",),
        "nvidia-t4": ("Tesla-T4",),
    }
)
"""Accelerator type -> the `nvidia.com/gpu.product` values that satisfy it."""
