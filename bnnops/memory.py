"""``bnnops.memory.memory_report(model)``: what training a BNN keeps in memory, measured.

Two parts, per layer and in total:

- **Bytes kept for backward** (activation memory): counted on a real training-mode forward of a
  random batch with ``torch.autograd.graph.saved_tensors_hooks``, so it is what autograd holds,
  whatever saves it (the bnnops layers, batch norm, pooling, activations). Each tensor is counted
  by the storage it keeps alive, once (a tensor saved twice, or views of one storage, count once),
  and charged to the innermost module running when it was first saved. Storages of the model's
  parameters and buffers are not counted: the model holds them anyway. Two forwards, of batch B
  and 2B, split each module's bytes into a part per sample (the difference over B: activations)
  and a fixed part (what does not grow with the batch: the binarized or packed copy of a latent
  weight, batch statistics).
- **Training state per weight**: for each binary weight (a :class:`bnnops.BinaryTensor`, or the
  latent weight of a layer with a ``weight_quantizer``) the bytes of the weight as stored (packed
  words for a BinaryTensor, the float tensor for a latent weight), of its dense gradient (in the
  weight's dtype), and of Bop's state (m, and v for the second-order variant, in ``state_dtype``);
  beside it the same weights trained as float32 latent weights with Adam: 4 bytes of weight,
  4 of gradient and 8 of Adam state (exp_avg, exp_avg_sq) per weight.
"""

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bnnops.binary_tensor import BinaryTensor
from bnnops.summary import is_binary_weight

__all__ = ["LayerMemory", "MemoryReport", "WeightState", "memory_report", "saved_bytes"]

# float32 latent weights with Adam, per weight: weight, gradient, exp_avg, exp_avg_sq.
LATENT_ADAM_BYTES_PER_WEIGHT = 16


@dataclass
class LayerMemory:
    """One module's bytes kept for backward: ``saved_bytes`` for the report's batch, split into
    ``per_sample`` bytes (times the batch) and ``fixed`` bytes (independent of the batch)."""

    name: str
    kind: str
    saved_bytes: int
    per_sample: int
    fixed: int


@dataclass
class WeightState:
    """Training state of one binary weight of ``numel`` values, in bytes."""

    name: str
    numel: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def latent_adam_bytes(self) -> int:
        """The same weight as a float32 latent weight trained by Adam."""
        return LATENT_ADAM_BYTES_PER_WEIGHT * self.numel


@dataclass
class MemoryReport:
    """Per-module saved bytes, per-weight training state and totals; ``str()`` prints a table."""

    batch: int
    layers: list[LayerMemory] = field(default_factory=list)
    weights: list[WeightState] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return sum(layer.saved_bytes for layer in self.layers)

    @property
    def saved_bytes_per_sample(self) -> int:
        return sum(layer.per_sample for layer in self.layers)

    @property
    def saved_bytes_fixed(self) -> int:
        return sum(layer.fixed for layer in self.layers)

    @property
    def binary_weights(self) -> int:
        return sum(w.numel for w in self.weights)

    @property
    def training_state_bytes(self) -> int:
        return sum(w.total_bytes for w in self.weights)

    @property
    def latent_adam_bytes(self) -> int:
        return sum(w.latent_adam_bytes for w in self.weights)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "layers": [asdict(layer) for layer in self.layers],
            "weights": [asdict(w) | {"latent_adam_bytes": w.latent_adam_bytes} for w in self.weights],
            "saved_bytes": self.saved_bytes,
            "saved_bytes_per_sample": self.saved_bytes_per_sample,
            "saved_bytes_fixed": self.saved_bytes_fixed,
            "binary_weights": self.binary_weights,
            "training_state_bytes": self.training_state_bytes,
            "latent_adam_bytes": self.latent_adam_bytes,
        }

    def __str__(self) -> str:
        lines = [
            f"Bytes kept for backward (batch {self.batch})",
            f"{'layer':<24}{'kind':<16}{'bytes':>14}{'/sample':>12}",
        ]
        for layer in self.layers:
            lines.append(f"{layer.name:<24}{layer.kind:<16}{layer.saved_bytes:>14,}{layer.per_sample:>12,.0f}")
        lines.append(f"{'total':<40}{self.saved_bytes:>14,}{self.saved_bytes_per_sample:>12,.0f}")
        lines.append("")
        lines.append("Training state of the binary weights (bytes)")
        lines.append(f"{'weight':<24}{'values':>12}{'weight':>12}{'grad':>12}{'optimizer':>12}{'latent+Adam':>14}")
        for w in self.weights:
            lines.append(
                f"{w.name:<24}{w.numel:>12,}{w.weight_bytes:>12,}{w.grad_bytes:>12,}{w.optimizer_bytes:>12,}"
                f"{w.latent_adam_bytes:>14,}"
            )
        n = max(self.binary_weights, 1)
        lines.append(
            f"{'total':<24}{self.binary_weights:>12,}{'':>36}{self.training_state_bytes:>12,}{self.latent_adam_bytes:>14,}"
        )
        lines.append(
            f"per weight: {self.training_state_bytes / n:.3f} B (bnnops) vs {self.latent_adam_bytes / n:.3f} B "
            "(float32 latent weight + Adam)"
        )
        return "\n".join(lines)


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """(device, data pointer, bytes) of the storage ``t`` keeps alive; None for a tensor without one."""
    if isinstance(t, BinaryTensor):
        t = t.words
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (str(t.device), storage.data_ptr(), storage.nbytes())


