"""`primus preflight`: open the job's process group for core's framework-neutral collective test."""

from __future__ import annotations

import os
from typing import Any


def process_group() -> tuple[Any, Any, Any]:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return torch, dist, device
