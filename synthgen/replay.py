"""A fixed-size buffer of answered synthetic images for the student to learn from again.

Re-using an answer costs no privacy: it is post-processing of an output already charged.
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, image_shape: tuple[int, int, int], num_classes: int,
                 device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.device = torch.device(device)
        self.images = torch.zeros((capacity, *image_shape), dtype=torch.uint8, device=self.device)  # (N, C, H, W)
        self.targets = torch.zeros((capacity, num_classes), dtype=torch.float32, device=self.device)  # (N, classes)
        self.size = 0
        self.cursor = 0

    def add(self, images_uint8: torch.Tensor, targets: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        count = images_uint8.shape[0]
        index = (self.cursor + torch.arange(count, device=self.device)) % self.capacity
        self.images[index] = images_uint8
        self.targets[index] = targets
        self.cursor = int((self.cursor + count) % self.capacity)
        self.size = min(self.size + count, self.capacity)

    def sample(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.size == 0 or count == 0:
            return None
        # Drawn from the CPU generator so that a run is reproducible on any device.
        index = torch.randint(0, self.size, (count,)).to(self.device)
        return self.images[index].float() / 255, self.targets[index]

    def state_dict(self) -> dict:
        return {"images": self.images[: self.size].clone(), "targets": self.targets[: self.size].clone(),
                "size": self.size, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self.cursor = int(state["cursor"])
        self.images[: self.size] = state["images"]
        self.targets[: self.size] = state["targets"]
