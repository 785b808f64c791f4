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

from launcher.plan.archs import ArchInfo, Linear
from launcher.plan.dsconfig import bucket_elements
from launcher.spec.schema import FreezeMethod, FullMethod, LoraMethod, MethodSpec, Precision, PtuningMethod

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
"""The CUDA context, NCCL's and cuBLAS's state: GPU memory of every GPU process that is not a tensor,
so ``nvidia-smi`` shows it and ``max_memory_reserved`` does not."""
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
    lora_targets: tuple[Linear, ...] = ()
    """The linear layers LoRA wraps in every transformer layer."""
    lora_r: int = 0
    lora_dropout: float = 0.0
    dora: bool = False
    """DoRA: a trained magnitude per output feature, and per token each target's base and LoRA outputs
    kept for the magnitude's gradient."""
    top_trains: bool = False
    """A weight near the output trains (the last layer, the head, LoRA everywhere): its gradients arrive at
    the start of backward, so ZeRO-2's reduce buckets exist during the activation peak."""
    quantized_elems: int = 0
    """QLoRA: frozen elements held quantized (the layers' linear weights), at ``quantized_bits`` each."""
    quantized_bits: float = 0.0
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


QUANTIZED_BITS = {"4bit": 4 + 8 / 64 + 32 / (64 * 256), "8bit": 8.0}
"""Bits per quantized weight: NF4 with double quantization (an 8-bit absmax per block of 64, an fp32
scale per 256 of those), LLM.int8() (its per-row fp32 scale is negligible)."""


def quantize_layout(layout: ParamLayout, arch: ArchInfo, quantization: str | None) -> ParamLayout:
    """QLoRA: bitsandbytes quantizes every linear weight of the transformer layers (transformers leaves the
    LM head, embeddings, norms and biases in the load dtype)."""
    if quantization is None:
        return layout
    layout.quantized_elems = arch.num_layers * sum(
        lin.in_features * lin.out_features for lin in arch.layer_linears
    )
    layout.quantized_bits = QUANTIZED_BITS[quantization]
    return layout


def param_layout(arch: ArchInfo, method: MethodSpec) -> ParamLayout:
    """Which tensors train under ``method`` (mirrors what launcher.train.adapters does with peft)."""
    base = list(arch.param_names())
    layout = ParamLayout()
    if isinstance(method, FullMethod):
        layout.trainable = [n for _, n in base]
        layout.trained_layers = layout.weight_layers = arch.num_layers
        layout.top_trains = True
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
        head_trains = any(
            name.startswith(f"{arch.output_module}.") for name in trainable if arch.output_module
        )
        layout.top_trains = arch.num_layers - 1 in trained_ids or head_trains
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
                if method.use_dora:  # the magnitude vector
                    layout.trainable.append(lin.out_features)
        layout.lora_targets = tuple(per_layer)
        layout.lora_r, layout.lora_dropout = method.r, method.lora_dropout
        layout.dora = method.use_dora
        layout.top_trains = True
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
    """Bytes per rank. ``*_device`` live on the GPU, ``*_host`` in CPU memory (offload).

    The peak allocation is the model states plus the larger of two phases: forward/backward (ZeRO buffers,
    the activations kept for backward, plus the larger of the loss's logits and the first layer's
    backward temporaries) and the optimizer step (its buffers and temporaries). The trainer's own check
    of the target-only loss (one forward of the model's own loss, no grad) is a third candidate.
    """

    params_device: int
    params_host: int
    grads_device: int
    grads_host: int
    optim_device: int
    optim_host: int
    activations: int
    """Saved for backward at the end of the forward pass."""
    logits: int
    """The loss's logits and their fp32 copies and gradient, at the turn from forward to backward."""
    backward_temp: int
    """Gradients in flight in the top layer's backward, net of what that layer already freed."""
    buffers: int
    """ZeRO buffers live during forward/backward: reduce buckets, ZeRO-3's gathered parameters."""
    step_temp: int
    """Temporaries of the optimizer step (the fp32 copy of the gradient partition) plus its buffers."""
    check_temp: int
    """The target-only loss check before training: the model's own loss over every position, no grad."""
    load_temp: int
    """ZeRO-3 with a model built outside ``zero.Init``: DeepSpeed moves the whole model to each GPU before
    it partitions it (launcher's trainer builds it partitioned: 0)."""
    overhead: int
    """CUDA context, NCCL and cuBLAS state: GPU memory that is not a tensor (0 for a CPU estimate)."""
    trainable_params: int
    total_params: int
    reserved_factor: float = 1.0
    """How much more the caching allocator reserves than it allocates at the peak."""

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
    def train_phase(self) -> int:
        return self.buffers + self.activations + max(self.logits, self.backward_temp)

    @property
    def allocated_bytes(self) -> int:
        """The peak of live tensors (``torch.cuda.max_memory_allocated``)."""
        phases = (self.train_phase, self.step_temp, self.check_temp, self.load_temp)
        return self.model_states_device + max(phases)

    @property
    def reserved_bytes(self) -> int:
        """The caching allocator's pool at the peak (``torch.cuda.max_memory_reserved``)."""
        return math.ceil(self.allocated_bytes * self.reserved_factor)

    @property
    def device_bytes(self) -> int:
        """What the GPU must hold, as ``nvidia-smi`` shows it: the reserved pool plus the CUDA context."""
        return self.reserved_bytes + self.overhead

    @property
    def host_bytes(self) -> int:
        return self.params_host + self.grads_host + self.optim_host

    @property
    def allocated_gib(self) -> float:
        return self.allocated_bytes / GIB

    @property
    def device_gib(self) -> float:
        return self.device_bytes / GIB

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["allocated_gib"] = round(self.allocated_gib, 3)
        out["reserved_gib"] = round(self.reserved_bytes / GIB, 3)
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
        quantized = layout.quantized_elems  # QLoRA (never ZeRO-3): those frozen weights at a few bits
        params = (total - quantized) * d + math.ceil(quantized * layout.quantized_bits / 8)
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


