"""``BinaryTensor``: a +-1 weight stored at one bit per element.

A wrapper tensor subclass in the style of torchao's NF4Tensor: to PyTorch it looks like a float
tensor of the logical shape and dtype (so it can be an ``nn.Parameter`` and receives a plain dense
float gradient of that shape in ``.grad``), while its only storage is ``.words``, the int32 words
in the weight layout of :mod:`bnnops.packing` (packed along dim 1, the reduction dimension).

What it supports, and why the rest is refused:

- aliasing and copying: ``detach``, ``clone``, ``copy.deepcopy``, ``.to(device)``,
  ``.to(dtype)`` (keeps the bits, changes the logical float dtype), ``copy_`` from a
  BinaryTensor or from a dense float tensor of +-1 values, hence ``state_dict`` /
  ``load_state_dict`` and ``torch.save`` / ``torch.load(weights_only=True)``.
- out-of-place ops that only read (``w.sum()``, ``w * 2``, ``torch.equal``...) run on the dense
  +-1 copy and return dense tensors: correct, but they build the dense weight, so the bnnops ops
  read ``.words`` instead. Torch functions registered in ``TORCH_FUNCTIONS`` skip the dense copy:
  ``F.linear(x, w)`` (so ``nn.Linear`` with a binary weight) runs the packed W1A16 kernel, and
  ``F.conv2d`` the packed conv kernel.
- view ops are refused (a view would have to be a dense temporary, and writing through it would
  silently change nothing), except the identity view and ``view(-1)``: torch.distributed flattens
  parameters with it (DDP's start-up broadcast), so it returns a dense +-1 copy (``_FlatCopy``)
  that refuses writes: ``w.view(-1).mul_(-1)`` raises.
- in-place ops that write to it are refused before any bit changes: the bits change only through
  Bop (``bnnops.optim.Bop``) or ``copy_``; an SGD step on a binary weight must fail loudly rather
  than corrupt or be ignored. ``nn.init`` functions are in-place ops, so they raise and leave the
  bits as they were; initialize with ``w.copy_(BinaryTensor.from_float(init))``, the signs of a
  float init. Writing a dense tensor from it (``d.copy_(w)``, ``d += w``, loading a binary
  checkpoint into a dense model) uses its +-1 values.
- ``copy_`` never rounds: a dense source must hold only +-1 (a value a bit holds exactly), else
  it raises before any bit changes. Packing the signs of real values is lossy, so it is asked for
  by name: ``BinaryTensor.from_float(w)``. The bnnops layers' ``load_state_dict`` does that for
  a dense float entry (a latent-weight checkpoint; see :func:`pack_dense_state_entries`).
- weight averaging is refused: ``torch.optim.swa_utils.AveragedModel`` (SWA, EMA) keeps a running
  average, a real tensor that one bit per element cannot hold, and re-binarizing it at every
  update would keep only the latest signs (the EMA of a model whose bits all flipped would stay
  the first snapshot). Its in-place path (``torch._foreach_lerp_``: the default on CUDA, and any
  ``multi_avg_fn``) meets the in-place refusal; its ``copy_`` path (the default on the CPU, and any
  ``avg_fn``) meets ``copy_``'s, as soon as the average is not +-1 everywhere (an average of
  snapshots that all agree is +-1, and is stored exactly). To average a binary model, average a
  copy built with ``weight_quantizer='ste_sign'``: ``load_state_dict`` of the binary model's state
  gives its dense latent weights the +-1 values, ``AveragedModel`` averages those, and loading the
  average back into the binary model packs its signs (a majority vote for SWA).
- ``share_memory_`` shares the words; ``empty_like`` (``Module.to_empty``) gives uninitialized
  words; a model can be built on the meta device.

Words that reach a BinaryTensor from outside are checked in one place, :func:`check_words`: at
construction (int32, the shape ``packed_weight_shape`` gives, contiguous), and, where they come
from a checkpoint (``torch.load``, ``copy_`` from a BinaryTensor, ``load_state_dict`` of a
bnnops layer), also their padding bits, which must be 0 as :mod:`bnnops.packing` writes them:
words with a padding bit set were packed some other way (another bit order or K) or corrupted, so
they are refused rather than cleared.

Two tables route calls, each filled by a decorator: ``@implements([aten ops])`` registers an
``ATEN_OPS`` handler, run by ``__torch_dispatch__`` below autograd (the aliasing and copying ops
above); ``@implements_torch_function(torch functions)`` registers a ``TORCH_FUNCTIONS`` handler,
run by ``__torch_function__`` above autograd, for a function with a packed kernel of its own.
Every other aten op runs on the dense +-1 copy, or raises if it writes to or views the weight.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from bnnops.ops.checks import DtypeError
from bnnops.packing import FLOAT_DTYPES, _check_floats, pack_weight, packed_weight_shape, unpack_weight

__all__ = [
    "ATEN_OPS",
    "TORCH_FUNCTIONS",
    "BinaryTensor",
    "check_words",
    "implements",
    "implements_torch_function",
    "metadata",
    "pack_dense_state_entries",
]

aten = torch.ops.aten

# aten op -> implementation on BinaryTensor arguments, called as ``handler(*args, **kwargs)`` by
# ``__torch_dispatch__``; filled with :func:`implements`.
ATEN_OPS: dict[torch._ops.OpOverload, Callable[..., Any]] = {}

# torch function -> implementation for BinaryTensor arguments, called as ``handler(*args, **kwargs)``
# by ``__torch_function__`` (it may return NotImplemented to decline); filled with
# :func:`implements_torch_function` by the modules that own the packed kernels (``bnnops.linear``
# registers ``F.linear``, ``bnnops.conv`` ``F.conv2d``). A plain ``TORCH_FUNCTIONS[f] = handler``
# registers too.
TORCH_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {}


def implements(aten_ops: Sequence[torch._ops.OpOverload]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated function as BinaryTensor's ``__torch_dispatch__``
    implementation of each op in ``aten_ops`` (torchao's NF4Tensor style). The function takes the
    op's arguments as they are, ``handler(*args, **kwargs)``, and is returned unchanged."""

    def decorator(handler: Callable[..., Any]) -> Callable[..., Any]:
        for op in aten_ops:
            ATEN_OPS[op] = handler
        return handler

    return decorator


