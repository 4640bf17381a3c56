"""The ``torch.ops.bnnops`` ops: schemas, input checks, CPU references, CUDA launcher calls, fakes.

- :mod:`bnnops.ops.library`: how an op is defined (:func:`~bnnops.ops.library.define`) and why an
  op result refuses backward.
- :mod:`bnnops.ops.checks`: argument checks the op families share, and the error types of bad
  input (``ShapeError``, ``DtypeError``, ``DeviceError``: each also a ``RuntimeError``, as torch's).
- :mod:`bnnops.ops.reference`: the pure-PyTorch references, the CPU body of each op.
- :mod:`bnnops.ops.linear`: ``binary_linear_w1a1``, ``binary_linear_w1a16``, ``binary_linear_grad_input``.
- :mod:`bnnops.ops.conv`: ``binary_conv2d``, ``binary_conv2d_packed`` (x given as its sign words).
- :mod:`bnnops.ops.backward`: the backward ops over a layer's packed saved input
  (``binary_linear_grad_weight``, ``binary_linear_grad_input_masked``, ``binary_conv2d_grad_weight``,
  ``binary_conv2d_grad_input``).

``pack_signs`` and ``unpack_signs`` are defined with their format in :mod:`bnnops.packing`. The ops
have no derivative: :func:`bnnops.binary_linear` and :func:`bnnops.binary_conv2d` define it.
Importing an op family's module registers its ops; this package imports none of them, because
:mod:`bnnops.packing` imports :mod:`bnnops.ops.library` and the op modules import
:mod:`bnnops.packing`.
"""
