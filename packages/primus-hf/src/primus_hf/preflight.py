"""`primus preflight`: this backend's collective test runs on torch's process group."""

from __future__ import annotations

from typing import Any


def process_group() -> tuple[Any, Any, Any]:
    import torch.distributed  # noqa: F401 - loads torch.distributed for core's helper

    from primus.preflight.worker import torch_process_group

    return torch_process_group(torch)
