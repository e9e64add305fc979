"""Triton kernels for the sparse ops, each beside its torch reference (DESIGN section 5).

Every kernel module exposes ``<op>_reference`` (plain torch, the specification) and ``<op>``
(Triton). The runtime calls a Triton kernel only where ``triton_enabled(tensor)`` says so: on a
CUDA tensor with Triton importable, or anywhere under ``TRITON_INTERPRET=1`` (the interpreter
the CPU tests use; it must be set before triton is first imported, which tests/conftest.py does).
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``'s device."""
    return HAS_TRITON and (tensor.is_cuda or INTERPRET)
