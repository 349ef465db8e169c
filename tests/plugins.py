"""Out-of-tree plug-ins, as a user's own package would define them (tests import them by path)."""

from __future__ import annotations

import torch.nn as nn


class TinyNet(nn.Module):
    """A flatten + linear classifier for 8x8 digits: a model named by import path, `tests.plugins:TinyNet`."""

    def __init__(self, in_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
