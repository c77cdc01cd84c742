"""Shared test helpers."""
import json

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


@pytest.fixture(scope="module")
def shared_synthetic_data():
    """Generates each synthetic split once per test module instead of once per run: every run
    of an end-to-end test builds all three splits, and most of that time is the generator
    drawing 256 images for the normalisation statistics."""
    import seg.data

    cache, build = {}, seg.data.build

    def cached(data_cfg, split):
        key = (json.dumps(data_cfg.to_dict(), sort_keys=True), split)
        if key not in cache:
            cache[key] = build(data_cfg, split)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seg.data, "build", cached)
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny end-to-end runs gain nothing from intra-op threads, and on a busy 2-core machine
    OpenMP threads waiting for each other made them several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
