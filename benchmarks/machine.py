"""What every benchmark prints about the machine it ran on (imported by the scripts beside it)."""
from __future__ import annotations

import os
import platform


def cpu() -> str:
    """CPU model and core count, e.g. 'AMD EPYC 9R14, 2 cores'."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def torch_device() -> str:
    """GPU (or 'no GPU'), torch version and its thread count."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; torch {torch.__version__} ({torch.get_num_threads()} threads)"
