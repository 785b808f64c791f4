"""A checkpoint directory read without loading it: which files hold the weights, every tensor's name,
shape and dtype from the file headers, and the tensors of one file at a time.

Formats: ``model.safetensors`` or ``pytorch_model.bin``, or shards of either listed in their
``*.index.json``. ``.bin`` files are opened with ``weights_only=True`` (tensors only, no pickled code)
and memory-mapped, so reading a header or one tensor does not load the whole shard; ``TensorReader``
keeps what stays mapped bounded.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
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


def _load_bin(file: Path) -> tuple[dict[str, Any], bool]:
    """The state dict of a .bin file and whether it is memory-mapped (its format allows it)."""
    import pickle

    import torch

    mapped = True
    try:
        try:
            data = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # A file from torch's legacy (pre-zip) format cannot be mapped: it is read whole.
            data, mapped = torch.load(file, map_location="cpu", weights_only=True), False
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{file}: not a readable PyTorch weights file ({first_line})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{file}: expected a dict of tensors (a state dict)")
    return data, mapped


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
    data, _ = _load_bin(file)
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


class TensorReader:
    """Reads tensors one at a time into memory of their own, one file mapped at a time.

    A memory mapping keeps every page read through it resident (and counted in this process's memory)
    until it is closed, so the file is closed and mapped again after ``remap_bytes`` have been read
    through it: the tensors being written, not the shard, bound the memory. A legacy (unmappable) .bin
    is loaded whole once and kept while its tensors are read.
    """

    def __init__(self, remap_bytes: int):
        self.remap_bytes = remap_bytes
        self._file: Path | None = None
        self._get: Callable[[str], Any] | None = None
        self._mapped = True
        self._read_bytes = 0
        self._stack = contextlib.ExitStack()

    def _open(self, file: Path) -> None:
        self._stack.close()
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            self._get, self._mapped = handle.get_tensor, True
        else:
            data, self._mapped = _load_bin(file)
            self._stack.callback(data.clear)
            self._get = data.__getitem__
        self._file, self._read_bytes = file, 0

    def read(self, info: TensorInfo) -> Any:
        import torch

        if self._file != info.file or (self._mapped and self._read_bytes >= self.remap_bytes):
            self._open(info.file)
        assert self._get is not None
        self._read_bytes += info.nbytes
        return self._get(info.name).clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._stack.close()
        self._file = self._get = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