RESERVED_FACTOR = 1.10
"""PyTorch's caching allocator reserves more than the peak it hands out: block rounding (2 MiB segments
for large tensors) and free blocks it keeps for reuse. An assumption until measured on a GPU
(``bench/gpu_check.sh`` reports max_memory_reserved / max_memory_allocated)."""
DS_DEFAULT_BUCKET = 500_000_000
DS_DEFAULT_PREFETCH = 50_000_000
DS_DEFAULT_REUSE_DISTANCE = 1_000_000_000
LOGSUMEXP_BYTES = 4  # SDPA's memory-efficient/flash kernels save one fp32 log-sum-exp per query and head


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO settings that size its GPU buffers."""

    reduce_bucket: int
    prefetch_bucket: int
    max_reuse_distance: int = DS_DEFAULT_REUSE_DISTANCE
    overlap_comm: bool = True

    @classmethod
    def rendered(cls, arch: ArchInfo) -> ZeroSettings:
        """What launcher.plan.dsconfig writes into ds_config.json for this architecture."""
        bucket = bucket_size(arch)
        return cls(reduce_bucket=bucket, prefetch_bucket=int(0.9 * bucket))

    @classmethod
    def deepspeed_defaults(cls, zero_stage: int) -> ZeroSettings:
        """DeepSpeed's own defaults (a ds_config.json that sets no bucket sizes)."""
        return cls(DS_DEFAULT_BUCKET, DS_DEFAULT_PREFETCH, overlap_comm=zero_stage == 3)


OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "dense", "dense_4h_to_h", "c_proj", "out_proj")


def _is_output_projection(lin: Linear) -> bool:
    """The linear that closes a block (attention output, MLP down projection): its input is its own."""
    return lin.name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS


def lora_extra_per_token(layout: ParamLayout, d: int, on_cpu: bool, inputs_kept: bool = False) -> float:
    """Elements per token and layer that LoRA adds: each target's r-wide intermediate; with dropout, the
    dropout output plus its mask (CUDA's fused kernel keeps a 1-byte mask; CPU's keeps a float noise
    tensor and the input); without dropout (or on CPU) lora_A keeps the target's input, shared by the
    targets that read the same tensor (q, k, v read one norm output), unless ``inputs_kept`` (ZeRO-3's
    linear keeps them anyway)."""
    targets = layout.lora_targets
    if not targets:
        return 0.0
    extra = float(len(targets) * layout.lora_r)
    dropout = layout.lora_dropout > 0
    if dropout:
        extra += sum(lin.in_features for lin in targets) * (1.0 if on_cpu else 1.0 + 1.0 / d)
    if (not dropout or on_cpu) and not inputs_kept:
        shared = {lin.in_features for lin in targets if not _is_output_projection(lin)}
        extra += sum(shared) + sum(lin.in_features for lin in targets if _is_output_projection(lin))
    if layout.dora:  # (m / ||W + BA|| - 1) * base_out + m / ||..|| * lora_out: both outputs kept
        extra += 2 * sum(lin.out_features for lin in targets)
    return extra


