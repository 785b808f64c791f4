"""A checkpoint directory read without loading it: which files hold the weights, every tensor's name,
shape and dtype from the file headers, and the tensors of one file at a time.

Formats: ``model.safetensors`` or ``pytorch_model.bin``, or shards of either listed in their
``*.index.json``. ``.bin`` files are opened with ``weights_only=True`` (tensors only, no pickled code)
and memory-mapped, so reading a header or one tensor does not load the whole shard.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"

# safetensors header dtype -> bytes per element
_SAFETENSORS_ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
}
_SAFETENSORS_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    """torch dtype name without the ``torch.`` prefix (``float16``)."""
    item_bytes: int

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.item_bytes


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("'weight_map' is not an object")
        return {str(k): str(v) for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{index}: not a shard index (a JSON object with a 'weight_map'): {exc}") from None


def index_file(src: Path) -> Path | None:
    """The shard index, when the weights are sharded; safetensors preferred over .bin."""
    for name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (src / name).is_file():
            return src / name
    return None


def weight_files(src: Path) -> list[Path]:
    """The files holding the weights, in the index's order; safetensors preferred over .bin."""
    index = index_file(src)
    if index is not None:
        files = [src / name for name in dict.fromkeys(_weight_map(index).values())]
        for file in files:
            if not file.is_file():
                raise UserError(f"{index}: lists shard {file.name}, which is not in {src}")
        return files
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (src / single).is_file():
            return [src / single]
    raise UserError(
        f"{src}: no weights found: expected {SAFETENSORS_SINGLE}, {BIN_SINGLE}, or shards with "
        f"{SAFETENSORS_INDEX} / {BIN_INDEX}"
    )


def _load_bin(file: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        try:
            data = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # A file from torch's legacy (pre-zip) format cannot be mapped: it is read whole.
            data = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{file}: not a readable PyTorch weights file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{file}: expected a dict of tensors (a state dict)")
    return data


def _scan_file(file: Path) -> list[TensorInfo]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                infos = []
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    piece = handle.get_slice(name)
                    code = piece.get_dtype()
                    infos.append(
                        TensorInfo(
                            name,
                            file,
                            tuple(piece.get_shape()),
                            _SAFETENSORS_DTYPE_NAMES.get(code, code),
                            _SAFETENSORS_ITEM_BYTES.get(code, 0),
                        )
                    )
                return infos
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{file}: not a readable safetensors file ({exc})") from None
    data = _load_bin(file)
    return [
        TensorInfo(name, file, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.element_size())
        for name, t in data.items()
    ]


def scan(src: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint (headers only). A tensor in two files, or one the index places
    in another file than the one holding it, is an error naming both files."""
    files = weight_files(src)
    found: dict[str, TensorInfo] = {}
    for file in files:
        for info in _scan_file(file):
            if info.name in found:
                raise UserError(f"{file}: tensor {info.name} is also in {found[info.name].file.name}")
            found[info.name] = info
    index = index_file(src)
    if index is not None:
        for name, file_name in _weight_map(index).items():
            if name not in found:
                raise UserError(f"{index}: lists tensor {name} in {file_name}, which does not hold it")
            if found[name].file.name != file_name:
                raise UserError(
                    f"{index}: places tensor {name} in {file_name}, but {found[name].file.name} holds it"
                )
    return found


@contextlib.contextmanager
def open_tensors(file: Path) -> Iterator[Callable[[str], Any]]:
    """``get(name) -> torch.Tensor`` for one weight file, reading only the tensors asked for."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            yield handle.get_tensor
        return
    data = _load_bin(file)
    try:
        yield data.__getitem__
    finally:
        data.clear()
