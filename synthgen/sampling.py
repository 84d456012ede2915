"""Deterministic sampling from a DPSDPipeline: sample i of a seed is the same in any process.

Sample i is image i % BLOCK_SIZE of block i // BLOCK_SIZE. The latents of block b come from a
CPU `torch.Generator` seeded with a hash of (seed, b), and every block is generated whole. So
sample i does not depend on which other samples a caller requests, on the shard size, or on the
number of processes. The student labels the 8-bit image that is returned, in float64: in float32
its logits changed in the last bits with the number of CPU threads (torch 2.13 on CPU), which
would make labels and confidences depend on how many processes share a machine.

On a CPU, a block goes through the models in chunks of CPU_CHUNK images. Every activation of a
256-image block is tens of MB, which glibc's malloc maps fresh (and page-faults) on every call,
so the whole block ran about 1.5 to 2 times slower than in chunks on 2 cores (torch 2.13).
Chunking gives the bit-identical output: the generator and the student's convolutions work per
image, and the student's linear layers still see the whole block, whose matrix product
(MKL addmm) otherwise changes in the last bits of float64 with the number of rows.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

BLOCK_SIZE = 256  # latents per seeded block; part of every dataset's definition, never change it
CPU_CHUNK = 32  # images per forward pass on a CPU; any value gives the same output (see the module docstring)
# Generator precisions of a build. "bfloat16" runs every layer but the last convolution in
# bfloat16 with channels-last tensors. On a CPU with AMX it ran about 3 to 5 times faster than
# float32 (torch 2.13). Its images differ slightly, so the precision is part of a dataset's definition.
PRECISIONS = ("float32", "bfloat16")
SAMPLER = (f"sample i is image i mod {BLOCK_SIZE} of block i div {BLOCK_SIZE}; a block's latents come from a CPU "
           "torch.Generator seeded with the first 8 bytes of sha256('synthgen-dataset/<seed>/<block>'), read "
           "little-endian with the top bit cleared; images "
           "rounded to 8 bits; the student's logits in float64, its softmax (labels, confidences, "
           "probabilities) in float32")
# Samples a per-class plan may draw before it gives up, per requested row (as DPSDPipeline does).
MAX_DRAWS_PER_ROW = 100

# Transforms a build may apply to each generated image before the student labels it. They use
# only seeded random numbers, never private data, so they are post-processing too.
# "affine": a random rotation, scale, horizontal shear and shift, in the ranges below, with
# bilinear resampling and black outside the image.
# "hflip": a mirror image with probability 1/2, for classes that look alike mirrored (clothing).
# "mixup": with probability MIXUP_PROBABILITY, a blend of the image with another image of the
# same block. The student labels the blend itself, so the row's targets are its probabilities
# on the blend, not a blend of two labels. Such rows lie between the generator's modes, near the
# student's decision boundaries.
# The ranges, and which uniform number sets which parameter (see affine_forward and
# augment_images), define every dataset built with a transform. Never change them: add a
# transform under a new name instead.
AUGMENTATIONS = ("affine", "hflip", "mixup")
AFFINE_ROTATION_DEGREES = 12.0  # either way
AFFINE_SCALE = 0.1  # scale in [0.9, 1.1]
AFFINE_SHEAR = 0.15  # shear factor, either way
AFFINE_SHIFT = 1 / 14  # fraction of the side in each axis, either way: 2 pixels at 28
# Share of images blended. The rest stay as generated, so the generator's modes stay in the rows.
MIXUP_PROBABILITY = 0.5


class SamplingError(ValueError):
    """The generator cannot produce the requested samples; the message states what to change."""


def block_seed(seed: int, block: int, purpose: str | None = None) -> int:
    """Return the torch seed of one block's latents, or with `purpose` of its other random numbers.

    The seed is 63 bits of sha256 over (seed, block) or (seed, block, purpose).
    """
    key = f"synthgen-dataset/{seed}/{block}" + (f"/{purpose}" if purpose else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def parse_augment(spec: str | None) -> tuple[str, ...]:
    """Return the transforms of an augmentation spec: "none", or names from AUGMENTATIONS joined by "+".

    Raises:
        SamplingError: an unknown or repeated name.
    """
    if spec is None or spec == "none":
        return ()
    names = tuple(spec.split("+")) if isinstance(spec, str) else ()
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise SamplingError(f"augment must be 'none' or names from {', '.join(AUGMENTATIONS)} joined by '+' (each "
                            f"once), for example 'affine' or 'affine+hflip'; got {spec!r}")
    return tuple(name for name in AUGMENTATIONS if name in names)  # in the order they are applied


def describe_augment(spec: str | None) -> str:
    """Return the sampler's wording for an augmentation spec, for the manifest and the card."""
    names = parse_augment(spec)
    parts = []
    if "affine" in names:
        parts.append(f"a random affine transform (rotation up to {AFFINE_ROTATION_DEGREES:g} degrees, scale "
                     f"{1 - AFFINE_SCALE:g} to {1 + AFFINE_SCALE:g}, horizontal shear up to {AFFINE_SHEAR:g}, shift "
                     f"up to 1/{round(1 / AFFINE_SHIFT)} of the side, bilinear, black outside)")
    if "hflip" in names:
        parts.append("a horizontal mirror with probability 1/2")
    if "mixup" in names:
        parts.append(f"with probability {MIXUP_PROBABILITY:g}, a blend (1 - w) * image + w * partner with w uniform in "
                     "[0, 1) and the partner drawn from the same block by a random permutation")
    if not parts:
        return ""
    return ("before labelling, each image gets " + " and ".join(parts) + ", drawn from a CPU torch.Generator seeded "
            "as the latents are, from sha256('synthgen-dataset/<seed>/<block>/augment')")