def implements_torch_function(*funcs: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated function as BinaryTensor's ``__torch_function__``
    implementation of each torch function in ``funcs``, e.g. ``@implements_torch_function(F.linear)``.

    The handler is called as ``handler(*args, **kwargs)`` with the function's arguments, above
    autograd (it owns the gradient), before any dense copy is made; it may return
    ``NotImplemented`` to decline (the call then runs on the dense +-1 values). It is returned
    unchanged.
    """

    def decorator(handler: Callable[..., Any]) -> Callable[..., Any]:
        for func in funcs:
            TORCH_FUNCTIONS[func] = handler
        return handler

    return decorator


class BinaryTensor(torch.Tensor):
    """A logical +-1 float tensor stored as bit-packed int32 words.

    Args:
        words: int32 tensor of shape ``packed_weight_shape(shape)``, the words in the weight
            layout of :mod:`bnnops.packing`: (N, ceil(K/32)) for a linear weight (N, K),
            (O, kh, kw, ceil(C/32)) for a conv weight (O, C, kh, kw). Bit 1 means -1.
        shape: the logical shape.
        dtype: the logical float dtype (float32, bfloat16 or float16): the dtype of
            :meth:`dequantize` and of the gradients autograd computes for it.
        requires_grad: as for any tensor; ``nn.Parameter(BinaryTensor(...))`` sets it.

    Build one from a float weight with :meth:`from_float`.
    """

    words: torch.Tensor

    @staticmethod
    def __new__(
        cls,
        words: torch.Tensor,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = False,
    ) -> "BinaryTensor":
        shape = torch.Size(shape)
        check_words(words, shape, dtype)
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=words.device, requires_grad=requires_grad
        )

    def __init__(
        self,
        words: torch.Tensor,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        requires_grad: bool = False,
    ) -> None:
        self.words = words

    @classmethod
    def from_float(
        cls, w: torch.Tensor, *, dtype: torch.dtype | None = None, requires_grad: bool = False
    ) -> "BinaryTensor":
        """Binarize a float weight: -1 where ``w < 0``, else +1 (sign(0) = +1).

        Args:
            w: float32, bfloat16 or float16 tensor, at least 1-D; dim 1 is the packed dimension.
            dtype: logical dtype of the result; ``w.dtype`` by default.
            requires_grad: for a parameter, wrap in ``nn.Parameter`` instead.

        Raises:
            ValueError when ``w`` holds NaN or +-inf: a binary weight made of them would hide a
            broken checkpoint or a diverged latent weight.
        """
        _check_dense_source(w)
        return cls(pack_weight(w.detach()), w.shape, dtype or w.dtype, requires_grad)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense +-1 tensor of the logical shape, in ``dtype`` (default: the logical dtype)."""
        return unpack_weight(self.words, self.shape, dtype or self.dtype)

    @property
    def data(self) -> "BinaryTensor":
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: "BinaryTensor") -> None:
        # Tensor.data's own setter swaps the tensor's storage, which a wrapper does not have: the
        # words live in the Python attribute ``words`` and would silently stay as they were.
        if not isinstance(value, BinaryTensor) or (value.shape, value.dtype, value.device) != (
            self.shape,
            self.dtype,
            self.device,
        ):
            raise RuntimeError(
                "BinaryTensor.data can only be set to a BinaryTensor of the same shape, dtype and device; "
                "use copy_ to load dense values (their signs are packed)"
            )
        self.words = value.words

    def share_memory_(self) -> "BinaryTensor":
        """Move the packed words to shared memory (``nn.Module.share_memory``, Hogwild training)."""
        self.words.share_memory_()
        return self

    def is_shared(self) -> bool:
        return self.words.is_shared()

    def __setstate__(self, state: object) -> None:
        """Give an unpickled BinaryTensor its words, checked like a checkpoint's.

        ``torch.load`` (``weights_only`` too) rebuilds a BinaryTensor as a wrapper of the shape,
        dtype and device written in the file and passes it the pickled instance attributes:
        ``'words'`` (``'packed'`` in files of bnnops 0.1), ``'_is_param'`` for a parameter, and any
        other attribute the tensor carried.
        Both the wrapper and the words come from the file, so they go through
        :func:`check_words` (padding bits included) before the tensor holds them. Other
        attributes are restored as plain instance attributes only: a name the tensor class
        defines (``grad``, ``data``, ``requires_grad``, a method) is refused, so a file cannot
        set a gradient or replace a method.

        Raises:
            TypeError / ValueError naming what is wrong: no words, a name the class defines,
            a non-bool ``'_is_param'``, words that are not int32, of the wrong shape or device,
            or with padding bits set; a logical shape, dtype or layout a BinaryTensor cannot have.
        """
        attrs, slots = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
        if isinstance(attrs, dict) and "packed" in attrs and "words" not in attrs:
            # Files written by bnnops 0.1 name the words 'packed' (see CHANGELOG.md).
            attrs = {("words" if name == "packed" else name): value for name, value in attrs.items()}
        if not isinstance(attrs, dict) or "words" not in attrs or slots:
            got = sorted(map(repr, attrs)) if isinstance(attrs, dict) else type(attrs).__name__
            raise ValueError(
                f"a pickled BinaryTensor holds its int32 'words' as an instance attribute, got {got}"
                + (f" and slots {sorted(map(repr, slots))}" if slots else "")
            )
        defined = [name for name in attrs if not isinstance(name, str) or hasattr(BinaryTensor, name)]
        if defined:
            raise ValueError(
                f"a pickled BinaryTensor may not set {', '.join(map(repr, defined))}: the tensor class "
                "defines these names (only plain instance attributes are restored)"
            )
        if not isinstance(attrs.get("_is_param", True), bool):
            raise TypeError(
                f"a pickled BinaryTensor's '_is_param' must be a bool, got {type(attrs['_is_param']).__name__}"
            )
        with torch._C.DisableTorchFunctionSubclass():
            shape, dtype, device, layout = self.shape, self.dtype, self.device, self.layout
            contiguous, strides, offset = self.is_contiguous(), self.stride(), self.storage_offset()
        what = f"pickled BinaryTensor of shape {tuple(shape)}"
        if layout != torch.strided or not contiguous or offset != 0:
            raise ValueError(
                f"{what}: its logical tensor must be strided and contiguous, got {layout}, strides "
                f"{tuple(strides)}, storage offset {offset}"
            )
        check_words(attrs["words"], shape, dtype, what=what, device=device, padding=True)
        for name, value in attrs.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        grad = f", grad_fn={self.grad_fn.name()}" if self.grad_fn is not None else ""
        grad += ", requires_grad=True" if self.requires_grad and not grad else ""
        return (
            f"BinaryTensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"packed int32 words {tuple(self.words.shape)}{grad})"
        )

    def __tensor_flatten__(self):
        return ["words"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner_tensors, dtype, outer_size, outer_stride):
        return BinaryTensor(inner_tensors["words"], outer_size, dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Functions in TORCH_FUNCTIONS get a packed implementation (F.linear -> the W1A16
        # kernel, whose autograd never builds the dense weight); a handler may decline with
        # NotImplemented. Everything else behaves as a plain tensor here and reaches
        # __torch_dispatch__ below autograd.
        kwargs = kwargs or {}
        handler = TORCH_FUNCTIONS.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Ops in ATEN_OPS keep the result packed; writes and views are refused; everything else
        # runs on the dense +-1 copy.
        kwargs = kwargs or {}
        handler = ATEN_OPS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if _writes_binary(func, args, kwargs):
            raise RuntimeError(
                f"BinaryTensor does not support the in-place op {func}: its values are packed sign bits, "
                "which change only through copy_ (from a BinaryTensor or +-1 values) or the Bop optimizer "
                "(bnnops.optim.Bop); nothing was written. To train it, use Bop, or a float latent weight "
                "(weight_quantizer='ste_sign') with a torch optimizer. To initialize it (nn.init), copy_ "
                "BinaryTensor.from_float(w) of a float init w. To average it (AveragedModel, EMA), average "
                "a copy built with weight_quantizer='ste_sign' (see BinaryTensor's docstring)."
            )
        if func.is_view:
            raise RuntimeError(
                f"BinaryTensor does not support the view op {func}: a view of packed bits would be "
                "a dense copy, and writing through it would silently change nothing. Call "
                ".dequantize() for a dense +-1 tensor."
            )
        args, kwargs = tree_map_only(BinaryTensor, BinaryTensor.dequantize, (args, kwargs))
        return func(*args, **kwargs)


def metadata(t: torch.Tensor) -> tuple[torch.Size, torch.dtype, torch.device, bool]:
    """(shape, dtype, device, requires_grad) of the tensor ``t``, read without ``__torch_function__``.

    On a BinaryTensor each attribute read is a round trip through its Python ``__torch_function__``
    (about 3 us on a 2.5 GHz Xeon, against 0.3 us on a plain tensor); the layers read a weight's
    metadata once per call through this (1.6 us for all four).
    """
    with torch._C.DisableTorchFunctionSubclass():
        return t.shape, t.dtype, t.device, t.requires_grad


def check_words(
    words: object,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    what: str = "BinaryTensor",
    device: torch.device | None = None,
    padding: bool = False,
) -> None:
    """Check that ``words`` can be the words of a BinaryTensor of logical ``shape`` and ``dtype``:
    the one check of words that reach a BinaryTensor from outside.

    Always (cheap, metadata only; run at every construction): ``words`` is a plain int32 tensor of
    shape ``packed_weight_shape(shape)``, contiguous (the kernels and Bop read it row-major);
    ``shape`` has at least one dimension and ``dtype`` is float32, bfloat16 or float16. With
    ``device``: the words are on it. With ``padding`` (for words read from a checkpoint; reads the
    last word of each row): the padding bits, bits K % 32 .. 31 of the last word of each row, are 0,
    as :mod:`bnnops.packing` writes them.

    Raises:
        TypeError: words that are not an int32 tensor (float words would be truncated, int64
            words wrapped), or a logical dtype that is not a float dtype.
        ValueError: a wrong shape, non-contiguous words, another device, or a padding bit set;
            the message starts with ``what``.
    """
    shape = shape if isinstance(shape, torch.Size) else torch.Size(shape)
    if not isinstance(words, torch.Tensor) or isinstance(words, BinaryTensor) or words.dtype != torch.int32:
        got = words.dtype if isinstance(words, torch.Tensor) else type(words).__name__
        raise TypeError(f"{what}: packed words must be an int32 tensor, got {got}")
    if len(shape) == 0:
        raise ValueError(f"{what}: a BinaryTensor needs at least one dimension (the packed one)")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: BinaryTensor's logical dtype must be float32, bfloat16 or float16, got {dtype}")
    expected = packed_weight_shape(shape)
    if words.shape != expected:
        raise ValueError(
            f"{what}: packed words of shape {tuple(words.shape)} do not hold a weight of shape "
            f"{tuple(shape)} (expected words of shape {expected})"
        )
    if not words.is_contiguous():
        raise ValueError(f"{what}: packed words must be contiguous, got strides {words.stride()}")
    if device is not None and words.device != device:
        raise ValueError(f"{what}: packed words are on {words.device}, the BinaryTensor on {device}")
    K = shape[1] if len(shape) >= 2 else shape[0]
    if padding and K % 32 and words.device.type != "meta":
        # int32 with bits K % 32 .. 31 set (bit 31 is the sign bit).
        mask = -(1 << (K % 32))
        bad = int(torch.count_nonzero(words[..., -1] & mask))
        if bad:
            raise ValueError(
                f"{what}: {bad} packed rows have padding bits set (bits {K % 32}..31 of their last word, "
                f"beyond K={K}); bnnops packs them as 0, so these words were packed another way "
                "(bit order, K) or are corrupted"
            )


def pack_dense_state_entries(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of the bnnops layers, for each BinaryTensor parameter's entry.

    A BinaryTensor entry of the parameter's shape has its words checked as a checkpoint's
    (:func:`check_words` with padding bits), so ``assign=True`` cannot install bad words either. A
    dense float entry of the parameter's shape (a latent-weight checkpoint) becomes a BinaryTensor
    of its signs (refusing NaN and inf), so ``assign=True`` keeps the parameter binary too (without
    it, ``copy_`` then copies its bits). Entries of another shape are left to ``load_state_dict``,
    which reports the size mismatch.

    Raises:
        TypeError / ValueError whose message starts with ``state_dict entry '<key>'``.
    """
    for name, param in module.named_parameters(recurse=False):
        key = prefix + name
        value = state_dict.get(key)
        if not isinstance(param, BinaryTensor) or not isinstance(value, torch.Tensor):
            continue
        value_shape, value_dtype, value_device, _ = metadata(value)
        if value_shape != param.shape:
            continue
        what = f"state_dict entry {key!r}"
        if isinstance(value, BinaryTensor):
            check_words(
                getattr(value, "words", None), param.shape, value_dtype, what=what, device=value_device, padding=True
            )
        elif value.is_floating_point():
            try:
                state_dict[key] = BinaryTensor.from_float(value)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{what}: {e}") from None


def _writes_binary(func, args, kwargs, cls=None):
    """Whether ``func`` writes to an argument of class ``cls`` (default BinaryTensor); ops that write
    a dense argument while reading a binary one, ``d.add_(w)`` or ``torch.add(w, 1, out=d)``, run on
    the dense copy."""
    cls = cls or BinaryTensor
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, cls) for v in values):
            return True
    return False


def _check_dense_source(w):
    _check_floats(w, "the float source of a binary weight")
    # Meta tensors (models built on device="meta", then to_empty) have no values to check.
    if w.device.type != "meta" and not torch.isfinite(w).all():
        raise ValueError("cannot binarize a weight that holds NaN or inf")


@implements([aten.detach.default, aten.alias.default])
def _alias(x):
    return BinaryTensor(x.words, x.shape, x.dtype)


@implements([aten.view.default])
def _view(x, size):
    if list(size) == [-1] and x.dim() > 1:
        # torch.distributed flattens parameters to broadcast them (DDP's start-up sync) and writes
        # the result back with copy_, which repacks; the flat tensor cannot alias packed bits.
        return _FlatCopy(x.dequantize().view(-1))
    if list(size) != list(x.shape) and not (list(size) == [-1] and x.dim() == 1):
        raise RuntimeError(
            f"BinaryTensor of shape {tuple(x.shape)} cannot be viewed as {tuple(size)}: the bits are "
            "packed along dim 1. Call .dequantize() for a dense +-1 tensor."
        )
    return _alias(x)


@implements([aten.clone.default])
def _clone(x, memory_format=None):
    return BinaryTensor(x.words.clone(), x.shape, x.dtype)


@implements([aten._to_copy.default])
def _to_copy(x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise DtypeError(
            f"BinaryTensor converts only to float32, bfloat16 or float16 (it keeps its bits), not {dtype}; "
            "use .words for the int32 words or .dequantize() for a dense tensor"
        )
    packed = x.words.to(device=device or x.device, non_blocking=non_blocking)
    return BinaryTensor(packed, x.shape, dtype or x.dtype)


@implements([aten.copy_.default])
def _copy_(dst, src, non_blocking=False):
    if not isinstance(dst, BinaryTensor):
        # A dense tensor reading a binary one (a Bop checkpoint loaded into a dense model).
        return dst.copy_(src.dequantize(), non_blocking=non_blocking)
    if src.shape != dst.shape:
        raise RuntimeError(
            f"cannot copy a tensor of shape {tuple(src.shape)} into a BinaryTensor of shape {tuple(dst.shape)}"
        )
    if isinstance(src, BinaryTensor):
        check_words(
            getattr(src, "words", None), src.shape, src.dtype, what="copy_ source", device=src.device, padding=True
        )
        dst.words.copy_(src.words, non_blocking=non_blocking)
    else:
        _check_signs(src)
        dst.words.copy_(pack_weight(src.to(dst.device)))
    # An in-place op inside __torch_dispatch__ runs below autograd and leaves the version counter as
    # it was; autograd's saved-tensor checks read that counter, so the write must bump it.
    torch.autograd.graph.increment_version(dst.words)
    return dst


def _check_signs(src: torch.Tensor) -> None:
    """A dense ``copy_`` source holds only +-1: anything else would be rounded to its sign."""
    _check_floats(src, "a dense copy_ source for a BinaryTensor")
    if src.device.type == "meta":  # no values (a model built on the meta device)
        return
    not_sign = (src != 1) & (src != -1)
    if not_sign.any():
        index = tuple(not_sign.nonzero()[0].tolist())
        raise ValueError(
            f"copy_ into a BinaryTensor takes a BinaryTensor or +-1 values, got {src[index].item()} at "
            f"index {index}: a bit cannot hold it. To pack the signs of real values, copy_ "
            "BinaryTensor.from_float(values). Weight averaging (torch.optim.swa_utils.AveragedModel, EMA) "
            "needs real storage: average a copy of the model built with weight_quantizer='ste_sign' "
            "(see BinaryTensor's docstring)."
        )


@implements([aten.empty_like.default])
def _empty_like(x, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    # Module.to_empty passes a device: uninitialized words there, the same logical tensor. Without
    # one it is a dense scratch tensor, as reads build them (dropout: empty_like(w).bernoulli_()).
    if device is None:
        # The logical tensor is contiguous, so preserve_format is contiguous: no need to unpack the bits.
        fmt = torch.contiguous_format if memory_format in (None, torch.preserve_format) else memory_format
        return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.words.device, memory_format=fmt)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"an empty BinaryTensor has a float32, bfloat16 or float16 logical dtype, not {dtype}")
    return BinaryTensor(torch.empty_like(x.words, device=device), x.shape, dtype or x.dtype)


class _FlatCopy(torch.Tensor):
    """What ``BinaryTensor.view(-1)`` returns: a dense +-1 copy that refuses writes.

    It is not a view of the bits, so a write through it would be lost; refusing writes keeps
    ``w.view(-1).mul_(-1)`` loud while torch.distributed, which only reads it, works.
    """

    @staticmethod
    def __new__(cls, dense):
        return torch.Tensor._make_wrapper_subclass(cls, dense.shape, dtype=dense.dtype, device=dense.device)

    def __init__(self, dense):
        self.dense = dense

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if _writes_binary(func, args, kwargs, cls):
            raise RuntimeError(
                f"{func} on BinaryTensor.view(-1): that flat tensor is a dense copy of the packed "
                "bits, so the write would be lost. Write to the BinaryTensor with copy_, or train it with Bop."
            )
        args, kwargs = tree_map_only(cls, lambda t: t.dense, (args, kwargs or {}))
        out = func(*args, **kwargs)
        # A view of the copy is a copy too (split & co. return several).
        return tree_map_only(torch.Tensor, _FlatCopy, out) if func.is_view else out


# torch.load(weights_only=True) rebuilds only allow-listed classes; checkpoints name this class
# by its import path, bnnops.binary_tensor.BinaryTensor, so that path is public API.
torch.serialization.add_safe_globals([BinaryTensor])