def dora_norm_temp_bytes(layout: ParamLayout, precision: Precision) -> int:
    """DoRA's weight norm, computed in every forward of every target: peft builds B A through an
    identity matrix (in x in), then W + s B A (out x in, twice). Freed after each target; the largest
    target's is the transient at the forward's end."""
    if not layout.dora or not layout.lora_targets:
        return 0
    d = dtype_bytes(precision)
    return max(lin.in_features * (lin.in_features + 3 * lin.out_features) for lin in layout.lora_targets) * d


def per_token_layer_elems(
    arch: ArchInfo, layout: ParamLayout, d: int, on_cpu: bool = False, zero3: bool = False
) -> tuple[float, float]:
    """Elements one token keeps per transformer layer for backward: (frozen weights, trained weights).

    Always: both norms' inputs, the rotated q and k, v, the attention output and its log-sum-exp (SDPA),
    the MLP's up/gate output and, for a gated MLP, the activation output. A layer whose own weights train
    also keeps what the weight gradients need: each linear's input (the norms' outputs, the attention
    output, the down projection's input) and RMSNorm's normalised value. Under ZeRO-3 every linear keeps
    its input, frozen or not: DeepSpeed's memory-efficient linear (``LinearFunctionForZeroStage3``, on by
    default) saves input and weight for backward whatever needs a gradient. Counted on transformers'
    decoder layers with autograd's saved-tensor hooks (tests/test_memory_model.py).
    """
    h = arch.hidden_size
    q_dim = arch.num_attention_heads * arch.head_dim
    ffn = arch.intermediate_size
    layer_norm = any(name.endswith("norm.bias") for name, _ in arch.layer_params)
    mlp_up = sum(
        lin.out_features for lin in arch.layer_linears if lin.in_features == h and lin.out_features >= ffn
    )
    gated = mlp_up >= 2 * ffn
    lse = arch.num_attention_heads * LOGSUMEXP_BYTES / d if arch.attention == "sdpa" else 0.0
    linear_inputs = 2 * h + q_dim + ffn
    # RMSNorm (transformers) computes in fp32: in bf16/fp16 it keeps an fp32 copy of its input
    norm_inputs = 2 * h * (1 if layer_norm else 4 / d)
    frozen = norm_inputs + 2 * q_dim + 2 * arch.kv_dim + lse + mlp_up + (ffn if gated else 0)
    frozen += lora_extra_per_token(layout, d, on_cpu, inputs_kept=zero3)
    trained = frozen + (0 if layer_norm else 2 * h) + linear_inputs
    return frozen + (linear_inputs if zero3 else 0), trained


def _attention_bytes_per_sequence(
    arch: ArchInfo, layout: ParamLayout, seq: int, d: int, packed: bool = False
) -> int:
    """What attention keeps per layer beyond the per-token tensors.

    Eager attention (ChatGLM-6B's own code) keeps the softmax output in fp32 and the probabilities in the
    compute dtype: heads x seq x kv_len x (4 + d) bytes. SDPA keeps no scores, but a P-Tuning v2 prefix
    or packing (a block-diagonal mask) makes the mask explicit: transformers then repeats k and v for every
    query head (no GQA kernel with a mask) and SDPA keeps the additive mask, seq x kv_len.
    """
    kv_len = seq + layout.prefix_tokens
    out = layout.prefix_tokens * 2 * arch.kv_dim * d  # the prefix keys and values themselves
    if arch.attention == "eager":
        return out + arch.num_attention_heads * seq * kv_len * (4 + d)
    if layout.prefix_tokens or packed:
        q_dim = arch.num_attention_heads * arch.head_dim
        out += seq * kv_len * d + 2 * (q_dim - arch.kv_dim) * kv_len * d
    return out


def activation_bytes(
    arch: ArchInfo,
    layout: ParamLayout,
    *,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    precision: Precision,
    on_cpu: bool = False,
    zero_stage: int = 2,
    packed: bool = False,
) -> int:
    """Activations kept for backward on one rank at the end of the forward pass.

    Only layers from the first trainable one upwards keep anything (nothing below needs a gradient). With
    gradient checkpointing each of them keeps its input, and backward recomputes one layer in full.
    """
    d = dtype_bytes(precision)
    seq = seq_len + layout.input_tokens
    layers, weight_layers = layout.trained_layers, min(layout.weight_layers, layout.trained_layers)
    if layers == 0:
        return 0
    frozen, trained = per_token_layer_elems(arch, layout, d, on_cpu, zero3=zero_stage == 3)
    attention = _attention_bytes_per_sequence(arch, layout, seq, d, packed)

    def layer(elems: float) -> float:
        return seq * elems * d + attention

    if gradient_checkpointing:
        recomputed = layer(trained if weight_layers else frozen)
        per_sequence = layers * seq * arch.hidden_size * d + recomputed
    else:
        per_sequence = weight_layers * layer(trained) + (layers - weight_layers) * layer(frozen)
    return math.ceil(micro_batch * per_sequence)


