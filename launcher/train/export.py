"""Export the trained model to ``final/``: peft adapters (LoRA, P-Tuning) or a full HF model (freeze, full).

Every rank calls :func:`export_final` because under ZeRO-3 each rank holds only a slice of every
parameter: the slices are gathered (module by module, so no rank ever holds the whole model twice)
and rank 0 writes. Saving the partitioned tensors as they are gives empty adapters - the bug this
module exists to avoid. The export is written into a temporary directory and renamed into place, so
``final/`` is either the previous export or the complete new one.

Layout: LoRA / P-Tuning -> ``final/adapter_config.json`` + ``adapter_model.safetensors`` (load with
``PeftModel.from_pretrained(base, final)``), plus ``final/merged/`` (a plain HF model) when
``merge: true``; Freeze / full -> ``final/config.json`` + ``model.safetensors`` (load with
``AutoModelForCausalLM.from_pretrained(final)``). The tokenizer is saved next to either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.data.templates import ChatFormat
from launcher.spec.schema import MUTATING_LORA_INITS, LoraMethod, MethodSpec

log = logging.getLogger(__name__)

MERGED_DIRNAME = "merged"


# --- ZeRO-3 helpers --------------------------------------------------------------------------------


def unwrap(model: Any) -> nn.Module:
    """A DeepSpeed engine -> its module; a module stays as it is."""
    module = getattr(model, "module", None)
    if module is not None and type(model).__name__ == "DeepSpeedEngine":
        return module  # type: ignore[no-any-return]
    return model  # type: ignore[no-any-return]


def is_zero3_partitioned(model: nn.Module) -> bool:
    """True when ZeRO-3 has partitioned the parameters (they carry DeepSpeed's ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], enabled: bool) -> Iterator[None]:
    """Full parameter values on every rank inside the block (collective: all ranks must enter)."""
    if not enabled or not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def gather_state_dict(model: nn.Module, *, zero3: bool, is_rank0: bool) -> dict[str, torch.Tensor]:
    """The module's full state dict as CPU tensors on rank 0 ({} elsewhere), gathered module by module."""
    by_param: dict[int, torch.Tensor] = {}
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        with gathered(params, zero3):
            if is_rank0:
                for param in params:
                    by_param[id(param)] = param.detach().to("cpu", copy=True)
    if not is_rank0:
        return {}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        tensor = by_param.get(id(value))
        state[key] = tensor if tensor is not None else value.detach().to("cpu", copy=True)
    return state


def _check_not_empty(state: dict[str, torch.Tensor], what: str) -> None:
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(
            f"refusing to export {what}: empty tensors (partitioned?) for {', '.join(empty[:5])}"
        )


@contextlib.contextmanager
def _without_hf_zero3() -> Iterator[None]:
    """Rank 0 alone loads a CPU model for merging: transformers must not start ZeRO-3 init (a collective)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


# --- export ----------------------------------------------------------------------------------------


def export_final(
    model: Any,
    method: MethodSpec,
    tokenizer: Any,
    out_dir: Path,
    *,
    zero_stage: int,
    is_rank0: bool,
    chat: ChatFormat | None = None,
    initial_adapter: Path | None = None,
) -> None:
    """Save the trained model or adapter to ``out_dir`` (every rank calls this; rank 0 writes).

    ``initial_adapter``: where :func:`save_initial_adapter` put a PiSSA/OLoRA adapter before training;
    the export is then the difference to it, a plain LoRA adapter of rank 2r on the original base.

    ``chat``: the run's prompt format. The exported tokenizer then carries it as its chat template and
    ``generation_config.json`` stops at its end-of-turn token, so ``apply_chat_template`` and
    ``generate`` on the export work as in training."""
    module = unwrap(model)
    zero3 = zero_stage == 3 or is_zero3_partitioned(module)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    error: BaseException | None = None
    try:
        if _is_peft(module):
            conversion = initial_adapter if mutates_base(method) else None
            _save_adapter(module, tmp, zero3=zero3, is_rank0=is_rank0, initial_adapter=conversion)
        else:
            state = gather_state_dict(module, zero3=zero3, is_rank0=is_rank0)
            if is_rank0:
                _check_not_empty(state, "the model")
                # state_dict= so save_pretrained never reads the (possibly partitioned) live parameters.
                module.save_pretrained(str(tmp), state_dict=state)  # type: ignore[operator]
        if is_rank0:
            _save_chat_files(module, tokenizer, chat, tmp)
            if isinstance(method, LoraMethod) and method.merge:
                _save_merged(module, tmp, tmp / MERGED_DIRNAME, tokenizer, chat)
            _publish(tmp, out_dir)
    except Exception as exc:  # keep ranks in step: every rank learns that the export failed
        error = exc
    failures = _gather_errors(error)
    if error is not None:
        if is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error
    if failures:
        raise RuntimeError(f"export to {out_dir} failed on another rank: {failures[0]}")
    if is_rank0:
        log.info("exported %s to %s", method.method, out_dir)


def _is_peft(module: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, PeftModel)


def mutates_base(method: MethodSpec) -> bool:
    """PiSSA and OLoRA move the adapter's initial value out of the base weights (W_res = W - B0 A0)."""
    return isinstance(method, LoraMethod) and method.init_lora_weights in MUTATING_LORA_INITS


def save_initial_adapter(model: Any, method: MethodSpec, out_dir: Path, *, is_rank0: bool) -> None:
    """Before training (and before DeepSpeed wraps the model): keep the PiSSA/OLoRA adapter as it was
    initialised, which the export needs (peft's ``path_initial_model_for_weight_conversion``). The
    initialisation is deterministic (SVD or QR of the base weights), so a resumed attempt writes the same
    adapter again."""
    if not (is_rank0 and mutates_base(method)):
        return
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(str(tmp))  # type: ignore[operator]
    _publish(tmp, out_dir)


def _save_adapter(
    module: Any, tmp: Path, *, zero3: bool, is_rank0: bool, initial_adapter: Path | None = None
) -> None:
    trainable = [p for p in module.parameters() if p.requires_grad]
    adapter = module.active_adapter
    config = module.peft_config[adapter]
    if config.is_prompt_learning and zero3:
        # peft saves the prompt encoder's *output*; running that forward on rank 0 alone would trigger
        # ZeRO-3's gather hooks on one rank (a hang). Run it on a CPU copy holding the gathered weights.
        encoder = module.prompt_encoder[adapter]
        names = [n for n, _ in encoder.named_parameters()]
        params = list(encoder.parameters())
        with gathered(params, True):
            values = (
                {n: p.detach().to("cpu", copy=True) for n, p in zip(names, params, strict=True)}
                if is_rank0
                else {}
            )
        if not is_rank0:
            return
        cpu_encoder = type(encoder)(config)
        cpu_encoder.load_state_dict(values, strict=True)
        _check_not_empty(dict(cpu_encoder.state_dict()), "the prompt encoder")
        module.prompt_encoder[adapter] = cpu_encoder
        try:
            module.save_pretrained(str(tmp))
        finally:
            module.prompt_encoder[adapter] = encoder
        return
    with gathered(trainable, zero3):
        if is_rank0 and initial_adapter is not None:
            # peft rewrites the initial adapter's config and loads it as an adapter named after its
            # directory (no dots allowed): a scratch copy keeps the run's own intact.
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".lora-init-") as scratch_root:
                scratch = Path(scratch_root) / "initial"
                shutil.copytree(initial_adapter, scratch)
                module.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=str(scratch))
        elif is_rank0:
            module.save_pretrained(str(tmp))
    if is_rank0:
        from peft.utils import load_peft_weights

        _check_not_empty(load_peft_weights(str(tmp), device="cpu"), "the adapter")


