"""Per-rank memory of a fine-tuning run under DeepSpeed ZeRO, from parameter counts alone.

Model states (what ZeRO partitions), per rank, with N ranks, d bytes per weight (2 for bf16/fp16, 4 for
fp32) and only *trainable* parameters carrying gradients and optimizer state:

| stage | parameters (working copy) | gradients            | optimizer (fp32 master + Adam m, v) |
|-------|---------------------------|----------------------|-------------------------------------|
| 0     | all, d bytes              | trainable, d         | trainable, 12 bytes                 |
| 1     | all, d                    | trainable, d         | trainable / N, 12                   |
| 2     | all, d                    | trainable / N, d     | trainable / N, 12                   |
| 3     | all / N, d                | trainable / N, d     | trainable / N, 12                   |

DeepSpeed keeps a separate fp32 master partition even when training in fp32 (it clones), so the
optimizer holds 12 bytes per trainable parameter (master + Adam's two moments) in every precision.
ZeRO-2 also keeps whole gradients of parameters straddling a partition boundary. ``offload_optimizer``
moves the master copy, Adam states and the gradient partition to host memory (ZeRO-2: in fp32, plus two
staging buffers of the largest trainable tensor, one on the GPU, one pinned on the host);
``offload_param`` (ZeRO-3 only) moves the parameter partitions to the host, leaving only the gathered
working set on the GPU.

On top of the model states the GPU holds activations (per layer and token, from the real layer shapes;
only the layer inputs with gradient checkpointing, and nothing for frozen layers below the first
trainable one), the logits with their fp32 copies for the loss, the ZeRO communication buckets and a
fixed allowance for the CUDA context and allocator fragmentation. docs/memory_model.md shows the
check against real DeepSpeed engines and against published numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from launcher.archs import ArchInfo
from launcher.spec import FreezeMethod, FullMethod, LoraMethod, MethodSpec, Precision, PtuningMethod

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
"""CUDA context, cuBLAS workspaces and allocator fragmentation: roughly constant per GPU process."""
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 master copy of the trainable partition


def dtype_bytes(precision: Precision) -> int:
    return 4 if precision == "fp32" else 2


class LayoutError(ValueError):
    """A method setting that does not fit the architecture (a pattern matching nothing, too many layers)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class ParamLayout:
    """Tensor sizes (numel) of the model the method trains, split into trainable and frozen."""

    trainable: list[int] = field(default_factory=list)
    frozen: list[int] = field(default_factory=list)
    trained_layers: int = 0
    """Transformer layers whose activations are kept for backward (from the first trainable layer on)."""
    weight_layers: int = 0
    """Layers whose own linear weights train: they also keep each linear's input for the weight gradient."""
    lora_extra_per_token: int = 0
    """Extra activation elements per token and layer that LoRA keeps (dropout output and mask, r-wide
    intermediate)."""
    prefix_tokens: int = 0
    """P-Tuning v2 prefix length added to every layer's keys and values."""
    input_tokens: int = 0
    """P-Tuning v1 virtual tokens prepended to the input."""

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable)

    @property
    def total_params(self) -> int:
        return sum(self.trainable) + sum(self.frozen)


