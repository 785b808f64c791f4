"""Peak memory of this rank: what the GPU allocator really handed out, or the process's peak RSS on CPU."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

from launcher.train.distributed import all_reduce_max

GIB = 1024**3
MemKind = Literal["cuda_allocated", "cpu_rss"]


@dataclass(frozen=True)
class PeakMemory:
    peak_mem_gib: float
    peak_mem_reserved_gib: float | None
    kind: MemKind


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_gib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return maxrss * scale / GIB


def peak_memory() -> PeakMemory:
    if torch.cuda.is_available():
        return PeakMemory(
            peak_mem_gib=torch.cuda.max_memory_allocated() / GIB,
            peak_mem_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
            kind="cuda_allocated",
        )
    return PeakMemory(peak_mem_gib=peak_rss_gib(), peak_mem_reserved_gib=None, kind="cpu_rss")


def peak_memory_all_ranks(device: torch.device) -> PeakMemory:
    """The max over ranks (every rank must call this: it is a collective)."""
    mine = peak_memory()
    reserved = mine.peak_mem_reserved_gib if mine.peak_mem_reserved_gib is not None else -1.0
    peak, peak_reserved = all_reduce_max([mine.peak_mem_gib, reserved], device)
    return PeakMemory(
        peak_mem_gib=peak,
        peak_mem_reserved_gib=peak_reserved if peak_reserved >= 0 else None,
        kind=mine.kind,
    )


def combine_peaks(current: PeakMemory, earlier: dict[str, Any] | None) -> PeakMemory:
    """The run's peak over all its attempts. A resumed process starts with a fresh allocator (and RSS),
    so the peak of the attempts before it travels in the checkpoint (``TrainState.peak_memory``)."""
    if not earlier or earlier.get("kind") != current.kind:
        return current  # nothing earlier, or measured on another kind of device: not comparable
    candidates = (current.peak_mem_reserved_gib, earlier.get("peak_mem_reserved_gib"))
    reserved = [float(v) for v in candidates if v is not None]
    return PeakMemory(
        peak_mem_gib=max(current.peak_mem_gib, float(earlier["peak_mem_gib"])),
        peak_mem_reserved_gib=max(reserved) if reserved else None,
        kind=current.kind,
    )
