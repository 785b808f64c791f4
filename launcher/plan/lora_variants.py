"""The LoRA variants and QLoRA combinations that cannot run, refused at plan time in the spec's terms.

- PiSSA and OLoRA initialise the adapter from the SVD / QR of each full weight and write the residual
  back into the base; under ZeRO-3 a rank holds only a shard of each weight, and the export needs the
  whole adapter as initialised.
- DoRA reads each whole base weight too: at the start for the magnitude, and in every forward for the
  weight norm, outside the base layer's own forward where ZeRO-3 gathers it (peft 0.21 fails with "size
  of tensor a (0)").
- A quantized base (QLoRA) holds its weights as bitsandbytes blocks: only LoRA trains on it, ZeRO-3
  cannot partition them, and PiSSA/OLoRA cannot write a residual into them.
- OLoRA on a Conv1D layer (GPT-2, weight stored (in, out)): peft 0.21's QR initialisation ignores
  ``fan_in_fan_out`` and training fails with "mat1 and mat2 shapes cannot be multiplied".
"""

from __future__ import annotations

from launcher.plan.archs import ArchInfo
from launcher.plan.resources import ResourceProblem
from launcher.rundir.run_config import ResolvedResources
from launcher.spec.schema import MUTATING_LORA_INITS as MUTATING_INITS
from launcher.spec.schema import LoraMethod, MethodSpec, ModelSpec


def check_lora_variant(
    method: MethodSpec, resources: ResolvedResources, model: ModelSpec, arch: ArchInfo
) -> None:
    """Raise ResourceProblem (dotted key + fix) for a combination the trainer cannot run."""
    quantized = model.quantization
    if quantized is not None and not isinstance(method, LoraMethod):
        raise ResourceProblem(
            "model.quantization",
            f"a {quantized} base trains only LoRA adapters (QLoRA), not {method.method}; "
            "drop model.quantization or use method: lora",
        )
    if quantized is not None and resources.zero_stage == 3:
        raise ResourceProblem(
            "resources.zero_stage",
            f"a {quantized} base (model.quantization) cannot be partitioned by ZeRO-3: bitsandbytes keeps "
            "each weight as quantized blocks; set zero_stage: 2 (or 0/1)",
        )
    if not isinstance(method, LoraMethod):
        return
    if method.use_dora and resources.zero_stage == 3:
        raise ResourceProblem(
            "resources.zero_stage",
            "use_dora needs each whole base weight in every forward (the weight norm of W + B A), which "
            "ZeRO-3 partitions; set zero_stage: 2 (with offload_optimizer if memory is short)",
        )
    init = method.init_lora_weights
    if init in MUTATING_INITS and resources.zero_stage == 3:
        raise ResourceProblem(
            "resources.zero_stage",
            f"init_lora_weights: {init} needs each whole weight on every rank (its SVD/QR, and the residual "
            "written back into the base), which ZeRO-3 partitions; set zero_stage: 2, or "
            "init_lora_weights: true",
        )
    if init in MUTATING_INITS and quantized is not None:
        raise ResourceProblem(
            "model.quantization",
            f"init_lora_weights: {init} writes a residual into the base weights, which a {quantized} base "
            "cannot hold exactly; use init_lora_weights: true with model.quantization",
        )
    conv1d = [lin.name for lin in arch.lora_linears(method.target_modules) if lin.transposed]
    if init == "olora" and conv1d:
        raise ResourceProblem(
            "init_lora_weights",
            f"init_lora_weights: olora cannot initialise {arch.name}'s Conv1D layers ({', '.join(conv1d)}): "
            "peft's QR initialisation does not handle their transposed (in, out) weight; "
            "use init_lora_weights: pissa or true, or target_modules without them",
        )
