"""GPU energy, where NVML reports it (NVIDIA Volta and later); None elsewhere."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class EnergyMeter:
    """Joules used by the job's GPU since construction (NVML's total-energy counter)."""

    def __init__(self, device: torch.device) -> None:
        self._nvml: Any = None
        self._handle: Any = None
        self._start: int | None = None
        if device.type != "cuda":
            return
        try:
            import pynvml  # optional: nvidia-ml-py

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._start = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            self._nvml = pynvml
        except Exception as exc:  # no NVML, or a GPU without the counter
            log.info("GPU energy not available: %s", type(exc).__name__)
            self._start = None

    def joules(self) -> float | None:
        if self._nvml is None or self._start is None:
            return None
        try:
            now = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None
        return (now - self._start) / 1000.0  # the counter is in millijoules
