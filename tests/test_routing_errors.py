"""Bad input to sere.reroute fails with an error that names the problem.

    pytest tests/test_routing_errors.py
"""
import pytest
import torch

import sere

IDS = torch.tensor([[0, 1], [2, 3]])
SIM = torch.eye(4)

BAD = [
    ("ids not a tensor", lambda: sere.reroute([[0, 1]], SIM, 1, 0.1), TypeError, "topk_ids must be a torch.Tensor"),
    ("ids 1-D", lambda: sere.reroute(IDS.flatten(), SIM, 1, 0.1), ValueError, "2-D"),
    ("ids 3-D", lambda: sere.reroute(IDS[None], SIM, 1, 0.1), ValueError, "2-D"),
    ("ids float", lambda: sere.reroute(IDS.float(), SIM, 1, 0.1), TypeError, "integer"),
    ("ids bool", lambda: sere.reroute(IDS > 0, SIM, 1, 0.1), TypeError, "integer"),
    ("sim not square", lambda: sere.reroute(IDS, torch.ones(4, 3), 1, 0.1), ValueError, "square"),
    ("sim 1-D", lambda: sere.reroute(IDS, torch.ones(4), 1, 0.1), ValueError, "square"),
    ("sim integer", lambda: sere.reroute(IDS, torch.eye(4, dtype=torch.int64), 1, 0.1), TypeError, "floating"),
    ("sim NaN", lambda: sere.reroute(IDS, torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, 0.1), ValueError, "NaN"),
    ("sim inf", lambda: sere.reroute(IDS, torch.tensor([[1.0, 0.0], [float("inf"), 1.0]]), 1, 0.1), ValueError, "non-finite"),
    ("S float", lambda: sere.reroute(IDS, SIM, 1.0, 0.1), TypeError, "select_top_k must be an int"),
    ("S bool", lambda: sere.reroute(IDS, SIM, True, 0.1), TypeError, "select_top_k must be an int"),
    ("rho string", lambda: sere.reroute(IDS, SIM, 1, "0.1"), TypeError, "threshold must be a real number"),
    ("rho tensor", lambda: sere.reroute(IDS, SIM, 1, torch.tensor(0.1)), TypeError, "threshold must be a real number"),
    ("rho NaN", lambda: sere.reroute(IDS, SIM, 1, float("nan")), ValueError, "threshold must not be NaN"),
    ("unknown backend", lambda: sere.reroute(IDS, SIM, 1, 0.1, backend="cuda"), ValueError, "unknown backend"),
    ("numba on CPU", lambda: sere.reroute(IDS, SIM, 1, 0.1, backend="numba"), ValueError, "needs CUDA tensors"),
]


@pytest.mark.parametrize("name,call,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clearly(name, call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_different_devices_are_rejected():
    meta_sim = torch.eye(4, device="meta")
    with pytest.raises(ValueError, match="same device"):
        sere.reroute(IDS, meta_sim, 1, 0.1)


def test_nan_found_after_in_place_change():
    sim = torch.eye(4)
    sere.reroute(IDS, sim, 1, 0.1)  # checked once and cached
    sim[0, 1] = float("nan")  # bumps the tensor's version: checked again
    with pytest.raises(ValueError, match="NaN"):
        sere.reroute(IDS, sim, 1, 0.1)


def test_numpy_integer_settings_are_accepted():
    import numpy as np

    out = sere.reroute(IDS, SIM + 0.5, np.int64(1), np.float32(0.1), backend="torch")
    assert out.shape == IDS.shape
