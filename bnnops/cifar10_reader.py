"""The CIFAR-10 python batch reader: a restricted unpickler and the checks a batch must pass.

A CIFAR-10 batch is untrusted input. The unpickler resolves only the globals a batch needs
(:class:`_CifarUnpickler` says which) to builders of our own, so nothing a file says about a dtype
or an array reaches numpy: the only array it can build is a copy of raw bytes as uint8. Then
:func:`read_cifar_batch` checks that the batch is exactly what CIFAR-10 holds before any element
is used. Every error names the file.
"""

import math
import pickle
from typing import Any

import numpy as np
import torch

# numpy.dtype('u1').__reduce__() state after its version: a plain uint8 dtype (byte order '|', no
# subarray, names or fields, elsize and alignment -1, no flags: no object field). Version 3 is
# what numpy writes; version 4 appends metadata, which must be None.
_UINT8_DTYPE_STATE = ("|", None, None, None, -1, -1, 0)


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"{what}; a CIFAR-10 batch holds only uint8 arrays, lists, ints and bytes")


def _text(value: object) -> object:
    # encoding="bytes" reads a Python 2 str (the original batches) as bytes.
    return value.decode("latin1") if isinstance(value, bytes) else value


class _PickledDtype:
    """What ``numpy.dtype(spec, align, copy)`` builds in a CIFAR pickle: only uint8, and only with
    the state numpy writes for a plain uint8 dtype (checked here, never passed to numpy)."""

    def __init__(self, spec: object, align: object = False, copy: object = False) -> None:
        if _text(spec) != "u1":
            raise _refuse(f"refusing numpy dtype {spec!r}")

    def __setstate__(self, state: object) -> None:
        state_text = tuple(_text(s) for s in state) if isinstance(state, tuple) else ()
        version, plain, metadata = state_text[:1], state_text[1:8], state_text[8:]
        if plain != _UINT8_DTYPE_STATE or (version, metadata) not in (((3,), ()), ((4,), (None,))):
            raise _refuse(f"refusing a uint8 dtype with the state {state!r} (not a plain uint8)")


class _NdarrayClass:
    """Stands for ``numpy.ndarray`` as the class argument of ``_reconstruct``."""


class _PickledArray:
    """What ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` builds in a CIFAR pickle:
    its state (version 1, shape, dtype, fortran order, raw bytes) becomes ``array``."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise _refuse("refusing an ndarray state other than (1, shape, dtype, fortran order, raw bytes)")
        _, shape, dtype, fortran, raw = state
        self.array = _uint8_array(raw, dtype, shape, "F" if fortran is True else "C")


def _reconstruct_array(cls: object, shape: object, typecode: object) -> _PickledArray:
    if cls is not _NdarrayClass or shape != (0,) or _text(typecode) != "b":
        raise _refuse(f"refusing numpy _reconstruct({cls!r}, {shape!r}, {typecode!r})")
    return _PickledArray()


def _uint8_array(raw: object, dtype: object, shape: object, order: object) -> np.ndarray:
    """A uint8 array of ``shape`` over a copy of the raw bytes (numpy's ``_frombuffer`` arguments)."""
    if not isinstance(dtype, _PickledDtype):
        raise _refuse(f"refusing an ndarray of dtype {dtype!r}")
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) or order not in ("C", "F"):
        raise _refuse(f"refusing an ndarray of shape {shape!r} in order {order!r}")
    if isinstance(raw, memoryview):
        raw = raw.tobytes()
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape):
        got = f"{len(raw)} bytes" if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
        raise _refuse(f"refusing an ndarray of shape {shape} (uint8: {math.prod(shape)} bytes) made of {got}")
    return np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(shape, order=order)


def _latin1_bytes(text: object, encoding: object) -> bytes:
    # _codecs.encode(text, 'latin1'): how a protocol-2 pickle written by Python 3 stores bytes.
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"refusing _codecs.encode of {type(text).__name__} to {encoding!r}")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: pickle's own dicts, lists, tuples, bytes, str,
    ints, floats, bools and None, and uint8 numpy arrays.

    A pickle runs whatever its globals name, and numpy's reconstructors honour the dtype state the
    file writes: a dtype can claim to hold no Python objects while having an object field, and
    numpy then reads the file's bytes as object pointers (a crash, or worse). So the globals a
    numpy array pickles with (``numpy.dtype``, ``numpy.ndarray``, ``_reconstruct``, protocol 5's
    ``_frombuffer``, under numpy 1's and numpy 2's module names, and ``_codecs.encode`` for bytes)
    are bound to builders of our own: the only dtype is uint8, accepted only with numpy's plain
    uint8 state, and an array is a copy of raw bytes whose length is its shape's product. No dtype
    or array state from the file reaches numpy; any other global is refused.
    """

    GLOBALS: dict[tuple[str, str], Any] = {
        ("numpy", "dtype"): _PickledDtype,
        ("numpy", "ndarray"): _NdarrayClass,
        ("_codecs", "encode"): _latin1_bytes,
    } | {
        (f"numpy.{core}.{module}", name): builder
        for core in ("core", "_core")
        for module, name, builder in (
            ("multiarray", "_reconstruct", _reconstruct_array),
            ("numeric", "_frombuffer", _uint8_array),
        )
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self.GLOBALS[module, name]


def read_cifar_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one CIFAR-10 python batch.

    The batch must be exactly what CIFAR-10 holds, checked before any element is used: a dict
    with b'data', a uint8 array (N, 3072), and b'labels', a list of N ints in 0..9 (Python ints,
    not bools). Other entries (b'batch_label', b'filenames') are not read.

    Raises:
        ValueError naming ``path`` and what was wrong (a file that is not such a pickle, a global
        it may not name, an entry of another type, dtype, shape or range).
    """
    with open(path, "rb") as f:
        try:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        except Exception as e:  # a malformed pickle can fail in any of the unpickler's ways
            raise ValueError(
                f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' and b'labels'): {e}"
            ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        got = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' and b'labels'), got {got}"
        )
    data, labels = batch[b"data"], batch[b"labels"]
    data = data.array if isinstance(data, _PickledArray) else data
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {got}")
    if not isinstance(labels, list) or len(labels) != data.shape[0]:
        got = f"{len(labels)} labels" if isinstance(labels, list) else type(labels).__name__
        raise ValueError(f"{path}: b'labels' must be a list of {data.shape[0]} ints (one per image), got {got}")
    for i, label in enumerate(labels):
        if type(label) is not int or not 0 <= label <= 9:
            raise ValueError(f"{path}: b'labels' must be ints in 0..9, got {label!r} at index {i}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.tensor(labels, dtype=torch.int64)
