"""FaceNet InceptionResnetV1 (facenet-pytorch 2.5.3) in the key layout of ``20180402-114759-vggface2.pt``.

160x160 face crops standardised as (x - 127.5) / 128 -> 512-d embedding, L2-normalised (spec 2.1):
Inception-ResNet-v1 trunk -> AdaptiveAvgPool -> Dropout(0.6, inactive in eval) -> Linear(1792, 512,
no bias) -> BatchNorm1d(512, eps 1e-3) -> F.normalize. The file also holds the VGGFace2 classifier
``logits.*`` (8631 classes), which the embedding does not use; the loader accepts and drops it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import load_exact, read_state_dict

EMBED_DIM = 512


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; keys ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


class Block35(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(256, 32, 1)
        self.branch1 = _seq(BasicConv2d(256, 32, 1), BasicConv2d(32, 32, 3, padding=1))
        self.branch2 = _seq(BasicConv2d(256, 32, 1), BasicConv2d(32, 32, 3, padding=1), BasicConv2d(32, 32, 3, padding=1))
        self.conv2d = nn.Conv2d(96, 256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], 1)
        return F.relu(self.conv2d(mixed) * self.scale + x)


class Block17(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.branch0 = BasicConv2d(896, 128, 1)
        self.branch1 = _seq(BasicConv2d(896, 128, 1), BasicConv2d(128, 128, (1, 7), padding=(0, 3)),
                            BasicConv2d(128, 128, (7, 1), padding=(3, 0)))
        self.conv2d = nn.Conv2d(256, 896, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch0(x), self.branch1(x)], 1)
        return F.relu(self.conv2d(mixed) * self.scale + x)


class Block8(nn.Module):
    def __init__(self, scale: float = 1.0, relu: bool = True):
        super().__init__()
        self.scale, self.use_relu = scale, relu
        self.branch0 = BasicConv2d(1792, 192, 1)
        self.branch1 = _seq(BasicConv2d(1792, 192, 1), BasicConv2d(192, 192, (1, 3), padding=(0, 1)),
                            BasicConv2d(192, 192, (3, 1), padding=(1, 0)))
        self.conv2d = nn.Conv2d(384, 1792, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d(torch.cat([self.branch0(x), self.branch1(x)], 1)) * self.scale + x
        return F.relu(out) if self.use_relu else out


class Mixed6a(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch0 = BasicConv2d(256, 384, 3, stride=2)
        self.branch1 = _seq(BasicConv2d(256, 192, 1), BasicConv2d(192, 192, 3, padding=1), BasicConv2d(192, 256, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), F.max_pool2d(x, 3, stride=2)], 1)


class Mixed7a(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch0 = _seq(BasicConv2d(896, 256, 1), BasicConv2d(256, 384, 3, stride=2))
        self.branch1 = _seq(BasicConv2d(896, 256, 1), BasicConv2d(256, 256, 3, stride=2))
        self.branch2 = _seq(BasicConv2d(896, 256, 1), BasicConv2d(256, 256, 3, padding=1), BasicConv2d(256, 256, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), F.max_pool2d(x, 3, stride=2)], 1)


class InceptionResnetV1(nn.Module):
    """[B, 3, 160, 160] standardised crops -> [B, 512] unit-norm embeddings."""

    def __init__(self):
        super().__init__()
        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2)
        self.repeat_1 = _seq(*[Block35(0.17) for _ in range(5)])
        self.mixed_6a = Mixed6a()
        self.repeat_2 = _seq(*[Block17(0.10) for _ in range(10)])
        self.mixed_7a = Mixed7a()
        self.repeat_3 = _seq(*[Block8(0.20) for _ in range(5)])
        self.block8 = Block8(relu=False)
        self.last_linear = nn.Linear(1792, EMBED_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBED_DIM, eps=0.001, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
        x = F.max_pool2d(x, 3, stride=2)  # maxpool_3a
        x = self.conv2d_4b(self.conv2d_4a(self.conv2d_3b(x)))
        x = self.repeat_3(self.mixed_7a(self.repeat_2(self.mixed_6a(self.repeat_1(x)))))
        x = self.block8(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # dropout is the identity in eval
        return F.normalize(self.last_bn(self.last_linear(x)), p=2, dim=1)


def load_facenet(path: str | Path) -> InceptionResnetV1:
    """Build InceptionResnetV1 and load the VGGFace2 weight file (``torch.load(weights_only=True)``).

    Every embedding key must be present; ``logits.*`` (the classifier) and BatchNorm
    ``num_batches_tracked`` counters are accepted and ignored; any other key is an error.
    """
    state = read_state_dict(path, "FaceNet weights")
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    return load_exact(InceptionResnetV1(), state, f"FaceNet weights {path} (VGGFace2 InceptionResnetV1 layout)")
