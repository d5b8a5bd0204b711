"""The noise-prediction network: ``eps = model(x_t, t, labels)``.

A small UNet in the shape of the ancestor's ``ContextUnet``: two down blocks
(28 -> 14 -> 7 for MNIST's 28x28), the 7x7 bottleneck pooled to one vector, and two
up blocks with skip connections. Any square size divisible by 4 works. The timestep and the class label ("context")
modulate the decoder feature maps as ``h = context_embedding * h + time_embedding``; with ``cond_encoder``
they modulate the two encoder blocks' inputs the same way (two more small MLPs, the same convolutions); with
``ada_norm`` they also scale and shift the second group norm of every residual block (AdaGN, Dhariwal & Nichol
2021; one more small MLP, the same convolutions); ``mid_blocks`` adds residual blocks at the 7x7 bottleneck, each
input modulated the same way. With ``self_cond`` the network also reads an estimate of the clean image
(self-conditioning, Chen et al. 2022): ``eps = model(x_t, t, labels, x0_estimate)``, the estimate stacked
onto ``x_t`` as more input channels, zeros when none is given.

Conventions (the same everywhere in the project):

* ``t`` is an integer tensor of shape ``(B,)`` with values in ``[0, T-1]``;
  ``t = 0`` is the least noisy step. It is embedded here (sinusoidally, then by
  a small MLP), so the network never needs to know ``T``.
* ``labels`` is an integer tensor of shape ``(B,)`` with values in
  ``[0, n_classes-1]``, or ``null_label == n_classes`` for "no label": a
  learned embedding used when the label is dropped (classifier-free guidance).

The network knows nothing of noise schedules; ``ddpm.py`` owns those.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def modulate(h: torch.Tensor, scale_shift: torch.Tensor) -> torch.Tensor:
    """``(1 + scale) * h + shift`` for ``h (B, C, H, W)`` and ``scale_shift (B, 2C, 1, 1)``; ``1 +`` so that a
    fresh, small ``scale_shift`` starts near the identity."""
    scale, shift = scale_shift.chunk(2, dim=1)
    return (1 + scale) * h + shift


class ResidualConvBlock(nn.Module):
    """Two 3x3 conv + GroupNorm + GELU layers with a residual connection.

    ``(B, in_ch, H, W) -> (B, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.GroupNorm(8, out_ch), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, 1, 1), nn.GroupNorm(8, out_ch), nn.GELU())
        self.same_channels = in_ch == out_ch

    def forward(self, x: torch.Tensor, scale_shift: torch.Tensor | None = None) -> torch.Tensor:
        """``scale_shift (B, 2 * out_ch)``, if given, modulates the second norm: ``(1 + scale) * norm(h) + shift``."""
        h1 = self.conv1(x)
        if scale_shift is None:
            h2 = self.conv2(h1)
        else:
            conv, norm, act = self.conv2
            h2 = act(modulate(norm(conv(h1)), scale_shift[:, :, None, None]))
        # Skip from the input when shapes allow, else from the first conv; the
        # 1/sqrt(2) keeps the variance of the sum near that of its parts.
        skip = x if self.same_channels else h1
        return (skip + h2) / math.sqrt(2.0)


class Down(nn.Module):
    """``(B, in_ch, H, W) -> (B, out_ch, H/2, W/2)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(ResidualConvBlock(in_ch, out_ch), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor, scale_shift: torch.Tensor | None = None) -> torch.Tensor:
        return self.block[1](self.block[0](x, scale_shift))


class Up(nn.Module):
    """Upsample ``cat(x, skip)`` by 2: ``(B, in_ch, H, W) -> (B, out_ch, 2H, 2W)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ConvTranspose2d(in_ch, out_ch, 2, 2),
            ResidualConvBlock(out_ch, out_ch),
            ResidualConvBlock(out_ch, out_ch),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor,
                scale_shifts: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
        upsample, res1, res2 = self.block
        return res2(res1(upsample(torch.cat((x, skip), dim=1)), scale_shifts[0]), scale_shifts[1])


