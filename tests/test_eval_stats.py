import math

import pytest
import torch

from rto.stages.eval import mean_ci95, parse_model, win_rate


def test_mean_ci95_by_hand():
    # x = 1, 2, 3, 4: mean 2.5, sample sd sqrt(5/3) = 1.29099, half-width 1.959964 * 1.29099 / 2 = 1.26515
    mean, half = mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert half == pytest.approx(1.959964 * math.sqrt(5 / 3) / 2)


def test_win_rate_counts_ties_half():
    # wins: 1, 0.5, 0, 1 -> 0.625; sd of (1, .5, 0, 1) = sqrt(0.22917) = 0.47871; half = 1.96 * 0.47871 / 2
    rate, half = win_rate(torch.tensor([0.9, 0.5, 0.1, 0.3]), torch.tensor([0.2, 0.5, 0.4, -0.1]))
    assert rate == pytest.approx(0.625)
    assert half == pytest.approx(1.959964 * math.sqrt(0.6875 / 3) / 2)


def test_parse_model():
    assert parse_model("rto=runs/demo/rto/policy") == ("rto", "runs/demo/rto/policy")
    assert parse_model("runs/x/policy") == ("policy", "runs/x/policy")
