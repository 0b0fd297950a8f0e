import os

import pytest
import torch

# Tests run on 2 cores with other work around; keep torch's own thread pool small and deterministic.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_pix(model, seed=1):
    """Give every PiX φ and batch-norm buffer non-trivial values, so that equality tests mean something."""
    from pixify.ops import PiX

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PiX):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model