def _save_chat_files(module: Any, tokenizer: Any, chat: ChatFormat | None, out: Path) -> None:
    """The tokenizer with the run's chat template, and the generation config with its stop tokens."""
    import copy

    if chat is None:
        tokenizer.save_pretrained(str(out))
    else:
        saved, tokenizer.chat_template = tokenizer.chat_template, chat.chat_template()
        try:
            tokenizer.save_pretrained(str(out))
        finally:
            tokenizer.chat_template = saved
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    generation = getattr(base, "generation_config", None)
    if generation is None:
        return
    generation = copy.deepcopy(generation)
    eos = generation.eos_token_id
    stops = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    for token in chat.stop_ids if chat is not None else []:
        if token not in stops:
            stops.append(token)
    generation.eos_token_id = stops or None
    generation.use_cache = True  # training turned the cache off; generation wants it
    generation.save_pretrained(str(out))


def _save_merged(
    module: Any, adapter_dir: Path, merged_dir: Path, tokenizer: Any, chat: ChatFormat | None
) -> None:
    """LoRA merged into the base: reload base + saved adapter on CPU (what users do), merge, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_path = module.peft_config[module.active_adapter].base_model_name_or_path
    if not base_path or not Path(base_path).is_dir():
        raise RuntimeError(
            f"cannot merge LoRA: the base model directory {base_path!r} is not on this machine"
        )
    dtype = next(p.dtype for p in module.parameters() if not p.requires_grad)
    remote = type(module.get_base_model()).__module__.startswith("transformers_modules")
    with _without_hf_zero3():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=remote)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(merged_dir))
    _save_chat_files(module, tokenizer, chat, merged_dir)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished temporary directory into place (a directory cannot be replaced in one rename)."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _gather_errors(error: BaseException | None) -> list[str]:
    """Every rank's failure message (doubles as the barrier that ends the export)."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine] if mine else []
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [m for m in everyone if m]
