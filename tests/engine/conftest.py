"""The tiny random V3.2 model (index_topk 12) that the engine tests run; one per test module."""

from __future__ import annotations

import pytest
import torch

from dsv32.model.transformer import DeepseekForCausalLM
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DeepseekForCausalLM(tiny_config(index_topk=12)).eval()
    randomize_(m, seed=3)
    return m