def saved_bytes(model: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """Bytes kept for backward while ``run()`` (a forward through ``model``) runs, per module name.

    Counting rules: module docstring. The key of a tensor saved outside any module of ``model``
    is ``""``. Returns a dict in the order modules first saved something, holding every module
    (including ones that saved nothing, with 0) that ran.
    """
    held = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    counted: dict[str, int] = {}
    seen: set[tuple[str, int, int]] = set()

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(names[module])
        counted.setdefault(names[module], 0)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in held and key not in seen:
            seen.add(key)
            owner = stack[-1] if stack else ""
            counted[owner] = counted.get(owner, 0) + key[2]
        return t

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    # The model itself (the root, name "") only aggregates its children.
    return counted


def _weight_states(model: nn.Module, state_dtype: torch.dtype, second_order: bool) -> list[WeightState]:
    moments = 2 if second_order else 1
    state_size = torch.empty((), dtype=state_dtype).element_size()
    states = []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not is_binary_weight(module, name, p):
                continue
            numel = p.numel()
            size = torch.empty((), dtype=p.dtype).element_size()
            stored = p.words.numel() * 4 if isinstance(p, BinaryTensor) else numel * size
            full = f"{module_name}.{name}" if module_name else name
            states.append(WeightState(full, numel, stored, numel * size, moments * numel * state_size))
    return states


def memory_report(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    batch: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype = torch.float32,
    second_order: bool = False,
    print_table: bool = False,
) -> MemoryReport:
    """Measure what training ``model`` keeps in memory (module docstring) and return a :class:`MemoryReport`.

    Args:
        model: an ``nn.Module``. It runs one forward in training mode on a random batch (batch
            norm running statistics are saved and restored; the model's mode is restored). No
            backward runs and no gradient is kept.
        input_shape: one sample without the batch dimension; default ``model.input_shape``.
        batch: the probe's batch size B (a second forward runs 2B). device, dtype: of the probe (default: the device of the
            model's first parameter, float32).
        state_dtype, second_order: Bop's m dtype, and whether v is kept too (Bop2ndOrder).
        print_table: print ``str(result)`` as well.

    Raises:
        ValueError: no ``input_shape`` and the model has no ``input_shape`` attribute, or batch < 1.
    """
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(
                "memory_report needs the shape of one input sample, e.g. memory_report(model, (3, 32, 32))"
            )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    counts = []
    try:
        model.train()
        for n in (batch, 2 * batch):
            x = torch.randn(n, *input_shape, device=device, dtype=dtype)
            with torch.enable_grad():
                counts.append(saved_bytes(model, lambda x=x: model(x)))
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)
    modules = dict(model.named_modules())
    layers = []
    for name, n in counts[0].items():
        per_sample = (counts[1].get(name, 0) - n) // batch
        if n or (name in modules and not list(modules[name].children())):
            kind = type(modules[name]).__name__ if name else "-"
            layers.append(LayerMemory(name or "(outside)", kind, n, per_sample, n - per_sample * batch))
    result = MemoryReport(batch, layers, _weight_states(model, state_dtype, second_order))
    if print_table:
        print(result)
    return result
