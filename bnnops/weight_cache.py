"""The dense +-1 weight of the CPU references, kept between calls while the words hold the same values.

Every CPU reference of a linear or conv op (:mod:`bnnops.ops.reference`) multiplies by the dense
+-1 weight its int32 words hold. Unpacking them is most of a small layer's host time on a CPU
(about 40-70 us of table lookups for a 64x64 weight on a 2.5 GHz Xeon, more than the product
itself), and a layer run for inference unpacks the same words at every forward and again in its
backward. :func:`dense_signs` keeps the last unpacked fp32 weight of each words tensor, with a copy
of the words it was unpacked from, and returns it while the words still equal that copy.

When an entry is valid: it belongs to the words tensor *object* (keyed by ``id``) and was made
for the same shape, strides, dtype and K, and the words compare equal (``torch.equal``) to the
copy kept in the entry. The comparison reads the words (1/32 of the dense weight: a few us for a
64x64 weight), so every write is seen, whether or not it bumps torch's version counter: Bop's
flips, ``copy_`` / ``load_state_dict``, ``words.data = other`` (even when the allocator hands the
new storage the old address), writes through ``words.data``, a NumPy view, a raw pointer, another
process writing shared memory or ``torch.distributed`` collectives writing in place.

Not cached (unpacked on every call, as without the cache): words on another device than the CPU
(the CUDA ops read words packed and never build the dense weight), tensor subclasses and
FakeTensors, functorch-wrapped tensors, inference tensors, calls under ``torch.inference_mode`` or
while ``torch.compile`` traces, and while the cache is off (:func:`set_enabled`).

Memory: each entry holds the fp32 weight (32x the words) and the copy of the words. An entry dies
with its words (a weak reference to them); the entries together hold at most :data:`MAX_BYTES`,
the least recently used dropped first (a weight larger than the cap alone is never cached).
:func:`set_enabled` turns the cache off (and empties it) for memory-bound CPU use.

A words tensor the cache has seen has a weak reference, and ``torch.utils.swap_tensors`` refuses
tensors with weak references (as ``nn.Module.to`` / ``_apply`` with
``torch.__future__.set_swap_module_params_on_conversion(True)`` uses it): call
:func:`clear_dense_signs` (which drops the weak references) before swapping such tensors.
"""

import weakref
from collections import OrderedDict

import torch

from bnnops.packing import unpack_signs_reference

__all__ = ["MAX_BYTES", "clear_dense_signs", "dense_signs", "is_enabled", "set_enabled"]

MAX_BYTES: int = 256 * 2**20
"""Cap on the bytes (dense weights plus word copies) the cache holds; set the module attribute to
change it (read at every insertion)."""

_enabled = True

# id(words) -> (weak reference to words, (shape, strides, dtype, K), copy of words, dense fp32 weight),
# least recently used first.
_DENSE: "OrderedDict[int, tuple[weakref.ref, tuple, torch.Tensor, torch.Tensor]]" = OrderedDict()


def set_enabled(enabled: bool) -> None:
    """Turn the cache on or off; off also drops every entry (their memory is freed with them)."""
    global _enabled
    _enabled = bool(enabled)
    if not _enabled:
        clear_dense_signs()


def is_enabled() -> bool:
    """Whether :func:`dense_signs` caches (:func:`set_enabled`)."""
    return _enabled


def _cacheable(words: torch.Tensor) -> bool:
    # is_compiling first: torch.compile cannot trace the other queries (it folds this one to True).
    return (
        not torch.compiler.is_compiling()
        and _enabled
        and type(words) is torch.Tensor
        and words.is_cpu
        and not words.is_inference()
        and not torch.is_inference_mode_enabled()
        and not torch._C._functorch.is_functorch_wrapped_tensor(words)
    )


def _entry_bytes(entry: tuple) -> int:
    return entry[2].nbytes + entry[3].nbytes


def dense_signs(words: torch.Tensor, K: int) -> torch.Tensor:
    """The +-1 values (..., K) in fp32 held by int32 ``words`` (..., ceil(K/32)):
    ``unpack_signs_reference(words, K, torch.float32)``, from the cache while ``words`` holds the
    values it was unpacked from (module docstring). The result is shared: read it, never write it."""
    if not _cacheable(words):
        return unpack_signs_reference(words, K, torch.float32)
    key = id(words)
    stamp = (words.shape, words.stride(), words.dtype, K)
    entry = _DENSE.get(key)
    if entry is not None and entry[0]() is words and entry[1] == stamp:
        _DENSE.move_to_end(key)
        if torch.equal(words, entry[2]):
            return entry[3]
        # The words changed in place (a Bop step): the entry keeps its weak reference and its copy
        # of the words (same shape: the same bytes, so the cap still holds) and takes the new weight.
        dense = unpack_signs_reference(words, K, torch.float32)
        _DENSE[key] = (entry[0], stamp, entry[2].copy_(words), dense)
        return dense
    dense = unpack_signs_reference(words, K, torch.float32)
    _DENSE.pop(key, None)
    new = (weakref.ref(words, lambda _, key=key: _forget(key)), stamp, words.clone(), dense)
    cap = MAX_BYTES
    if _entry_bytes(new) <= cap:
        # Summed at each insertion (a handful of entries) rather than kept in a counter that the
        # weak-reference callbacks would also have to update.
        total = _entry_bytes(new) + sum(_entry_bytes(e) for e in _DENSE.values())
        while total > cap and _DENSE:
            total -= _entry_bytes(_DENSE.popitem(last=False)[1])
        _DENSE[key] = new
    return dense


def _forget(key: int) -> None:
    # Called when a words tensor dies. A newer tensor may have taken the same id (and entry)
    # since: keep an entry whose words are alive.
    entry = _DENSE.get(key)
    if entry is not None and entry[0]() is None:
        _DENSE.pop(key, None)


def clear_dense_signs() -> None:
    """Drop every cached dense weight and the weak references to their words."""
    _DENSE.clear()
