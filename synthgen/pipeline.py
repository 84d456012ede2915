"""The released sampler: a diffusers pipeline that draws labelled synthetic images.

It holds the DP generator and the DP student and nothing else, so sampling from it is
post-processing of the DP release and costs no privacy. Labels always come from the student.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch.nn import functional as F

from .models import Classifier, Generator

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class DPSDPipelineOutput(BaseOutput):
    """Images with the student's labels.

    Args:
        images: a list of PIL images, a float32 array (N, H, W, C) or a float tensor (N, C, H, W), with
            values in [0, 1] that are multiples of 1/255 (8-bit pixels).
        labels: the student's class index per image, int64, shape (N,).
        confidences: the student's softmax probability of that label, float32, shape (N,).
        class_names: the student's class names, indexed by label.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    labels: np.ndarray | torch.Tensor
    confidences: np.ndarray | torch.Tensor
    class_names: list[str]


class DPSDPipeline(DiffusionPipeline):
    """Sample images from the DP generator and label them with the DP student.

    Args:
        generator: the image generator (latent z ~ N(0, I) to an image in [0, 1]).
        student: the classifier that labels the generated images.
    """

    model_cpu_offload_seq = "generator->student"

    def __init__(self, generator: Generator, student: Classifier):
        super().__init__()
        self.register_modules(generator=generator, student=student)

    @property
    def class_names(self) -> list[str]:
        names = self.student.config.class_names
        return list(names) if names else [str(i) for i in range(self.student.config.num_classes)]

    def _class_indices(self, class_labels: list[int | str]) -> list[int]:
        names = self.class_names
        indices = []
        for label in class_labels:
            if isinstance(label, str) and label in names:
                indices.append(names.index(label))
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(names):
                indices.append(int(label))
            else:
                raise ValueError(f"class label {label!r} is not one of the student's classes: indices 0 to "
                                 f"{len(names) - 1} or names {names}")
        return indices

    @torch.no_grad()
    def _draw(self, count: int, rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generate `count` images, round them to 8 bits and label them with the student."""
        latents = randn_tensor((count, self.generator.config.latent_dim), generator=rng, device=self.device,
                               dtype=self.generator.dtype)  # (B, latent_dim)
        images = self.generator(latents)  # (B, C, H, W) in [0, 1]
        # The student labels the 8-bit image the caller receives, as it did during training.
        images = (images.clamp(0, 1) * 255).round() / 255
        probs = F.softmax(self.student(images.to(self.student.dtype)).float(), dim=1)  # (B, classes)
        confidences, labels = probs.max(dim=1)
        return images, labels, confidences

    @torch.no_grad()
    def __call__(
        self,
        num_images: int | None = None,
        class_labels: list[int | str] | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        batch_size: int = 256,
        max_images_drawn: int | None = None,
        return_dict: bool = True,
    ) -> DPSDPipelineOutput | tuple:
        """Draw labelled synthetic images.

        Args:
            num_images (`int`, *optional*): number of images. Required unless `class_labels` is
                given; if both are given they must agree.
            class_labels (`list[int | str]`, *optional*): the class of each requested image, by
                index or name. Images are drawn and labelled by the student until every position
                is filled, so image i has student label `class_labels[i]`.
            generator (`torch.Generator`, *optional*): source of the latents. The same seed, on a
                generator of the same device type, with the same `batch_size`, gives the same images.
            output_type (`str`, defaults to `"pil"`): `"pil"` (list of PIL images, mode L or RGB),
                `"np"` (float32 array (N, H, W, C)) or `"pt"` (float tensor (N, C, H, W) on the CPU).
            batch_size (`int`, defaults to 256): images generated per forward pass.
            max_images_drawn (`int`, *optional*): the most images to generate while filling
                `class_labels` before giving up; defaults to max(100 x requested, 10 x batch_size).
            return_dict (`bool`, defaults to `True`): return a `DPSDPipelineOutput` instead of the
                tuple (images, labels, confidences).

        Raises:
            ValueError: for an invalid argument, or when the generator did not produce enough
                images of a requested class within `max_images_drawn`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        requested = None if class_labels is None else self._class_indices(list(class_labels))
        if requested is not None:
            if num_images is not None and num_images != len(requested):
                raise ValueError(f"num_images ({num_images}) must equal len(class_labels) ({len(requested)})")
            num_images = len(requested)
        if num_images is None or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1 (or pass class_labels), got {num_images!r}")

        # BatchNorm in training mode would make each image depend on its batch and would update
        # the generator's running statistics, so sampling uses the stored statistics.
        self.generator.eval()
        self.student.eval()

        # 1. draw images until the request is met
        if requested is None:
            images, labels, confidences = self._sample_unconditional(num_images, generator, batch_size)
        else:
            limit = max_images_drawn if max_images_drawn is not None else max(100 * num_images, 10 * batch_size)
            images, labels, confidences = self._sample_classes(requested, generator, batch_size, limit)

        # 2. convert to the requested output type
        images, labels, confidences = images.cpu().float(), labels.cpu(), confidences.cpu().float()
        if output_type == "pt":
            output = (images, labels, confidences)
        else:
            array = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
            output_images = array if output_type == "np" else self.numpy_to_pil(array)
            output = (output_images, labels.numpy(), confidences.numpy())
        self.maybe_free_model_hooks()
        if not return_dict:
            return output
        return DPSDPipelineOutput(images=output[0], labels=output[1], confidences=output[2],
                                  class_names=self.class_names)

    def _progress(self, total: int):
        # DiffusionPipeline.progress_bar passes disable=False, which overrides TQDM_DISABLE;
        # tqdm's own default honours it (and set_progress_bar_config still applies).
        return tqdm(total=total, desc="sampling", unit="img", **getattr(self, "_progress_bar_config", {}))

    def _sample_unconditional(self, count: int, rng, batch_size: int):
        parts = []
        with self._progress(count) as progress:
            drawn = 0
            while drawn < count:
                size = min(batch_size, count - drawn)
                parts.append(self._draw(size, rng))
                drawn += size
                progress.update(size)
        return tuple(torch.cat(column) for column in zip(*parts))

    def _sample_classes(self, requested: list[int], rng, batch_size: int, limit: int):
        """Fill each requested position with the next drawn image the student gives that class."""
        pending: dict[int, deque[int]] = {}
        for position, label in enumerate(requested):
            pending.setdefault(label, deque()).append(position)
        slots: list[tuple | None] = [None] * len(requested)
        drawn = 0
        with self._progress(len(requested)) as progress:
            while any(pending.values()):
                if drawn >= limit:
                    missing = {self.class_names[c]: len(p) for c, p in pending.items() if p}
                    raise ValueError(
                        f"after {drawn} generated images the student has not labelled enough of them as the "
                        f"requested classes; still missing {missing}. The generator rarely produces these classes: "
                        "request fewer images of them or raise max_images_drawn"
                    )
                images, labels, confidences = self._draw(batch_size, rng)
                drawn += batch_size
                for index, label in enumerate(labels.tolist()):
                    if pending.get(label):
                        slots[pending[label].popleft()] = (images[index], labels[index], confidences[index])
                        progress.update(1)
        images, labels, confidences = zip(*slots)
        return torch.stack(images), torch.stack(labels), torch.stack(confidences)
