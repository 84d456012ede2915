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
        hidden = self.fc(z.to(self.fc.weight.dtype)).view(z.shape[0], 2 * width, self.init_size, self.init_size)
        features = self.blocks[:-2](hidden)  # (B, W, H, W)
        # The last convolution may be kept in float32 while the rest runs in bfloat16 (see
        # synthgen.sampling.prepare_pipeline); the image then leaves it in float32.
        last = self.blocks[-2]
        return (self.blocks[-1](last(features.to(last.weight.dtype))) + 1) / 2  # (B, C, H, W) in [0, 1]

    def sample_latents(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(count, self.config.latent_dim, generator=generator, device=self.device)


# Scattering front end of ``frontend="scatter"``: Morlet wavelets at J scales and L angles, up to
# order 2, as in Tramer and Boneh, "Differentially Private Learning Needs Better Features (or Much
# More Data)", ICLR 2021. The filters are fixed and data-independent, so under DP-SGD only the
# head spends privacy, and the features of the private set can be computed once.
SCATTER_J = 2
SCATTER_L = 8
SCATTER_CHANNELS = 1 + SCATTER_J * SCATTER_L + SCATTER_L**2 * SCATTER_J * (SCATTER_J - 1) // 2  # 81 per input channel
# GroupNorm of the scattering channels in groups of 3, without learned scale or shift: it replaces
# data normalisation, whose statistics would have to be estimated privately.
SCATTER_GROUP_SIZE = 3


def _scattering(image_size: int) -> nn.Module:
    # kymatio 0.3's ``kymatio.torch`` also loads the 3-D frontend, which imports
    # ``scipy.special.sph_harm``, absent from SciPy 1.17. The 2-D frontend does not import it.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    module = ScatteringTorch2D(J=SCATTER_J, shape=(image_size, image_size), L=SCATTER_L, max_order=2)
    # The filters follow from (J, L, shape); keeping them out of the state dict keeps the weights
    # file to what was learned.
    module._non_persistent_buffers_set.update(module._buffers)
    return module


class StandardizedConv2d(nn.Conv2d):
    """A convolution whose weights are standardised per output channel at every call.

    Weight standardisation (Qiao et al. 2019) makes the layer's output invariant to the scale and
    offset of each output channel's weights. The stored weights are the raw ones, and the
    standardisation is part of the forward pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        var = weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (weight - mean) / torch.sqrt(var + 1e-5), self.bias)


class Classifier(ModelMixin, ConfigMixin):
    """Small image classifier with one of two front ends, then linear layers.

    ``frontend="pixels"`` (default): two blocks of (3x3 convolution, ReLU, 2x2 max-pool), then two
    linear layers; ``norm="group"`` adds GroupNorm after each convolution, and
    ``weight_standardization`` standardises the convolutions' weights. ``frontend="scatter"``:
    a fixed wavelet scattering transform (81 channels per input channel at a quarter of the image
    size), GroupNorm without parameters, then the head. ``head="dense"`` (default): a linear layer
    (``hidden=0``) or two. ``head="conv"``: a 3x3 convolution of stride 2 to ``width`` channels, a
    3x3 convolution to ``2 * width`` and a hidden layer, each followed by tanh, then the output
    layer. This is the ScatterNet+CNN of Tramer and Boneh (2021, github.com/ftramer/Handcrafted-DP).

    It has no BatchNorm on purpose: batch statistics taken on synthetic images would not match
    real ones at test time, and DP-SGD cannot train BatchNorm.
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
        frontend: str = "pixels",
        weight_standardization: bool = False,
        head: str = "dense",
    ):
        super().__init__()
        if norm not in ("none", "group"):
            raise ValueError(f"norm must be 'none' or 'group', got {norm!r}")
        if frontend not in ("pixels", "scatter"):
            raise ValueError(f"frontend must be 'pixels' or 'scatter', got {frontend!r}")
        if head not in ("dense", "conv"):
            raise ValueError(f"head must be 'dense' or 'conv', got {head!r}")
        if head == "conv" and (frontend != "scatter" or hidden < 1):
            raise ValueError("head='conv' needs frontend='scatter' and hidden >= 1 (the pixels front end is already "
                             f"convolutional), got frontend={frontend!r}, hidden={hidden}")
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        if hidden < (1 if frontend == "pixels" else 0):
            raise ValueError(f"hidden must be >= 1 (>= 0 with frontend='scatter'), got {hidden}")
        if weight_standardization and (frontend != "pixels" or norm != "group"):
            raise ValueError("weight_standardization needs frontend='pixels' and norm='group' (the standardised "
                             f"convolutions rely on GroupNorm), got frontend={frontend!r}, norm={norm!r}")

        if frontend == "scatter":
            self.scattering = _scattering(image_size)
            scatter_channels = channels * SCATTER_CHANNELS
            norm_layer = nn.GroupNorm(scatter_channels // SCATTER_GROUP_SIZE, scatter_channels, affine=False)
            if head == "conv":
                self.features = nn.Sequential(
                    norm_layer,
                    nn.Conv2d(scatter_channels, width, 3, stride=2, padding=1), nn.Tanh(),
                    nn.Conv2d(width, 2 * width, 3, padding=1), nn.Tanh(),
                )
                side = (image_size // 4 + 1) // 2  # the stride-2 convolution halves the side, rounding up
                flat = 2 * width * side**2
            else:
                self.features = norm_layer
                flat = scatter_channels * (image_size // 4) ** 2
        else:
            def block(c_in: int, c_out: int) -> list[nn.Module]:
                conv = StandardizedConv2d if weight_standardization else nn.Conv2d
                layers: list[nn.Module] = [conv(c_in, c_out, 3, padding=1)]
                if norm == "group":
                    layers.append(nn.GroupNorm(min(8, c_out), c_out))
                return layers + [nn.ReLU()]

            self.features = nn.Sequential(
                *block(channels, width), nn.MaxPool2d(2),
                *block(width, 2 * width), nn.MaxPool2d(2),
            )
            flat = 2 * width * (image_size // 4) ** 2
        self.fc1 = nn.Linear(flat, hidden) if hidden else None
        self.fc2 = nn.Linear(hidden or flat, num_classes)
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the per-image front end's output, flattened (B, D), for pixel-space input (B, C, H, W).

        Each row depends on its own image only, so the input may be split into chunks.
        """
        x = (x - self._mean) / self._std
        if self.config.frontend == "scatter":
            # (B, C, H, W) -> (B, C, 81, H/4, W/4) -> (B, 81 C, H/4, W/4)
            x = self.scattering(x.contiguous()).flatten(1, 2)
        return self.features(x).flatten(1)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Map `image_features` output to the penultimate activations."""
        if self.fc1 is None:
            return features
        hidden = self.fc1(features)
        return torch.tanh(hidden) if self.config.head == "conv" else F.relu(hidden)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate activations (B, D) for pixel-space input (B, C, H, W)."""
        return self.embed_features(self.image_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.embed(x))  # (B, num_classes) logits
