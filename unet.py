"""The network, ``out = model(x_t, t, labels)``: a ``ContextUnet``, two down blocks (28 -> 14 -> 7),
the bottleneck pooled to a vector, two up blocks with skips; time and label modulate the decoder (``h = context
* h + time``), and with ``cond_encoder`` the encoder too. ``t (B,)`` in ``[0, T-1]`` is embedded here, so the
network needs no ``T`` and knows no schedule; ``labels (B,)`` are classes or ``null_label`` ("no label").
"""

import math

import torch
from torch import nn


class ResidualConvBlock(nn.Module):
    """Two 3x3 conv + GroupNorm + GELU layers with a residual connection: ``(B, in_ch, H, W) -> (B, out_ch, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.GroupNorm(8, out_ch), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 3, 1, 1), nn.GroupNorm(8, out_ch), nn.GELU())
        self.same_channels = in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.conv1(x)
        # skip from the input when shapes allow, else from the first conv; the 1/sqrt(2) keeps the variance of
        # the sum near that of its parts
        return ((x if self.same_channels else h1) + self.conv2(h1)) / math.sqrt(2.0)


class Down(nn.Module):
    """``(B, in_ch, H, W) -> (B, out_ch, H/2, W/2)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(ResidualConvBlock(in_ch, out_ch), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Up(nn.Module):
    """Upsample ``cat(x, skip)`` by 2: ``(B, in_ch, H, W) -> (B, out_ch, 2H, 2W)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, 2), ResidualConvBlock(out_ch, out_ch),
                                   ResidualConvBlock(out_ch, out_ch))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat((x, skip), dim=1))


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
    """Class-conditional UNet, ``n_feat`` wide (a multiple of 8), ``n_classes`` classes and "no label", images of
    side ``image_size`` (a multiple of 4); ``cond_encoder``: time and label modulate the encoder too."""

    def __init__(self, in_channels: int = 1, n_feat: int = 128, n_classes: int = 10, image_size: int = 28,
                 cond_encoder: bool = False) -> None:
        super().__init__()
        if n_feat <= 0 or n_feat % 8:
            raise ValueError(f"n_feat must be a positive multiple of 8, got {n_feat}")
        if image_size <= 0 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {image_size}")
        self.in_channels, self.n_feat, self.n_classes, self.image_size = in_channels, n_feat, n_classes, image_size
        self.null_label, self.cond_encoder = n_classes, bool(cond_encoder)
        bottom = image_size // 4  # side of the feature maps after two 2x poolings (7 for 28x28)
        self.init_conv = ResidualConvBlock(in_channels, n_feat)
        self.down1, self.down2 = Down(n_feat, n_feat), Down(n_feat, 2 * n_feat)
        self.to_vec = nn.Sequential(nn.AvgPool2d(bottom), nn.GELU())
        self.label_embedding = nn.Embedding(n_classes + 1, n_feat)
        self.time_embed1, self.time_embed2 = EmbedMLP(n_feat, 2 * n_feat), EmbedMLP(n_feat, n_feat)
        self.context_embed1, self.context_embed2 = EmbedMLP(n_feat, 2 * n_feat), EmbedMLP(n_feat, n_feat)
        if self.cond_encoder:  # one (scale, shift) pair per encoder block, both n_feat wide
            self.encoder_embed = nn.ModuleList(EmbedMLP(2 * n_feat, 2 * n_feat) for _ in range(2))
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, bottom, bottom),
                                 nn.GroupNorm(8, 2 * n_feat), nn.ReLU())
        self.up1, self.up2 = Up(4 * n_feat, n_feat), Up(2 * n_feat, n_feat)
        self.out = nn.Sequential(nn.Conv2d(2 * n_feat, n_feat, 3, 1, 1), nn.GroupNorm(8, n_feat), nn.ReLU(),
                                 nn.Conv2d(n_feat, in_channels, 3, 1, 1))

    def embed_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels -> ``(B, n_feat)``: indices ``(B,)``, or class weights ``(B, n_classes + 1)`` that blend them."""
        if not labels.is_floating_point():
            return self.label_embedding(labels)
        # elementwise, not a matmul, so that autocast keeps the blend in full precision
        return (labels.float()[:, :, None] * self.label_embedding.weight[None]).sum(1)

    def encoder_input(self, block: int, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Encoder block ``block``'s input, ``(1 + scale) h + shift`` from an MLP of ``cond`` with ``cond_encoder``."""
        if not self.cond_encoder:
            return h
        scale, shift = self.encoder_embed[block](cond).chunk(2, dim=1)
        return (1 + scale) * h + shift

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` in ``[0, T-1]``, ``labels`` (:meth:`embed_labels`) -> ``(B, C, H, W)``."""
        context, t_emb = self.embed_labels(labels), timestep_embedding(t, self.n_feat)
        cond = torch.cat((context, t_emb), dim=1)
        h0 = self.init_conv(x)
        d1 = self.down1(self.encoder_input(0, h0, cond))
        d2 = self.down2(self.encoder_input(1, d1, cond))
        h = self.up0(self.to_vec(d2))
        h = self.up1(self.context_embed1(context) * h + self.time_embed1(t_emb), d2)
        h = self.up2(self.context_embed2(context) * h + self.time_embed2(t_emb), d1)
        return self.out(torch.cat((h, h0), dim=1))
