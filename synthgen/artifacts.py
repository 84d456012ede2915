"""Released artifacts of a run: sample grids and the samples behind them."""

from __future__ import annotations

import io

import numpy as np
import torch


@torch.no_grad()
def sample_per_class(generator, student, num_classes: int, per_class: int, seed: int = 0,
                     batch_size: int = 256, max_batches: int = 16) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Draw images until each class (by the student's label) has `per_class` of them.

    Returns, per class, images (n, C, H, W) in [0, 1] and the student's confidences (n,);
    a class the generator rarely produces may come back with fewer than `per_class`.
    """
    rng = torch.Generator(device=generator.device).manual_seed(seed)
    generator.eval()
    student.eval()
    images: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    confidences: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
    counts = [0] * num_classes
    for _ in range(max_batches):
        batch = generator(generator.sample_latents(batch_size, rng))
        probs = torch.softmax(student(batch), dim=1)
        confidence, label = probs.max(dim=1)
        for c in range(num_classes):
            need = per_class - counts[c]
            if need <= 0:
                continue
            chosen = (label == c).nonzero().flatten()[:need]
            images[c].append(batch[chosen].cpu())
            confidences[c].append(confidence[chosen].cpu())
            counts[c] += len(chosen)
        if min(counts) >= per_class:
            break
    return ([torch.cat(i) if i else torch.zeros(0) for i in images],
            [torch.cat(c) if c else torch.zeros(0) for c in confidences])


def grid_png(rows: list[torch.Tensor], class_names: list[str], per_class: int, scale: int = 2) -> bytes:
    """Render one row per class (label on the left) as PNG bytes."""
    from PIL import Image, ImageDraw

    shapes = [r.shape[1:] for r in rows if r.numel()]
    channels, height, width = shapes[0] if shapes else (1, 28, 28)
    label_width = 80
    cell_h, cell_w = height * scale + 2, width * scale + 2
    canvas = Image.new("RGB", (label_width + per_class * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, name) in enumerate(zip(rows, class_names)):
        draw.text((4, r * cell_h + cell_h // 3), str(name)[:12], fill="black")
        for c in range(min(per_class, row.shape[0] if row.numel() else 0)):
            pixels = (row[c].clamp(0, 1) * 255).round().byte().numpy()
            pixels = pixels[0] if channels == 1 else np.transpose(pixels, (1, 2, 0))
            tile = Image.fromarray(pixels).convert("RGB").resize((width * scale, height * scale), Image.NEAREST)
            canvas.paste(tile, (label_width + c * cell_w + 1, r * cell_h + 1))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
