"""The devices a test can run on: CPU always, CUDA where a GPU is present.

CI has no GPU, so the CUDA cases skip there; they were run on a GPU machine (see
docs/reliability.md, "On a GPU").
"""

from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
"""For ``@pytest.mark.parametrize("device", DEVICES)``."""