def param_layout(arch: ArchInfo, method: MethodSpec) -> ParamLayout:
    """Which tensors train under ``method`` (mirrors what launcher.train.adapters does with peft)."""
    base = list(arch.param_names())
    layout = ParamLayout()
    if isinstance(method, FullMethod):
        layout.trainable = [n for _, n in base]
        layout.trained_layers = layout.weight_layers = arch.num_layers
        return layout
    if isinstance(method, FreezeMethod):
        if method.trainable_patterns:
            regexes = [re.compile(p) for p in method.trainable_patterns]
            for i, rx in enumerate(regexes):
                if not any(rx.search(name) for name, _ in base):
                    raise LayoutError(
                        f"trainable_patterns[{i}]",
                        f"pattern {rx.pattern!r} matches no parameter of {arch.name} "
                        f"(names look like {arch.layer_prefix}.0.{arch.layer_params[0][0]})",
                    )
            trainable = {name for name, _ in base if any(rx.search(name) for rx in regexes)}
        else:
            n_layers = method.trainable_layers or 0
            if n_layers > arch.num_layers:
                raise LayoutError(
                    "trainable_layers", f"{n_layers} layers requested but {arch.name} has {arch.num_layers}"
                )
            first = arch.num_layers - n_layers
            prefixes = tuple(f"{arch.layer_prefix}.{i}." for i in range(first, arch.num_layers))
            trainable = {name for name, _ in base if name.startswith(prefixes)}
        layout.trainable = [n for name, n in base if name in trainable]
        layout.frozen = [n for name, n in base if name not in trainable]
        trained_ids = [
            int(m.group(1))
            for name in trainable
            if (m := re.match(rf"{re.escape(arch.layer_prefix)}\.(\d+)\.", name)) is not None
        ]
        # Activations are kept from the first layer that has a trainable weight (or everything when the
        # embeddings train).
        embed_trains = any(
            not name.startswith(f"{arch.layer_prefix}.") and name in trainable for name, _ in base
        )
        first_trained = 0 if embed_trains else min(trained_ids, default=arch.num_layers)
        layout.trained_layers = arch.num_layers - first_trained
        layout.weight_layers = len(set(trained_ids))
        return layout
    layout.frozen = [n for _, n in base]
    layout.trained_layers = arch.num_layers
    if isinstance(method, LoraMethod):
        targets: list[str] | str = method.target_modules
        per_layer = arch.lora_linears(targets)
        if not per_layer:
            names = sorted({lin.name.rsplit(".", 1)[-1] for lin in arch.layer_linears})
            raise LayoutError(
                "target_modules", f"no linear layer of {arch.name} matches {targets}; its layers have {names}"
            )
        for _ in range(arch.num_layers):
            for lin in per_layer:
                layout.trainable += [method.r * lin.in_features, lin.out_features * method.r]
        # Each target keeps its dropout output (plus a 1-byte mask, a quarter element) and the r-wide
        # intermediate; with dropout 0 peft passes the input itself, which the layer keeps anyway.
        dropout_factor = 1.25 if method.lora_dropout > 0 else 0.0
        layout.lora_extra_per_token = round(
            sum(lin.in_features * dropout_factor + method.r for lin in per_layer)
        )
        return layout
    assert isinstance(method, PtuningMethod)
    nv = method.pre_seq_len
    if method.version == "v2":  # peft PrefixEncoder: per layer keys and values of the KV width
        token_dim = arch.kv_dim
        out = arch.num_layers * 2 * token_dim
        if method.prefix_projection:
            enc = method.encoder_hidden_size or token_dim
            layout.trainable = [nv * token_dim, token_dim * enc, enc, enc * out, out]
        else:
            layout.trainable = [nv * out]
        layout.prefix_tokens = nv
    else:  # peft PromptEncoder (MLP): virtual token embeddings reparameterised by a 3-layer MLP
        h = arch.hidden_size
        enc = method.encoder_hidden_size or h
        layout.trainable = [nv * h, h * enc, enc, enc * enc, enc, enc * h, h]
        layout.input_tokens = nv
    return layout


@dataclass
class MemoryEstimate:
    """Bytes per rank. ``*_device`` live on the GPU, ``*_host`` in CPU memory (offload)."""

    params_device: int
    params_host: int
    grads_device: int
    grads_host: int
    optim_device: int
    optim_host: int
    activations: int
    logits: int
    buffers: int
    overhead: int
    trainable_params: int
    total_params: int

    @property
    def params(self) -> int:
        return self.params_device + self.params_host

    @property
    def grads(self) -> int:
        return self.grads_device + self.grads_host

    @property
    def optim(self) -> int:
        return self.optim_device + self.optim_host

    @property
    def model_states_device(self) -> int:
        return self.params_device + self.grads_device + self.optim_device

    @property
    def device_bytes(self) -> int:
        return self.model_states_device + self.activations + self.logits + self.buffers + self.overhead

    @property
    def host_bytes(self) -> int:
        return self.params_host + self.grads_host + self.optim_host

    @property
    def device_gib(self) -> float:
        return self.device_bytes / GIB

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["device_gib"] = round(self.device_gib, 3)
        out["host_gib"] = round(self.host_bytes / GIB, 3)
        return out


