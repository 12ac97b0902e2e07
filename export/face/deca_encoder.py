"""DECA's coarse encoder E_flame (``libs/decalib/models/encoders.py``, ``resnet.py``), loading ``deca_model.tar``.

ResNet50 (Bottleneck [3, 4, 6, 3], stride on the 3x3 conv, AvgPool2d(7, stride 1)) -> 2048 ->
``layers.0`` Linear(2048, 1024) -> ReLU -> ``layers.2`` Linear(1024, 236). Input: the 224x224 DECA
crop in [0, 1] RGB, no mean/std normalisation (spec 6.1). The 236 values split as shape 100 |
tex 50 | exp 50 | pose 6 | cam 3 | light 27 (-> 9 x 3) (spec 6.2, `decompose_code`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import load_exact, read_torch_object

CODE_SIZES = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}
CODE_DIM = sum(CODE_SIZES.values())  # 236


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet50Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, layers = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            seq = [Bottleneck(cin, planes, stride)] + [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*seq))
            cin = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.avg_pool2d(x, 7, stride=1).flatten(1)


class DecaEncoder(nn.Module):
    """[B, 3, 224, 224] crop in [0, 1] -> [B, 236] FLAME code (keys ``encoder.*``, ``layers.{0,2}``)."""

    def __init__(self, out_dim: int = CODE_DIM):
        super().__init__()
        self.encoder = ResNet50Features()
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(x))


def decompose_code(code: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, 236] -> dict shape/tex/exp/pose/cam/light, light reshaped to [B, 9, 3] (element [k, c] = code[209+3k+c])."""
    if code.shape[-1] != CODE_DIM:
        raise ValueError(f"DECA code must have {CODE_DIM} values, got {code.shape[-1]}")
    out, start = {}, 0
    for name, n in CODE_SIZES.items():
        out[name] = code[:, start:start + n]
        start += n
    out["light"] = out["light"].reshape(code.shape[0], 9, 3)
    return out


def load_deca_encoder(path: str | Path) -> DecaEncoder:
    """Load ``E_flame`` from ``deca_model.tar`` (a torch.save dict with E_flame/E_detail/D_detail state dicts)."""
    ckpt = read_torch_object(path, "DECA model")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("E_flame"), dict):
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"DECA model {path}: expected a dict with an 'E_flame' state dict, got {keys}")
    state = ckpt["E_flame"]
    return load_exact(DecaEncoder(), state, f"DECA model {path}: E_flame (ResNet50 encoder + 236-value head)")
