"""MTCNN face detector with facenet-pytorch 2.5.3 semantics (``models/mtcnn.py``, ``models/utils/detect_face.py``).

The official code builds ``MTCNN(image_size=160, margin=0, min_face_size=20,
thresholds=[0.6, 0.7, 0.7], factor=0.709, post_process=True, select_largest=True)`` and calls it on
the PIL reference photo. The networks keep the state-dict layout of facenet-pytorch's
``pnet.pt``/``rnet.pt``/``onet.pt`` (shipped in ``weights/``, MIT licence). The cascade is the same:
scale pyramid, P-Net proposals with per-scale NMS (IoU 0.5) and cross-scale NMS (0.7), R-Net
refinement (NMS 0.7), O-Net boxes + 5 landmarks with NMS 0.7 by the "Min" overlap, area-mode
resampling, (x - 127.5) / 128 input scaling. torchvision's ``batched_nms`` is replaced by an
equivalent greedy NMS here (torchvision is not a dependency).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)  # the Caffe weights' (W, H, C) flattening
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def _load_state(module: nn.Module, path: Path, name: str) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"MTCNN {name} weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"MTCNN {name} weights {path}: missing keys {result.missing_keys}, "
                         f"unexpected keys {result.unexpected_keys}")
    return module.eval()


@dataclass
class Detection:
    box: np.ndarray        # [4] x1, y1, x2, y2 (float, image pixels)
    prob: float
    landmarks: np.ndarray  # [5, 2] (x, y): left eye, right eye, nose, mouth left, mouth right


def _nms_iou(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """torchvision.ops.nms: IoU with (x2-x1)*(y2-y1) areas; keep a box unless IoU > thresh with a kept one."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        iou = inter / (area[i] + area[rest] - inter)
        order = rest[~(iou > thresh)]
    return np.asarray(keep, dtype=np.int64)