def affine_forward(uniform):
    """Return the forward maps (B, 2, 2) and shifts (B, 2) of "affine" from uniform numbers (B, 6) in [-1, 1).

    The map is scale * rotation * shear in affine_grid's coordinates (x to the right, y down, a square image's side
    spans 2), so the stated ranges hold for the image as written. Column 0 sets the angle, 1 the scale,
    2 the horizontal shear and 3 and 4 the shift; column 5 is the mirror's.
    """
    import torch

    angle = uniform[:, 0] * math.radians(AFFINE_ROTATION_DEGREES)
    scale = 1 + uniform[:, 1] * AFFINE_SCALE
    shear = uniform[:, 2] * AFFINE_SHEAR
    shift = uniform[:, 3:5] * AFFINE_SHIFT * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], dim=1), torch.stack([sin, cos], dim=1)], dim=1)
    shearing = torch.zeros_like(rotation)
    shearing[:, 0, 0] = 1
    shearing[:, 1, 1] = 1
    shearing[:, 0, 1] = shear
    return scale[:, None, None] * (rotation @ shearing), shift


def invert_2x2(matrices):
    """Return the inverses of 2x2 matrices (B, 2, 2) by the adjugate formula.

    It uses only elementwise operations, so the result does not depend on the thread count.
    """
    import torch

    a, b, c, d = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 1, 0], matrices[:, 1, 1]
    determinant = a * d - b * c
    adjugate = torch.stack([torch.stack([d, -b], dim=1), torch.stack([-c, a], dim=1)], dim=1)
    return adjugate / determinant[:, None, None]


