"""Shared test setup.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must
be set before triton is first imported, which happens only when a test loads a kernel module.
With CUDA they run natively on the GPU, and the ops' CUDA registrations are exercised too.
"""

import atexit
import os
import shutil
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from helpers import DEVICE

# Data sets generated on first use (MNIST-1D) go to a cache made for this session, never the user's.
os.environ["BNNOPS_CACHE"] = tempfile.mkdtemp(prefix="bnnops-test-cache-")
atexit.register(shutil.rmtree, os.environ["BNNOPS_CACHE"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo cache: torch.compile's recompile limit (8 entries a
    code object) counts compiled modules across the whole session otherwise, so a test would fail
    for how many others compiled before it. Resetting costs ~20 us."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


@pytest.fixture
def device():
    """Where kernel launchers run: the GPU, or the CPU under the Triton interpreter."""
    return DEVICE