def _nms_min(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """facenet-pytorch nms_numpy(method='Min'): +1 pixel areas, overlap = inter / min(area)."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    order = np.argsort(scores)
    keep = []
    while order.size:
        i = order[-1]
        keep.append(i)
        idx = order[:-1]
        w = np.maximum(0.0, np.minimum(boxes[i, 2], boxes[idx, 2]) - np.maximum(boxes[i, 0], boxes[idx, 0]) + 1)
        h = np.maximum(0.0, np.minimum(boxes[i, 3], boxes[idx, 3]) - np.maximum(boxes[i, 1], boxes[idx, 1]) + 1)
        overlap = (w * h) / np.minimum(area[i], area[idx])
        order = idx[overlap <= thresh]
    return np.asarray(keep, dtype=np.int64)


def _rerec(b: torch.Tensor) -> torch.Tensor:
    """Square the boxes around their centres."""
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    side = torch.maximum(w, h)
    b = b.clone()
    b[:, 0] = b[:, 0] + w * 0.5 - side * 0.5
    b[:, 1] = b[:, 1] + h * 0.5 - side * 0.5
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def _bbreg(b: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    b = b.clone()
    b[:, :4] = torch.stack([b[:, 0] + reg[:, 0] * w, b[:, 1] + reg[:, 1] * h,
                            b[:, 2] + reg[:, 2] * w, b[:, 3] + reg[:, 3] * h], 1)
    return b


def _pad(b: torch.Tensor, w: int, h: int):
    """Integer crop ranges (1-based starts, as the official code), clipped to the image."""
    bi = b[:, :4].trunc().int().numpy()
    x, y, ex, ey = bi[:, 0].copy(), bi[:, 1].copy(), bi[:, 2].copy(), bi[:, 3].copy()
    x[x < 1] = 1
    y[y < 1] = 1
    ex[ex > w] = w
    ey[ey > h] = h
    return y, ey, x, ex


def _crops(img: torch.Tensor, b: torch.Tensor, size: int, w: int, h: int) -> tuple[torch.Tensor, np.ndarray]:
    y, ey, x, ex = _pad(b, w, h)
    ok = (ey > y - 1) & (ex > x - 1)
    out = [F.interpolate(img[:, :, y[k] - 1:ey[k], x[k] - 1:ex[k]], size=(size, size), mode="area")
           for k in np.nonzero(ok)[0]]
    data = torch.cat(out, 0) if out else img.new_zeros(0, 3, size, size)
    return (data - 127.5) * 0.0078125, ok


class MTCNN(nn.Module):
    """The facenet-pytorch MTCNN cascade. `detect(rgb_uint8_hwc)` -> detections, largest first."""

    def __init__(self, weights_dir: str | Path = WEIGHTS_DIR, min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), factor: float = 0.709):
        super().__init__()
        weights_dir = Path(weights_dir)
        self.pnet = _load_state(PNet(), weights_dir / "pnet.pt", "P-Net")
        self.rnet = _load_state(RNet(), weights_dir / "rnet.pt", "R-Net")
        self.onet = _load_state(ONet(), weights_dir / "onet.pt", "O-Net")
        self.min_face_size, self.thresholds, self.factor = min_face_size, thresholds, factor

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> list[Detection]:
        """All faces in an RGB uint8 [H, W, 3] image, sorted by box area, largest first (select_largest)."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"MTCNN needs an RGB [H, W, 3] image, got shape {image.shape}")
        img = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
        h, w = img.shape[2:]
        th = self.thresholds

        # Scale pyramid.
        m = 12.0 / self.min_face_size
        minl = min(h, w) * m
        scales, s = [], m
        while minl >= 12:
            scales.append(s)
            s *= self.factor
            minl *= self.factor

        # Stage 1: P-Net proposals on every scale, NMS 0.5 within a scale, then 0.7 across scales.
        cand = []
        for scale in scales:
            data = F.interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, probs = self.pnet((data - 127.5) * 0.0078125)
            prob = probs[0, 1]
            mask = prob >= th[0]
            yx = mask.nonzero()
            if len(yx) == 0:
                continue
            xy = yx.flip(1).to(reg.dtype)
            q1 = ((2 * xy + 1) / scale).floor()
            q2 = ((2 * xy + 12 - 1 + 1) / scale).floor()
            boxes = torch.cat([q1, q2, prob[mask][:, None], reg[0][:, mask].T], 1)
            keep = _nms_iou(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.5)
            cand.append(boxes[torch.as_tensor(keep)])
        if not cand:
            return []
        boxes = torch.cat(cand, 0)
        boxes = boxes[torch.as_tensor(_nms_iou(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.7))]
        rw, rh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * rw, boxes[:, 1] + boxes[:, 6] * rh,
                             boxes[:, 2] + boxes[:, 7] * rw, boxes[:, 3] + boxes[:, 8] * rh, boxes[:, 4]], 1)
        boxes = _rerec(boxes)

        # Stage 2: R-Net on 24x24 crops.
        data, ok = _crops(img, boxes, 24, w, h)
        boxes = boxes[torch.as_tensor(ok)]
        if len(boxes) == 0:
            return []
        reg, probs = self.rnet(data)
        score = probs[:, 1]
        keep = score > th[1]
        boxes = torch.cat([boxes[keep, :4], score[keep, None]], 1)
        reg = reg[keep]
        pick = torch.as_tensor(_nms_iou(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.7), dtype=torch.long)
        boxes = _rerec(_bbreg(boxes[pick], reg[pick]))
        if len(boxes) == 0:
            return []

        # Stage 3: O-Net on 48x48 crops: final boxes and five landmarks.
        data, ok = _crops(img, boxes, 48, w, h)
        boxes = boxes[torch.as_tensor(ok)]
        if len(boxes) == 0:
            return []
        reg, points, probs = self.onet(data)
        score = probs[:, 1]
        keep = score > th[2]
        boxes = torch.cat([boxes[keep, :4], score[keep, None]], 1)
        reg, points = reg[keep], points[keep]
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * points[:, 5:10] + boxes[:, 1:2] - 1
        points = torch.stack([px, py], 2)  # [N, 5, 2]
        boxes = _bbreg(boxes, reg)
        pick = _nms_min(boxes[:, :4].numpy().astype(np.float64), boxes[:, 4].numpy(), 0.7)
        boxes, points = boxes.numpy()[pick], points.numpy()[pick]

        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(area)[::-1]
        return [Detection(boxes[i, :4].astype(np.float64), float(boxes[i, 4]), points[i].astype(np.float64))
                for i in order]
