"""Which attention kernel a run loads its model with, and Liger's kernels where asked for.

``training.attn_implementation: auto`` takes the fastest kernel that is exact for the method:
- flash_attention_2 on a CUDA GPU in bf16/fp16 where flash-attn is installed, except for P-Tuning v2,
  whose trained prefix needs a 4-D attention mask (and a block-diagonal one when packed) that flash
  attention does not take;
- else sdpa (PyTorch's fused attention: exact, the same losses as eager within float rounding, tested
  for every method packed and unpacked in tests/test_attention.py);
- a remote-code model (ChatGLM-6B's own modeling file) keeps the attention its code chooses.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Any

from launcher.rundir.run_config import RunConfig

log = logging.getLogger(__name__)


def _is_ptuning_v2(cfg: RunConfig) -> bool:
    return cfg.method.method == "ptuning" and getattr(cfg.method, "version", None) == "v2"


def resolve_attn_implementation(cfg: RunConfig, on_cuda: bool) -> str | None:
    """The ``attn_implementation`` to load with (None: the model's own choice)."""
    setting = cfg.training.attn_implementation
    if setting != "auto":
        return setting
    if cfg.model.trust_remote_code:
        return None
    half = (cfg.model.dtype or cfg.training.precision) in ("bf16", "fp16")
    flash = importlib.util.find_spec("flash_attn") is not None
    if on_cuda and half and flash and not _is_ptuning_v2(cfg):
        return "flash_attention_2"
    return "sdpa"


def attention_kwargs(cfg: RunConfig, on_cuda: bool) -> dict[str, str]:
    """``from_pretrained`` keyword arguments for the chosen kernel (none: the model's own choice)."""
    chosen = resolve_attn_implementation(cfg, on_cuda)
    if chosen is None:
        return {}
    log.info("attention: %s (training.attn_implementation: %s)", chosen, cfg.training.attn_implementation)
    return {"attn_implementation": chosen}


def apply_liger_kernels(model: Any) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU kernels, patched into this model instance. Its fused linear
    cross-entropy stays off: the trainer's own loss computes logits for the target positions only."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}
    wanted["fused_linear_cross_entropy"] = False
    accepted = inspect.signature(_apply_liger_kernel_to_instance).parameters
    kwargs = {k: v for k, v in wanted.items() if k in accepted or "kwargs" in accepted}
    _apply_liger_kernel_to_instance(model=model, **kwargs)
    log.info("Liger kernels applied to %s", type(model).__name__)
