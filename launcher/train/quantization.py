"""QLoRA: load the frozen base quantized through bitsandbytes (``model.quantization: 4bit | 8bit``).

4-bit is NF4 with double quantization and computes in the training dtype (the QLoRA paper's recipe,
also LLaMA-Factory's and axolotl's defaults); 8-bit is LLM.int8(). Only LoRA trains on such a base and
only without ZeRO-3 (the plan refuses the rest: launcher.plan.lora_variants). bitsandbytes runs both
on CPU as well as on CUDA, so the same path is tested here without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from launcher.errors import UserError
from launcher.spec.schema import ModelSpec


def quantized_loading(model: ModelSpec, compute_dtype: torch.dtype) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for a quantized base; empty for a plain one."""
    if model.quantization is None:
        return {}
    try:
        import bitsandbytes  # noqa: F401  # transformers imports it lazily and fails late without it
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise UserError(
            f"model.quantization: {model.quantization} needs bitsandbytes ({exc}); "
            "pip install 'launcher[qlora]'"
        ) from exc
    if model.quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # bitsandbytes quantizes while loading onto the rank's own device.
    device: Any = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def keep_training_layout(model: torch.nn.Module) -> int:
    """bitsandbytes (0.50) repacks a 4-bit weight for CPU inference the first time it runs in eval mode
    without grad, one way: the next training forward then fails ("a view of a leaf Variable ... in-place
    operation"). The trainer runs eval forwards between training steps, so keep the training layout;
    returns how many layers it set."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        setattr(layer, "support_avx512bf16_for_cpu", False)  # noqa: B010  # a plain attribute of the layer
    return len(layers)
