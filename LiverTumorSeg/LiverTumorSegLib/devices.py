"""Device and precision selection."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import torch

from .errors import LiverTumorSegError


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when PyTorch sees a GPU, else CPU; 'cuda' or 'cuda:N' without that GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head, _, index = device.partition(":")
    if not (device in ("cpu", "cuda") or (head == "cuda" and index.isdigit())):
        raise LiverTumorSegError(f"Unknown device '{device}': use auto, cpu, cuda or cuda:N.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LiverTumorSegError(f"--device {device} was asked for, but PyTorch sees no CUDA GPU (CPU-only build or no driver). Use --device cpu or auto.")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise LiverTumorSegError(f"--device {device}: PyTorch sees {torch.cuda.device_count()} GPU(s), numbered from 0.")
    return torch.device(device)


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return False
    flags = info.read_text(errors="ignore")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def is_out_of_memory(err: BaseException) -> bool:
    """An out-of-memory error: Python's (numpy), or a GPU or CPU allocator's (torch raises RuntimeErrors)."""
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or any(
        words in text for words in ("out of memory", "can't allocate memory", "not enough memory"))  # last: CPU allocator


def cuda_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (compute capability 8, Ampere, or later).

    Not ``torch.cuda.is_bf16_supported()``: it also says yes where bf16 is only emulated (Volta,
    Turing: slower than fp32), and it asks the current GPU, not ``device``.
    """
    return torch.cuda.get_device_capability(device)[0] >= 8


def amp_dtype(device: torch.device, fast: bool) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPUs that compute it natively, else fp16; bf16 on CPU only in fast mode and where native."""
    if device.type == "cuda":
        return torch.bfloat16 if cuda_bf16(device) else torch.float16
    if fast and cpu_has_bf16():
        return torch.bfloat16
    return None


def peak_ram_mb() -> float | None:
    """Peak resident memory of this process so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
