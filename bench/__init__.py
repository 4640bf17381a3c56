"""bnnops benchmarks, run from a checkout: ``python -m bench`` (see bench/README.md).

A kernel's cases live in one module under ``bench/cases/``, written with :func:`case` and
:class:`Workload`; ``python -m bench``, the pytest-benchmark suite (``bench/test_suite.py``) and the
smoke test (``tests/test_bench.py``) all read the one registry. Block-config sweeps that time the
public ops live in ``bench/sweeps/``; the training evidence (Bop against latent-weight Adam, the
BinaryNet training step on a GPU) in ``bench/train_evidence.py``.
"""

from bench.registry import Workload, case, load_cases

__all__ = ["Workload", "case", "load_cases"]
