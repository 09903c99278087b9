"""Device choice and the determinism switches that make training reproducible."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present, else the CPU."""
    has_cuda = bool(torch.cuda.is_available())
    if name == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if name == "cuda" and not has_cuda:
        raise RuntimeError("PALIMPSEST_DEVICE=cuda but no CUDA device is available")
    return torch.device(name)


def enable_determinism() -> None:
    """Deterministic kernels everywhere; bit-exactness is guaranteed on CPU for a fixed
    thread count and dtype (recorded in every manifest), and best effort on CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():  # type: ignore[no-untyped-call]
        torch.backends.cudnn.benchmark = False


def set_up(name: str = "auto", threads: int = 0) -> torch.device:
    """A worker's device for a job: deterministic kernels, a fixed thread count (part of
    what bit-exactness depends on; 0 keeps torch's default) and the resolved device."""
    if threads:
        torch.set_num_threads(threads)
    enable_determinism()
    return resolve_device(name)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (model seed, model key, shard, slice, epoch...)."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & ((1 << 63) - 1)


def mix64(values: np.ndarray, salt: int) -> np.ndarray:
    """A pseudo-random uint64 per value (splitmix64's finaliser of value + salt: every bit
    of the input moves every bit of the output), for fixed choices made by hash."""
    with np.errstate(over="ignore"):
        z = np.asarray(values).astype(np.uint64) + np.uint64(salt % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return np.asarray(z ^ (z >> np.uint64(31)), dtype=np.uint64)


def runtime_fingerprint(device: torch.device) -> dict[str, object]:
    """What bit-exactness depends on; stored in every training manifest."""
    return {
        "device": str(device),
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
