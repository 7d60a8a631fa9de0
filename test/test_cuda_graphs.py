"""The CUDA-graph chunk runtime (quantvla_core.cuda_graphs): what can be checked without a GPU.

The replay itself needs CUDA: benchmarks/gpu_check.py compares a graphed Policy's chunk with the
eager one on the device, and `benchmarks/e2e.py --exec graph` times it. Here: the refusals off
CUDA, the shape key that decides when a new set of graphs is captured, and that eager policies
are untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantvla_core.cuda_graphs import ChunkGraphs, shape_key
from quantvla_core.models import Batch
from quantvla_core.policy import Observation, Policy


def _batch(cams=2, tokens=12, b=1):
    return Batch(
        torch.zeros(b, cams, 3, 32, 32),
        torch.ones(b, cams, dtype=torch.bool),
        torch.zeros(b, tokens, dtype=torch.long),
        torch.ones(b, tokens, dtype=torch.bool),
        torch.zeros(b, 4),
    )


def test_graphs_are_refused_off_cuda_with_the_reason():
    policy = Policy.load("tiny")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; this policy runs on cpu"):
        ChunkGraphs(policy.model, 3, "cpu")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; this policy runs on cpu"):
        Policy.load("tiny", cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        policy.use_cuda_graphs(True)
    assert not policy.cuda_graphs
    policy.use_cuda_graphs(False)  # switching off is always fine
    obs = Observation(
        images=[np.zeros((32, 32, 3), np.uint8)], instruction="pick", state=np.zeros(policy.state_dim, np.float32)
    )
    a = policy.predict(obs, seed=1).actions
    assert np.array_equal(a, Policy.load("tiny").predict(obs, seed=1).actions)


def test_shape_key_separates_what_a_graph_cannot_replay():
    noise = torch.zeros(1, 8, 4)
    base = shape_key(_batch(), noise)
    assert shape_key(_batch(), noise) == base  # values never matter, only shapes and dtypes
    assert shape_key(_batch(cams=1), noise) != base  # a camera left out
    assert shape_key(_batch(tokens=13), noise) != base  # another prompt length
    assert shape_key(_batch(b=2), torch.zeros(2, 8, 4)) != base
    assert shape_key(_batch(), noise.double()) != base
