"""The optimizers: Adam, or Muon (Jordan et al. 2024) for the hidden weight matrices and Adam for the rest.

Muon steps each hidden layer along its Nesterov momentum, viewed as a matrix ``(out, in * kh * kw)``, made
semi-orthogonal by Newton-Schulz iterations (every singular value about 1), so that every direction learns at
the same rate; the step is scaled to an Adam step's size, ``0.2 * sqrt(max(rows, cols))`` (Liu et al. 2025).
"""

import torch
from torch import nn
from torch.optim.adam import adam

from lib.speed import Speed

OPTIMIZERS = ("adam", "muon")
# The quintic iteration's coefficients (Jordan et al. 2024): they push singular values in (0, 1] to about 0.7-1.2
# in 5 steps, which is as orthogonal as the step needs and far cheaper than an SVD.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
MUON_MOMENTUM = 0.95
MUON_LR_MULT = 2.0  # Muon's learning rate as a multiple of Adam's


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """``g (m, n)`` with its singular values moved to about 1 and its singular vectors kept: ``~ U V^T``."""
    x = g / (g.norm() + 1e-7)  # singular values into (0, 1], where the iteration converges
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(muon, adam)``: the hidden weight matrices (every convolution's and linear layer's but the network's first
    and last convolution), and everything else."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    convs = [m for m in layers if not isinstance(m, nn.Linear)]
    outer = [convs[0], convs[-1]] if convs else []
    hidden = {id(m.weight) for m in layers if all(m is not o for o in outer)}
    params = list(model.parameters())
    return [p for p in params if id(p) in hidden], [p for p in params if id(p) not in hidden]


class MuonWithAdam(torch.optim.Optimizer):
    """Muon on the group ``muon=True``, Adam on the rest: one optimizer to the schedule and the checkpoint."""

    def __init__(self, model: nn.Module, lr: float, lr_mult: float = MUON_LR_MULT, fused: bool = False) -> None:
        muon, adam = split_parameters(model)
        groups = [{"params": muon, "muon": True}, {"params": adam, "muon": False}]
        # "fused" is where torch's loader of a saved state looks to put Adam's step counts on the device
        super().__init__(groups, {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "lr_mult": lr_mult, "fused": fused})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            (self.muon_step if group["muon"] else self.adam_step)(group, params)

    def muon_step(self, group: dict, params: list[nn.Parameter]) -> None:
        for p in params:
            state = self.state[p]
            if not state:  # not setdefault: that would allocate a zero buffer at every step
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.mul_(MUON_MOMENTUM).add_(p.grad)
            nesterov = p.grad.add(buf, alpha=MUON_MOMENTUM)
            matrix = nesterov.reshape(len(nesterov), -1)
            scale = 0.2 * max(matrix.shape) ** 0.5  # an Adam-sized step (Liu et al. 2025)
            p.add_(orthogonalize(matrix).reshape(p.shape), alpha=-group["lr"] * group["lr_mult"] * scale)

    def adam_step(self, group: dict, params: list[nn.Parameter]) -> None:
        for p in params:
            if not self.state[p]:
                step = torch.zeros((), device=p.device if group["fused"] else "cpu")  # where Adam keeps it
                self.state[p] = {"step": step, "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], [s["step"] for s in states], fused=group["fused"] or None, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=0.0, eps=group["eps"], maximize=False)


def make_optimizer(model: nn.Module, lr: float, speed: Speed, kind: str = "adam") -> torch.optim.Optimizer:
    """The training's optimizer: ``kind`` is one of :data:`OPTIMIZERS`."""
    if kind == "muon":
        return MuonWithAdam(model, lr, fused=speed.fused_optimizer)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=speed.fused_optimizer or None)
