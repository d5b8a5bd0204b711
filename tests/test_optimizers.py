"""The optimizers: Muon's orthogonalisation, which parameters it steps, its first step, and Adam for the rest."""

import copy

import pytest
import torch
from torch import nn

from lib.config import Config
from lib.errors import UsageError
from lib.optimizers import MUON_MOMENTUM, MuonWithAdam, orthogonalize, split_parameters
from unet import ContextUnet


def test_orthogonalize_moves_singular_values_near_one_and_keeps_singular_vectors():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12))
    v, _ = torch.linalg.qr(torch.randn(30, 12))
    g = u @ torch.diag(torch.logspace(-1, 1, 12)) @ v.T  # (12, 30), singular values 0.1..10
    for matrix in (g, g.T):  # wide and tall
        o = orthogonalize(matrix)
        assert o.shape == matrix.shape
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.6 and s.max() < 1.2
    rotated = u.T @ orthogonalize(g) @ v  # diagonal when the singular vectors are kept
    off_diagonal = rotated - torch.diag(torch.diagonal(rotated))
    assert off_diagonal.abs().max() < 1e-4


def test_muon_takes_the_hidden_weight_matrices_and_adam_the_rest():
    net = ContextUnet(1, 8, 10)
    muon, adam = split_parameters(net)
    name = {id(p): n for n, p in net.named_parameters()}
    assert sorted(name[id(p)] for p in adam if p.ndim >= 2) == [
        "init_conv.conv1.0.weight", "label_embedding.weight", "out.3.weight"]  # input, output, embedding
    assert all(p.ndim >= 2 for p in muon) and len(muon) > 20
    assert sorted(map(id, muon + adam)) == sorted(map(id, net.parameters()))


def assert_orthogonalised(step: torch.Tensor, g: torch.Tensor, scale: float) -> None:
    """``step`` is ``-scale`` times the polar factor ``U V^T`` of ``g`` (its SVD by torch.linalg, not the code under
    test), up to the singular values between 0.6 and 1.2 that five Newton-Schulz iterations leave."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    d = u.T @ (-step / scale) @ vh.T
    assert (d - torch.diag(torch.diagonal(d))).abs().max() < 1e-3  # the same singular vectors
    assert torch.diagonal(d).min() > 0.6 and torch.diagonal(d).max() < 1.25


def test_the_first_step_is_the_orthogonalised_gradient_and_adam_steps_the_rest():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3), nn.Conv2d(6, 1, 3))
    reference = copy.deepcopy(net)
    optimizer = MuonWithAdam(net, lr=1e-2, lr_mult=3.0)
    adam = torch.optim.Adam([p for i, p in enumerate(reference.parameters()) if i != 2], lr=1e-2)
    for module in (net, reference):
        module(torch.randn(2, 1, 9, 9, generator=torch.Generator().manual_seed(1))).pow(2).mean().backward()
    hidden = net[1].weight
    before, g = hidden.detach().clone(), hidden.grad.clone()
    optimizer.step()
    adam.step()
    # Nesterov momentum starts at g + mu * g; the step is Adam-sized: 0.2 * sqrt(max(6, 36)) * lr * lr_mult
    scale = 1e-2 * 3.0 * 0.2 * 6
    assert_orthogonalised((hidden.detach() - before).reshape(6, 36), (1 + MUON_MOMENTUM) * g.reshape(6, 36), scale)
    for i, (p, q) in enumerate(zip(net.parameters(), reference.parameters())):
        if i != 2:
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    g2 = torch.randn_like(g)  # the second step follows the Nesterov momentum of both gradients
    hidden.grad, before = g2.clone(), hidden.detach().clone()
    optimizer.step()
    momentum = g2 + MUON_MOMENTUM * (MUON_MOMENTUM * g + g2)
    assert_orthogonalised((hidden.detach() - before).reshape(6, 36), momentum.reshape(6, 36), scale)


def test_the_optimizer_is_a_checked_setting():
    assert Config().training.optimizer == "adam"  # the original recipe's
    with pytest.raises(UsageError, match="optimizer"):
        Config().override(optimizer="sgd").validate()
