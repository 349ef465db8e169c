"""Built-in small models: a linear classifier, an MLP and a small CNN."""

from __future__ import annotations

import torch
import torch.nn as nn

from tunelab.errors import ConfigError
from tunelab.models import register_model


def _check_sizes(**sizes: int) -> None:
    """Refuse a layer size below 1 in one line (PyTorch builds such a layer and fails only in forward)."""
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"`model.{key}` = {value!r} must be a whole number of at least 1")


@register_model("linear")
def linear(in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """The classic `Linear(784, 10)` on flattened images."""
    _check_sizes(in_features=in_features, num_classes=num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@register_model("mlp")
def mlp(in_features: int = 784, hidden: list[int] = (256, 128), num_classes: int = 10, dropout: float = 0.0):
    _check_sizes(in_features=in_features, num_classes=num_classes, **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
    return MLP(in_features, list(hidden), num_classes, dropout)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head (`fc`), sized for 8x8 to 32x32 single-channel images."""

    tunelab_head_patterns = ["fc.*"]

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


@register_model("cnn")
def cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32, dropout: float = 0.0) -> nn.Module:
    _check_sizes(in_channels=in_channels, num_classes=num_classes, width=width)
    return SmallCNN(in_channels, num_classes, width, dropout)
