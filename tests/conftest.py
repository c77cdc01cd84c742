"""Shared test helpers."""
import pytest
import torch.nn as nn


def _randomise_bn(module: nn.Module) -> None:
    """Fresh BN (mean 0, var 1, weight 1, bias 0) is nearly the identity in eval mode, which
    would hide a BN applied at the wrong place or a statistic loaded into the wrong slot."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.fixture(scope="session")
def randomise_bn():
    return _randomise_bn