class EmbedMLP(nn.Module):
    """``(B, in_dim) -> (B, out_dim, 1, 1)``, ready to broadcast over feature maps."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, :, None, None]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017): ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat((torch.cos(angles), torch.sin(angles)), dim=1)


class ContextUnet(nn.Module):
    """Class-conditional UNet predicting the noise in ``x_t``.

    Args:
        in_channels: image channels (1 for MNIST).
        image_size: height and width of the (square) images, a multiple of 4.
        n_feat: base width; the bottleneck has ``2 * n_feat`` channels. Must be a
            multiple of 8 (GroupNorm uses 8 groups).
        n_classes: number of real classes; label ``n_classes`` means "no label".
        cond_encoder: also condition the encoder (the ancestor conditions the decoder only).
        ada_norm: also scale and shift the second norm of every residual block by ``(context, time)``.
        mid_blocks: residual blocks at the bottleneck (``2 * n_feat`` channels), whose output both the pooled
            vector and the decoder's skip connection read.
        self_cond: also read an estimate of the clean image, ``(B, C, H, W)`` like ``x_t`` (:meth:`forward`).
    """

    def __init__(self, in_channels: int = 1, n_feat: int = 128, n_classes: int = 10, image_size: int = 28,
                 cond_encoder: bool = False, ada_norm: bool = False, mid_blocks: int = 0,
                 self_cond: bool = False) -> None:
        super().__init__()
        if n_feat <= 0 or n_feat % 8:
            raise ValueError(f"n_feat must be a positive multiple of 8, got {n_feat}")
        if image_size <= 0 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {image_size}")
        if mid_blocks < 0:
            raise ValueError(f"mid_blocks must be >= 0, got {mid_blocks}")
        self.in_channels, self.n_feat, self.n_classes, self.image_size = in_channels, n_feat, n_classes, image_size
        self.null_label, self.self_cond = n_classes, bool(self_cond)
        bottom = image_size // 4  # side of the feature maps after two 2x poolings (7 for 28x28)
        self.build_encoder(bottom, mid_blocks)
        self.build_conditioning(bool(cond_encoder), bool(ada_norm))
        self.build_decoder(bottom)

    def build_encoder(self, bottom: int, mid_blocks: int) -> None:
        n_feat = self.n_feat
        self.init_conv = ResidualConvBlock(self.in_channels * (2 if self.self_cond else 1), n_feat)
        self.down1 = Down(n_feat, n_feat)
        self.down2 = Down(n_feat, 2 * n_feat)
        self.to_vec = nn.Sequential(nn.AvgPool2d(bottom), nn.GELU())
        # residual blocks at the bottleneck (2 * n_feat channels, bottom x bottom), each input scaled and shifted
        # by an MLP of (context, time) like the encoder's
        self.mid = nn.ModuleList(ResidualConvBlock(2 * n_feat, 2 * n_feat) for _ in range(mid_blocks))
        self.mid_embed = nn.ModuleList(EmbedMLP(2 * n_feat, 4 * n_feat) for _ in range(mid_blocks))

    def build_conditioning(self, cond_encoder: bool, ada_norm: bool) -> None:
        n_feat = self.n_feat
        self.label_embedding = nn.Embedding(self.n_classes + 1, n_feat)
        self.time_embed1 = EmbedMLP(n_feat, 2 * n_feat)
        self.time_embed2 = EmbedMLP(n_feat, n_feat)
        self.context_embed1 = EmbedMLP(n_feat, 2 * n_feat)
        self.context_embed2 = EmbedMLP(n_feat, n_feat)
        self.cond_encoder = cond_encoder
        if self.cond_encoder:  # one (scale, shift) pair per encoder block, both n_feat wide
            self.encoder_embed = nn.ModuleList(EmbedMLP(2 * n_feat, 2 * n_feat) for _ in range(2))
        self.ada_norm = ada_norm
        # widths of the residual blocks in forward order: init, down1, down2, up1 (two), up2 (two)
        self.block_widths = (n_feat, n_feat, 2 * n_feat, n_feat, n_feat, n_feat, n_feat)
        if self.ada_norm:
            self.norm_embed = nn.Sequential(nn.Linear(2 * n_feat, 2 * n_feat), nn.GELU(),
                                            nn.Linear(2 * n_feat, 2 * sum(self.block_widths)))
            # zero: a fresh network computes exactly what it would without ada_norm
            nn.init.zeros_(self.norm_embed[-1].weight)
            nn.init.zeros_(self.norm_embed[-1].bias)

    def build_decoder(self, bottom: int) -> None:
        n_feat = self.n_feat
        self.up0 = nn.Sequential(
            nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, bottom, bottom), nn.GroupNorm(8, 2 * n_feat), nn.ReLU()
        )
        self.up1 = Up(4 * n_feat, n_feat)
        self.up2 = Up(2 * n_feat, n_feat)
        self.out = nn.Sequential(
            nn.Conv2d(2 * n_feat, n_feat, 3, 1, 1),
            nn.GroupNorm(8, n_feat),
            nn.ReLU(),
            nn.Conv2d(n_feat, self.in_channels, 3, 1, 1),
        )

    def embed_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels -> context vectors ``(B, n_feat)``.

        ``labels`` is either class indices ``(B,)`` (``n_classes`` = "no label") or class weights
        ``(B, n_classes + 1)`` float, which blend the class embeddings: ``sum_k w_k * embedding_k``.
        A one-hot row gives exactly the embedding of its class.
        """
        if not labels.is_floating_point():
            return self.label_embedding(labels)
        # elementwise, not a matmul, so that autocast keeps the blend in full precision
        return (labels.float()[:, :, None] * self.label_embedding.weight[None]).sum(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise: ``x (B, C, H, W)``, ``t (B,)`` integer in ``[0, T-1]``, ``labels`` as in
        :meth:`embed_labels` -> ``(B, C, H, W)``. ``x0_estimate (B, C, H, W)`` only with ``self_cond``
        (``None``: zeros, "no estimate yet")."""
        x = self.stack_estimate(x, x0_estimate)
        context = self.embed_labels(labels)
        t_emb = timestep_embedding(t, self.n_feat)
        cond = torch.cat((context, t_emb), dim=1)  # what the optional encoder and norm modulations read
        ss = self.norm_scale_shifts(cond)
        h0 = self.init_conv(x, ss[0])
        d1 = self.down1(self.encoder_input(0, h0, cond), ss[1])
        d2 = self.middle(self.down2(self.encoder_input(1, d1, cond), ss[2]), cond)
        vec = self.to_vec(d2)

        h = self.up0(vec)
        h = self.up1(self.context_embed1(context) * h + self.time_embed1(t_emb), d2, ss[3:5])
        h = self.up2(self.context_embed2(context) * h + self.time_embed2(t_emb), d1, ss[5:7])
        return self.out(torch.cat((h, h0), dim=1))

    def stack_estimate(self, x: torch.Tensor, x0_estimate: torch.Tensor | None) -> torch.Tensor:
        """``x_t`` with the estimate stacked on as more channels when ``self_cond``: ``(B, 2C, H, W)``."""
        if not self.self_cond:
            if x0_estimate is not None:
                raise ValueError("x0_estimate needs a network built with self_cond=True")
            return x
        estimate = torch.zeros_like(x) if x0_estimate is None else x0_estimate.to(x.dtype)
        return torch.cat((x, estimate), dim=1)

    def middle(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The bottleneck blocks: ``h (B, 2 * n_feat, H/4, W/4)`` -> the same shape (``h`` itself without them)."""
        for block, embed in zip(self.mid, self.mid_embed):
            h = block(modulate(h, embed(cond)))
        return h

    def norm_scale_shifts(self, cond: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """From ``cond = (context, t_emb) (B, 2 * n_feat)``, one ``(B, 2 * width)`` scale-and-shift per residual
        block (``block_widths``), or ``None`` for each without ``ada_norm``."""
        if not self.ada_norm:
            return (None,) * len(self.block_widths)
        out = self.norm_embed(cond)
        return out.split([2 * w for w in self.block_widths], dim=1)

    def encoder_input(self, block: int, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The input of encoder block ``block``: ``h (B, n_feat, H, W)`` scaled and shifted by an MLP of
        ``cond = (context, t_emb)`` when ``cond_encoder`` (:func:`modulate`)."""
        if not self.cond_encoder:
            return h
        return modulate(h, self.encoder_embed[block](cond))