def _partitioned(sizes: list[int], world_size: int) -> int:
    """DeepSpeed ZeRO-3 pads every tensor to a multiple of the world size before splitting it."""
    return sum(math.ceil(n / world_size) for n in sizes)


NCCL_ALIGNMENT = 2
"""DeepSpeed ZeRO-1/2 pads the flat gradient buffer to a multiple of 2 x world size elements."""


def zero2_grad_elems(sizes: list[int], world_size: int, rank: int | None = None) -> int:
    """Gradient elements ZeRO-2 keeps on ``rank`` (None: the largest over ranks).

    The rank's partition of the flat buffer, plus the outside part of a parameter that straddles a
    partition boundary: DeepSpeed keeps such a parameter's gradient whole on both ranks that share it.
    """
    total = sum(sizes)
    align = NCCL_ALIGNMENT * world_size
    partition = math.ceil(total / align) * align // world_size
    ranks = range(world_size) if rank is None else [rank]
    best = 0
    for r in ranks:
        start, end = r * partition, (r + 1) * partition
        extra, offset = 0, 0
        for n in sizes:
            a, b = offset, offset + n
            offset = b
            if a < start < b:
                extra += start - a
            if a < end < b:
                extra += b - end
        best = max(best, partition + extra)
    return best


def model_state_bytes(
    layout: ParamLayout,
    *,
    world_size: int,
    zero_stage: int,
    offload_optimizer: bool,
    offload_param: bool,
    precision: Precision,
    rank: int | None = None,
) -> dict[str, int]:
    """Parameters, gradients and optimizer states on one rank (device and host), in bytes.

    ``rank`` None gives the largest rank (ranks differ slightly where parameters straddle partitions).
    """
    d = dtype_bytes(precision)
    n = world_size
    trainable, total = layout.trainable_params, layout.total_params
    largest = max(layout.trainable, default=0)
    if zero_stage == 3:
        params = _partitioned(layout.trainable, n) * d + _partitioned(layout.frozen, n) * d
        shard = _partitioned(layout.trainable, n)
        grads_elems = shard
    else:
        params = total * d
        shard = math.ceil(trainable / n)
        grads_elems = zero2_grad_elems(layout.trainable, n, rank) if zero_stage == 2 else trainable
    optim_elems = shard if zero_stage >= 1 else trainable
    # A separate fp32 master partition exists in every precision (DeepSpeed clones it even in fp32).
    optim = optim_elems * (MASTER_BYTES + ADAM_STATE_BYTES)
    out = {"params_device": params, "params_host": 0, "grads_device": grads_elems * d, "grads_host": 0}
    out |= {"optim_device": optim, "optim_host": 0}
    if offload_optimizer:
        # The optimizer steps on the CPU, so the reduced gradient partition lands there too: in fp32 for
        # ZeRO-1/2, which also stage each gradient through one buffer of the largest tensor on each side;
        # ZeRO-3 keeps its flat gradient buffer in the training dtype, on the host.
        if zero_stage < 3:
            staging = largest * d
            out |= {"grads_device": staging, "grads_host": shard * 4 + staging}
        else:
            out |= {"grads_device": 0, "grads_host": shard * d}
        out |= {"optim_device": 0, "optim_host": optim}
    if offload_param:
        out |= {"params_device": 0, "params_host": params}
    return out


def activation_bytes(
    arch: ArchInfo,
    layout: ParamLayout,
    *,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    precision: Precision,
) -> int:
    """Activations kept for backward on one rank (memory-efficient attention: no s x s scores stored)."""
    d = dtype_bytes(precision)
    tokens = micro_batch * (seq_len + layout.input_tokens)
    per_layer_frozen, per_layer_trained = per_token_layer_elems(arch, layout)
    prefix_kv = micro_batch * layout.prefix_tokens * 2 * arch.kv_dim * arch.num_layers * d
    layers, weight_layers = layout.trained_layers, min(layout.weight_layers, layout.trained_layers)
    if layers == 0:
        return 0
    if gradient_checkpointing:
        # Each layer's input only, plus one layer recomputed in full during backward.
        recompute = per_layer_trained if weight_layers else per_layer_frozen
        return tokens * d * (arch.hidden_size * layers + recompute) + prefix_kv
    elems = weight_layers * per_layer_trained + (layers - weight_layers) * per_layer_frozen
    return tokens * d * elems + prefix_kv


