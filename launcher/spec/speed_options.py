"""Checks of the GPU speed options (``training.attn_implementation``, ``training.liger_kernel``) at
validate time, in the user's terms: an option this environment cannot run is refused before anything
is submitted, with the reason and the fix."""

from __future__ import annotations

import importlib.util
from typing import Any

from launcher.spec.yaml_source import Problems

FLASH_ATTN_PACKAGE = "flash_attn"
LIGER_PACKAGE = "liger_kernel"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def check_speed_options(spec: Any, problems: Problems) -> None:
    """``spec`` is a JobSpec; runs on a CPU-only machine (the local backend without CUDA) are refused
    GPU-only kernels; a login node submitting to Slurm needs only the packages."""
    training = spec.training
    local_cpu = (spec.backend in (None, "local")) and not _cuda_visible()
    where = ("training", "attn_implementation")
    if training.attn_implementation == "flash_attention_2":
        if not installed(FLASH_ATTN_PACKAGE):
            problems.error(
                where,
                "flash_attention_2 needs the flash-attn package (CUDA GPUs only), which is not installed "
                "in this environment; use sdpa (or auto), or `pip install flash-attn` on the GPU machines",
            )
        elif local_cpu:
            problems.error(where, "flash_attention_2 runs on CUDA GPUs only and none is visible; use sdpa")
        if training.precision == "fp32":
            problems.error(where, "flash_attention_2 takes bf16 or fp16 only; set training.precision: bf16")
        for i, method in enumerate(spec.methods):
            if getattr(method, "method", None) == "ptuning" and getattr(method, "version", None) == "v2":
                problems.error(
                    ("methods", i),
                    "P-Tuning v2's prefix needs an attention mask that flash_attention_2 does not take; "
                    "use training.attn_implementation: sdpa (or auto) for this method",
                )
    if training.liger_kernel:
        if not installed(LIGER_PACKAGE):
            problems.error(
                ("training", "liger_kernel"),
                "Liger kernels are Triton kernels for CUDA GPUs and the liger-kernel package is not "
                "installed here; install it on the GPU machines (`pip install liger-kernel`) or set "
                "liger_kernel: false",
            )
        elif local_cpu:
            problems.error(
                ("training", "liger_kernel"),
                "Liger kernels are Triton kernels for CUDA GPUs and this local run has none; "
                "set liger_kernel: false",
            )
