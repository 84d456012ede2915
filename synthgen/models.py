"""The released models: an unconditional image generator and a small CNN classifier.

Both are diffusers models (``ModelMixin`` + ``ConfigMixin``), so they save as ``config.json``
plus safetensors and load with ``from_pretrained``. Images cross every model boundary in pixel
space: float tensors of shape (B, C, H, W) with values in [0, 1]. Each classifier normalises
its own input with the mean and std in its config.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F


class Generator(ModelMixin, ConfigMixin):
    """DCGAN-style generator: z ~ N(0, I) of size ``latent_dim`` to an image in [0, 1].

    Layout as in DAFL (Chen et al. 2019): linear -> (upsample x2, conv 3x3, BatchNorm,
    LeakyReLU) twice -> conv 3x3 -> tanh, rescaled from [-1, 1] to [0, 1].
    """

    @register_to_config
    def __init__(self, latent_dim: int = 100, image_size: int = 28, channels: int = 1, width: int = 64):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.init_size = image_size // 4
        self.fc = nn.Linear(latent_dim, 2 * width * self.init_size**2)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        width = self.config.width
        hidden = self.fc(z).view(z.shape[0], 2 * width, self.init_size, self.init_size)  # (B, 2W, H/4, W/4)
        return (self.blocks(hidden) + 1) / 2  # (B, C, H, W) in [0, 1]

    def sample_latents(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(count, self.config.latent_dim, generator=generator, device=self.device)


class Classifier(ModelMixin, ConfigMixin):
    """Small CNN: two blocks of (3x3 convolution, ReLU, 2x2 max-pool), then two linear layers.

    It has no BatchNorm on purpose: batch statistics taken on synthetic images would not match
    real ones at test time, and DP-SGD cannot train BatchNorm. ``norm="group"`` adds GroupNorm.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 28,
        channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 128,
        norm: str = "none",
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if norm not in ("none", "group"):
            raise ValueError(f"norm must be 'none' or 'group', got {norm!r}")
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
            if norm == "group":
                layers.append(nn.GroupNorm(min(8, c_out), c_out))
            return layers + [nn.ReLU()]

        self.features = nn.Sequential(
            *block(channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(2 * width * (image_size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate activations (B, hidden) for pixel-space input (B, C, H, W)."""
        x = (x - self._mean) / self._std
        return F.relu(self.fc1(self.features(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.embed(x))  # (B, num_classes) logits
