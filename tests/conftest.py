import os

import pytest
import torch

# Triton reads this when first imported: without a GPU, tests/test_kernels.py runs the kernels in
# Triton's CPU interpreter. Set here, before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from specdec_lib.models import TINY_TARGET, TINY_DRAFT  # noqa: E402
from specdec_lib.qwen2 import random_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_target():
    return random_model(TINY_TARGET, seed=0)


@pytest.fixture(scope="session")
def tiny_draft():
    return random_model(TINY_DRAFT, seed=1)


@pytest.fixture(scope="session")
def tiny_prompts():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 5000, (n,), generator=g).tolist() for n in (1, 7, 30)]
