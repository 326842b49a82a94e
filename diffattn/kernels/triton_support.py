"""Where the Triton kernels can run: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the tests' interpreter)."""

from __future__ import annotations

import os

import torch


def triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
