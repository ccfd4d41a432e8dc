"""experiments/start_densities.py on random activations: the start's rule gives every feature the same density on the
fit tokens (0 decades), one threshold per layer keeps the mean L0 at k, and every rule is measured."""

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "start_densities", Path(__file__).parents[1] / "experiments" / "start_densities.py")
start_densities = importlib.util.module_from_spec(spec)
spec.loader.exec_module(start_densities)


def test_firing_rules_on_random_activations():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=generator)
    y = torch.tanh(x @ torch.randn(16, 16, generator=generator)) + 0.1 * torch.randn(4096, 16, generator=generator)
    x_test, y_test = x[:512] + 0.01, y[:512]
    report = start_densities.study_layer(x, y, x_test, y_test, features=64, seed=0)
    assert set(report) == {"per feature", "one threshold", "norm^0.25", "norm^0.5", "norm^0.75", "membership"}
    assert report["per feature"]["decades_fit_tokens"] == pytest.approx(0, abs=1e-6)  # each fires on k/F of them
    for rule in report.values():
        assert 0 < rule["fvu"] < 1
    # one threshold per layer: L0 k on the fit tokens, so about k on tokens like them
    assert report["one threshold"]["l0"] == pytest.approx(start_densities.K, rel=0.2)
