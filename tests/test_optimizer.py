"""The learner's AdamW: torch's fused kernel where the parameters allow it (on CPU 4-7x faster per
step than the per-tensor loop, docs/BENCHMARKS.md), with the same update."""

from __future__ import annotations

import copy

import torch

from trgrpo.config.schema import TrainerConfig
from trgrpo.learner.learner import make_optimizer


def test_one_step_by_hand():
    """From a fresh state Adam's bias-corrected moments are m = g, v = g², so the step is
    lr · g / (|g| + eps): p = 1.0, g = 0.5, lr = 0.1 → 1.0 − 0.1 · 0.5 / (0.5 + 1e-8) = 0.9 (and
    p = −2.0, g = −0.25 → −1.9); weight decay 0."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, -0.25])
    opt = make_optimizer([p], TrainerConfig(lr=0.1, weight_decay=0.0))
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([0.9, -1.9]), atol=1e-6)


def test_fused_on_cpu_and_equal_to_the_plain_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    other = copy.deepcopy(model)
    trainer = TrainerConfig(lr=1e-3, weight_decay=0.01)
    fused = make_optimizer(list(model.parameters()), trainer)
    plain = torch.optim.AdamW(other.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(5):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, fused), (other, plain)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_falls_back_where_fused_is_not_supported(monkeypatch):
    """Where torch refuses the fused kernel for these parameters, the plain AdamW, not an error."""
    real = torch.optim.AdamW

    def refusing(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of supported devices"
            )
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", refusing)
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = make_optimizer([p], TrainerConfig(lr=0.1, weight_decay=0.0))
    assert not opt.defaults.get("fused")
    p.grad = torch.tensor([0.5])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([0.9]), atol=1e-6)