def per_token_layer_elems(arch: ArchInfo, layout: ParamLayout) -> tuple[int, int]:
    """Elements one token keeps per transformer layer: (frozen weights, trained weights).

    Always kept: the norms' inputs (RMSNorm also keeps its normalised value), q and k before and after
    rotary embedding plus the rotated halves, v, and the MLP's up/gate outputs and activation output.
    A layer whose weights train also keeps every linear layer's input (attention input, attention
    output, MLP input, down-projection input); a frozen linear needs only its weight for backward.
    """
    h = arch.hidden_size
    q_dim = arch.num_attention_heads * arch.head_dim
    ffn = arch.intermediate_size
    layer_norm = any(name.endswith("norm.bias") for name, _ in arch.layer_params)
    norms = 2 * (h if layer_norm else 2 * h)
    mlp_up = sum(
        lin.out_features for lin in arch.layer_linears if lin.in_features == h and lin.out_features >= ffn
    )
    gated = mlp_up >= 2 * ffn
    core = 3 * q_dim + 4 * arch.kv_dim + mlp_up + (ffn if gated else 0)
    linear_inputs = h + q_dim + h + ffn
    frozen = norms + core + layout.lora_extra_per_token
    return frozen, norms + core + linear_inputs


def logits_bytes(arch: ArchInfo, *, micro_batch: int, positions: int, precision: Precision) -> int:
    """The logits in the compute dtype, their fp32 copy for the loss and the fp32 gradient of it, for
    ``positions`` positions per example (every one for a model's own loss; the target ones for ours)."""
    return micro_batch * positions * arch.vocab_size * (dtype_bytes(precision) + 4 + 4)


def buffer_bytes(arch: ArchInfo, *, zero_stage: int, world_size: int, precision: Precision) -> int:
    """ZeRO communication buckets and ZeRO-3's gathered working set (rendered from the same sizes)."""
    d = dtype_bytes(precision)
    bucket = bucket_size(arch)
    if zero_stage == 3:
        # Reduce bucket + prefetch bucket + two gathered layers (current and prefetched).
        return (2 * bucket + 2 * arch.params_per_layer) * d
    if zero_stage == 2 and world_size > 1:
        return 3 * bucket * d  # two overlapping reduce buckets + the allgather bucket
    return bucket * d


def bucket_size(arch: ArchInfo) -> int:
    """The bucket size launcher.dsconfig renders into ds_config.json (hidden_size^2, at least 4M)."""
    from launcher.dsconfig import bucket_elements

    return bucket_elements(arch.hidden_size)


def estimate(
    arch: ArchInfo,
    method: MethodSpec,
    *,
    world_size: int,
    zero_stage: int,
    offload_optimizer: bool,
    offload_param: bool,
    gradient_checkpointing: bool,
    precision: Precision,
    micro_batch: int,
    seq_len: int,
    loss_positions: int | None = None,
    layout: ParamLayout | None = None,
) -> MemoryEstimate:
    """``loss_positions``: positions per example that get logits (launcher.train.target_loss computes
    them for the target tokens only); None: all ``seq_len``, as a model's own loss does."""
    layout = layout or param_layout(arch, method)
    states = model_state_bytes(
        layout,
        world_size=world_size,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        precision=precision,
    )
    return MemoryEstimate(
        **states,
        activations=activation_bytes(
            arch,
            layout,
            micro_batch=micro_batch,
            seq_len=seq_len,
            gradient_checkpointing=gradient_checkpointing,
            precision=precision,
        ),
        logits=logits_bytes(
            arch,
            micro_batch=micro_batch,
            positions=min(seq_len, loss_positions or seq_len),
            precision=precision,
        ),
        buffers=buffer_bytes(arch, zero_stage=zero_stage, world_size=world_size, precision=precision),
        overhead=CUDA_CONTEXT_BYTES,
        trainable_params=layout.trainable_params,
        total_params=layout.total_params,
    )
