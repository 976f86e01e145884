"""What the machine computes natively, so that precision and kernel choices follow the hardware they run on.

bf16 is only a speed-up where the hardware computes it natively: a GPU with bf16 support, or a CPU with AVX-512 BF16
or AMX. On an AVX2-only CPU a bf16 matmul is several times *slower* than fp32 (docs/performance.md), so
``model.dtype=auto`` picks fp32 there. The screened greedy head
(``models/greedy_head.py``) screens in bf16 and its rounding bound was proven on CPUs; it is used only on a CPU with
native bf16 (off on CUDA, where it is not proven, and on CPUs where its screen would be the slow part).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import torch


@functools.cache
def cpu_native_bf16() -> bool:
    """AVX-512 BF16 or AMX on this CPU (oneDNN's own check, else the kernel's CPU flags)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_native_bf16()


def auto_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if native_bf16(device) else torch.float32


def screened_head_default(device: torch.device) -> bool:
    return device.type == "cpu" and cpu_native_bf16()


def machine_capability() -> dict[str, Any]:
    """What a measured figure holds for (every benchmark record carries it)."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_native_bf16(),
            "cuda": cuda, "platform": platform.platform(), "torch": torch.__version__}


def with_machine(row: dict) -> dict:
    return {**row, "machine": machine_capability()}
