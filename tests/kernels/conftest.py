"""Kernel tests run the Triton kernels too: through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before a ``@triton.jit`` function is defined, i.e. before the first import of
``rlmf.kernels.logprobs_*_triton``; this conftest is imported before any test module here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