def augment_images(images, names: tuple[str, ...], rng):
    """Apply the transforms `names` to images (B, C, H, W) in [0, 1], with parameters drawn from `rng`.

    The parameters of all B images are drawn for the whole block, in a fixed order, so image j of a
    block gets the same transform however the block is later split into chunks. The resampling and the
    blend run in float64, so that their result, cast back to the images' dtype, does not depend on
    the number of threads. A mirror only moves values, so an image's mirror rounds to the mirrored
    8-bit image. A blend's partner is taken after the other transforms, so it is the partner's
    transformed image.
    """
    import torch
    from torch.nn import functional as F

    count = images.shape[0]
    uniform = torch.rand(count, 6, generator=rng, dtype=torch.float64) * 2 - 1  # (B, 6) in [-1, 1)
    out = images
    if "affine" in names:
        wide = images.to(torch.float64)
        forward, shift = affine_forward(uniform)
        # affine_grid's theta maps output coordinates to input coordinates: output = F input + shift,
        # so input = F^-1 (output - shift), and the image centre moves by exactly `shift`.
        inverse = invert_2x2(forward)
        offset = -(inverse @ shift[:, :, None])  # (B, 2, 1)
        theta = torch.cat([inverse, offset], dim=2).to(images.device)  # (B, 2, 3)
        parts = []
        for start in range(0, count, CPU_CHUNK):
            part = wide[start:start + CPU_CHUNK]
            grid = F.affine_grid(theta[start:start + CPU_CHUNK], list(part.shape), align_corners=False)
            parts.append(F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        out = torch.cat(parts).to(images.dtype)
    if "hflip" in names:
        flip = (uniform[:, 5] < 0).to(images.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if "mixup" in names:
        # These numbers are drawn after the (B, 6) numbers above, so "affine" and "hflip" get the
        # same parameters with or without mixup.
        partner = torch.randperm(count, generator=rng)
        chance, weight = torch.rand(count, 2, generator=rng, dtype=torch.float64).unbind(1)
        weight = torch.where(chance < MIXUP_PROBABILITY, weight, torch.zeros_like(weight))[:, None, None, None]
        wide = out.to(torch.float64)
        out = ((1 - weight.to(wide.device)) * wide + weight.to(wide.device) * wide[partner.to(wide.device)]).to(
            images.dtype)
    return out


def draw_block(pipeline, seed: int, block: int,
               augment: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate block `block`, apply the transforms of `augment` (see parse_augment) and label it with the student.

    Returns uint8 pixels (B, C, H, W), int64 labels (B,), float32 confidences (B,) and the
    student's float32 class probabilities (B, K), whose largest entry is the confidence.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor
    from torch.nn import functional as F

    generator, student = pipeline.generator.eval(), pipeline.student.eval()
    rng = torch.Generator(device="cpu").manual_seed(block_seed(seed, block))
    with torch.inference_mode():
        # The same draw of latents as DPSDPipeline.__call__ with batch_size=BLOCK_SIZE.
        # Latents are drawn in float32 whatever the generator's precision, so a bfloat16 build
        # starts from the same latents as a float32 one.
        dtype = torch.float32 if generator.dtype == torch.bfloat16 else generator.dtype
        latents = randn_tensor((BLOCK_SIZE, generator.config.latent_dim), generator=rng, device=pipeline.device,
                               dtype=dtype)  # (B, latent_dim)
        images = torch.cat([generator(part) for part in _chunks(latents)])  # (B, C, H, W) in [0, 1]
        names = parse_augment(augment)
        if names:
            augment_rng = torch.Generator(device="cpu").manual_seed(block_seed(seed, block, "augment"))
            images = augment_images(images.clamp(0, 1), names, augment_rng)
        pixels = (images.clamp(0, 1) * 255).round()  # 8-bit values, still float
        logits = student_logits(student, pixels / 255)  # the student labels the 8-bit image, as in DPSDPipeline
        probabilities = F.softmax(logits.float(), dim=1)
        confidences, labels = probabilities.max(dim=1)
    return (pixels.to(torch.uint8).cpu().numpy(), labels.cpu().numpy().astype(np.int64),
            confidences.cpu().numpy().astype(np.float32), probabilities.cpu().numpy().astype(np.float32))


def _chunks(batch):
    return batch.split(CPU_CHUNK) if batch.device.type == "cpu" else (batch,)


def student_logits(student, images):
    """Return `student(images)` in the student's dtype, bit for bit, computing the convolutions in chunks on a CPU.

    Args:
        student: a synthgen Classifier in eval mode.
        images: pixel-space images (B, C, H, W) in [0, 1].
    """
    import torch

    images = images.to(student.dtype)
    if images.device.type != "cpu":
        return student(images)
    # Classifier.forward, with the per-image layers in chunks and the linear layers on the whole batch.
    features = torch.cat([student.image_features(part) for part in _chunks(images)])
    return student.fc2(student.embed_features(features))  # (B, classes)


def prepare_pipeline(pipeline, device, precision: str = "float32"):
    """Move the pipeline to `device`, with the student in float64 (see the module docstring).

    With `precision` "bfloat16" the generator runs in bfloat16 and channels-last, except its last
    convolution, which stays in float32 so that the image is not rounded to bfloat16's 8 bits.
    """
    pipeline = pipeline.to(device)
    pipeline.student.double()  # nn.Module.double: diffusers' ModelMixin.to warns about any dtype cast
    set_generator_precision(pipeline.generator, precision)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def set_generator_precision(generator, precision: str) -> None:
    """Convert a synthgen Generator in place to `precision` (see PRECISIONS)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16":
        # nn.Module.to: diffusers' ModelMixin.to warns about any dtype cast.
        torch.nn.Module.to(generator, dtype=torch.bfloat16, memory_format=torch.channels_last)
        generator.blocks[-2].float()


def plan_per_class(pipeline, seed: int, per_class: int, class_names: list[str],
                   augment: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return the sample indices (and their labels) of the first `per_class` samples of each class.

    Samples are scanned in index order, so the plan depends only on the generator and the seed.

    Raises:
        SamplingError: the generator did not produce enough of some class within
            MAX_DRAWS_PER_ROW draws per requested row.
    """
    num_classes = len(class_names)
    requested = per_class * num_classes
    max_blocks = math.ceil(max(MAX_DRAWS_PER_ROW * requested, 10 * BLOCK_SIZE) / BLOCK_SIZE)
    counts = np.zeros(num_classes, dtype=np.int64)
    indices: list[int] = []
    labels: list[int] = []
    for block in range(max_blocks):
        block_labels = draw_block(pipeline, seed, block, augment)[1]
        for offset, label in enumerate(block_labels.tolist()):
            if counts[label] < per_class:
                counts[label] += 1
                indices.append(block * BLOCK_SIZE + offset)
                labels.append(label)
        if (counts >= per_class).all():
            logger.info("per-class plan: %d rows found among the first %d samples", requested, (block + 1) * BLOCK_SIZE)
            return np.asarray(indices, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    missing = {class_names[c]: int(per_class - counts[c]) for c in range(num_classes) if counts[c] < per_class}
    raise SamplingError(f"after {max_blocks * BLOCK_SIZE} generated images the student has not labelled enough of "
                        f"them as some classes; still missing {missing}. The generator rarely produces these "
                        "classes: lower --per-class, or use --num-samples")