def backward_temp_bytes(
    arch: ArchInfo, layout: ParamLayout, *, micro_batch: int, seq_len: int, precision: Precision
) -> int:
    """Gradients in flight at the backward peak, in the top layer, net of what that layer already freed.

    MLP: the gradient of the up/gate output, of the activation output and of the hidden state; a layer
    whose down projection trains has freed that projection's saved input by then. Eager attention: the
    gradient of the probabilities plus the fp32 softmax gradient, heads x seq x kv_len x (d + 8).
    """
    if layout.trained_layers == 0:
        return 0
    d = dtype_bytes(precision)
    seq = seq_len + layout.input_tokens
    h, ffn = arch.hidden_size, arch.intermediate_size
    mlp_up = sum(
        lin.out_features for lin in arch.layer_linears if lin.in_features == h and lin.out_features >= ffn
    )
    freed = ffn if layout.weight_layers else 0
    mlp = seq * (mlp_up + ffn + h - freed) * d
    attention = 0
    if arch.attention == "eager":
        attention = arch.num_attention_heads * seq * (seq + layout.prefix_tokens) * (d + 8)
    return micro_batch * max(mlp, attention)


TARGET_LOSS_BYTES = 12
"""Per logit element of the target-only loss at its peak: the logits (d) or their fp32 copy, the saved
log-softmax (fp32) and, in backward, its fp32 gradient."""


def logits_bytes(
    arch: ArchInfo, *, micro_batch: int, positions: int, precision: Precision, own_loss: bool = False
) -> int:
    """The loss's logits at the turn from forward to backward, for ``positions`` positions per example.

    A model's own loss (every position) also keeps the model's output logits in the compute dtype next
    to the fp32 copy, the log-softmax and the gradient: d + 12 bytes per element; the target-only loss
    (launcher.train.target_loss) 12 bytes, over the target positions only.
    """
    per_elem = TARGET_LOSS_BYTES + (dtype_bytes(precision) if own_loss else 0)
    return micro_batch * positions * arch.vocab_size * per_elem


def zero3_gathered_elems(arch: ArchInfo, settings: ZeroSettings) -> int:
    """Peak of gathered (whole) parameters under ZeRO-3, simulated over the forward + backward trace.

    After a module runs, ZeRO-3 frees its gathered parameters unless the module runs again within
    ``stage3_max_reuse_distance`` parameters of upcoming fetches (then it keeps them), and it prefetches
    up to ``stage3_prefetch_bucket_size`` parameters of the next modules. With DeepSpeed's 1e9 reuse
    distance the top layers and the LM head stay gathered from their forward use to their backward use.
    """
    embed = arch.other_params[0][1] if arch.other_params else 0
    rest = sum(n for _, n in arch.other_params[1:])
    sizes = [embed] + [arch.params_per_layer] * arch.num_layers + [rest]
    order = list(range(len(sizes)))
    trace = order + order[::-1]
    live: set[int] = set()
    peak = 0
    for t, module in enumerate(trace):
        live.add(module)
        prefetched, fetched = set(), 0
        for nxt in trace[t + 1 :]:
            if fetched >= settings.prefetch_bucket:
                break
            if nxt not in live and nxt not in prefetched:
                prefetched.add(nxt)
                fetched += sizes[nxt]
        peak = max(peak, sum(sizes[m] for m in live | prefetched))
        traversed, reused = 0, False
        for nxt in trace[t + 1 :]:
            if traversed >= settings.max_reuse_distance:
                break
            if nxt == module:
                reused = True
                break
            traversed += sizes[nxt]
        if not reused:
            live.discard(module)
        live |= prefetched
    return peak


def buffer_bytes(
    arch: ArchInfo,
    layout: ParamLayout,
    *,
    zero_stage: int,
    world_size: int,
    precision: Precision,
    settings: ZeroSettings,
) -> int:
    """ZeRO buffers live during forward and backward.

    ZeRO-1/2 (contiguous gradients) allocate the reduce bucket when the first gradient arrives, two of
    them with ``overlap_comm``. They exist during the activation peak only when a weight near the output
    trains (P-Tuning's gradients arrive at the very end). Now and then the previous step's bucket outlives
    its step on real engines (one bucket more; not counted). ZeRO-3 allocates its reduce bucket at
    start-up and, with more than one rank, gathers whole parameters (``zero3_gathered_elems``).
    """
    d = dtype_bytes(precision)
    if zero_stage == 3:
        gathered = zero3_gathered_elems(arch, settings) if world_size > 1 else 0
        return (settings.reduce_bucket + gathered) * d
    if zero_stage == 0 or not layout.top_trains:
        return 0
    buckets = 2 if settings.overlap_comm else 1
    return buckets * settings.reduce_bucket * d


def step_temp_bytes(
    layout: ParamLayout,
    *,
    zero_stage: int,
    world_size: int,
    offload_optimizer: bool,
    precision: Precision,
    settings: ZeroSettings,
) -> int:
    """The optimizer step: its reduce buckets plus, on the GPU, the fp32 copy of the gradient partition
    that DeepSpeed builds before Adam runs (in bf16/fp16 also the flattened low-precision copy)."""
    d = dtype_bytes(precision)
    buckets = 0
    if zero_stage in (1, 2):
        buckets = (2 if settings.overlap_comm else 1) * settings.reduce_bucket * d
    elif zero_stage == 3:
        buckets = settings.reduce_bucket * d
    if offload_optimizer or zero_stage == 0:
        return buckets
    shard = math.ceil(layout.trainable_params / world_size)
    return buckets + shard * (4 + (d if d != 4 else 0))


def bucket_size(arch: ArchInfo) -> int:
    """The bucket size launcher.plan.dsconfig renders into ds_config.json (hidden_size^2, at least 4M)."""
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
    zero_settings: ZeroSettings | None = None,
    on_cpu: bool = False,
    zero_init: bool = True,
    packed: bool = False,
) -> MemoryEstimate:
    """``loss_positions``: positions per example that get logits (launcher.train.target_loss computes
    them for the target tokens only, after checking them once against the model's own loss); None: the
    model's own loss over all ``seq_len`` positions, as other training scripts compute it.
    ``zero_settings``: the ZeRO buffer sizes (default: what launcher.plan.dsconfig renders).
    ``on_cpu``: the estimate for CPU ranks (no CUDA context, no allocator cache, CPU dropout kernels).
    ``zero_init``: under ZeRO-3 the model is built already partitioned, as launcher's trainer does.
    ``packed``: packed rows of ``seq_len`` tokens (training.packing), attention under an explicit mask."""
    layout = layout or param_layout(arch, method)
    settings = zero_settings or ZeroSettings.rendered(arch)
    states = model_state_bytes(
        layout,
        world_size=world_size,
        zero_stage=zero_stage,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        precision=precision,
    )
    own_loss = loss_positions is None
    positions = seq_len if own_loss else min(seq_len, loss_positions or seq_len)
    d = dtype_bytes(precision)
    check = 0
    if not own_loss:  # the model's own loss once, without grad, over every position
        persistent = settings.reduce_bucket * d if zero_stage == 3 else 0
        check = persistent + micro_batch * seq_len * arch.vocab_size * (d + 8)
    return MemoryEstimate(
        **states,
        activations=activation_bytes(
            arch,
            layout,
            micro_batch=micro_batch,
            seq_len=seq_len,
            gradient_checkpointing=gradient_checkpointing,
            precision=precision,
            on_cpu=on_cpu,
            zero_stage=zero_stage,
            packed=packed,
        ),
        logits=logits_bytes(
            arch, micro_batch=micro_batch, positions=positions, precision=precision, own_loss=own_loss
        ),
        # the forward's last transient (DoRA's norm) or backward's first gradients, whichever is larger
        backward_temp=max(
            backward_temp_bytes(arch, layout, micro_batch=micro_batch, seq_len=seq_len, precision=precision),
            dora_norm_temp_bytes(layout, precision),
        ),
        buffers=buffer_bytes(
            arch, layout, zero_stage=zero_stage, world_size=world_size, precision=precision, settings=settings
        ),
        step_temp=step_temp_bytes(
            layout,
            zero_stage=zero_stage,
            world_size=world_size,
            offload_optimizer=offload_optimizer,
            precision=precision,
            settings=settings,
        ),
        check_temp=check,
        load_temp=0 if zero_init or zero_stage != 3 else layout.total_params * d,
        overhead=0 if on_cpu else CUDA_CONTEXT_BYTES,
        trainable_params=layout.trainable_params,
        total_params=layout.total_params,
        reserved_factor=1.0 if on_cpu else RESERVED_FACTOR,
    )
