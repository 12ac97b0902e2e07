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

import threading
from contextlib import contextmanager
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


# Host-side box arithmetic is NumPy float32: the same IEEE operations the official torch code does
# on CPU tensors (bit-identical results), at a fraction of torch's per-operation overhead.

def _rerec(b: np.ndarray) -> np.ndarray:
    """Square the boxes around their centres."""
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    side = np.maximum(w, h)
    b = b.copy()
    b[:, 0] = b[:, 0] + w * 0.5 - side * 0.5
    b[:, 1] = b[:, 1] + h * 0.5 - side * 0.5
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def _bbreg(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    b = b.copy()
    b[:, :4] = np.stack([b[:, 0] + reg[:, 0] * w, b[:, 1] + reg[:, 1] * h,
                         b[:, 2] + reg[:, 2] * w, b[:, 3] + reg[:, 3] * h], 1)
    return b


def _pad(b: np.ndarray, w: int, h: int):
    """Integer crop ranges (1-based starts, as the official code), clipped to the image."""
    bi = np.trunc(b[:, :4]).astype(np.int32)
    x, y, ex, ey = bi[:, 0].copy(), bi[:, 1].copy(), bi[:, 2].copy(), bi[:, 3].copy()
    x[x < 1] = 1
    y[y < 1] = 1
    ex[ex > w] = w
    ey[ey > h] = h
    return y, ey, x, ex


def _integral(img: torch.Tensor) -> torch.Tensor:
    """[1, C, H, W] -> [C, H + 1, W + 1] float64 summed-area table (exact for 8-bit pixel values)."""
    c, h, w = img.shape[1:]
    sat = img.new_zeros((c, h + 1, w + 1), dtype=torch.float64)
    sat[:, 1:, 1:] = img[0].double().cumsum(1).cumsum(2)
    return sat


def _cell_bounds(start: np.ndarray, length: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """adaptive_avg_pool's cells: [n] crop starts and lengths -> absolute [n, size] begin and end indices."""
    i = np.arange(size, dtype=np.int64)[None]
    length = length.astype(np.int64)[:, None]
    return start[:, None] + i * length // size, start[:, None] + ((i + 1) * length + size - 1) // size


def _area_crops(sat: torch.Tensor, bounds: np.ndarray, size: int) -> torch.Tensor:
    """``F.interpolate(img[:, :, y0:y1, x0:x1], (size, size), mode='area')`` of n boxes at once;
    `bounds` is [4, n] int (y0, y1, x0, x1).

    Area resampling is adaptive average pooling: each output cell averages a box of input pixels,
    read here from the summed-area table (4 lookups per cell, no per-box loop). The sum is exact for
    integer pixel values and divided as ATen's kernel does (sum / kh / kw in float32)."""
    y0, y1, x0, x1 = (np.asarray(v, dtype=np.int64) for v in bounds)
    r0, r1 = _cell_bounds(y0, y1 - y0, size)   # [n, size]
    c0, c1 = _cell_bounds(x0, x1 - x0, size)
    idx = torch.from_numpy(np.stack([r0, r1, c0, c1])).to(sat.device)  # one upload
    R0, R1, C0, C1 = idx[0][:, :, None], idx[1][:, :, None], idx[2][:, None, :], idx[3][:, None, :]
    total = sat[:, R1, C1] - sat[:, R0, C1] - sat[:, R1, C0] + sat[:, R0, C0]  # [C, n, size, size]
    kh, kw = (R1 - R0).float(), (C1 - C0).float()
    return (total.float() / kh / kw).permute(1, 0, 2, 3)


def _crops(sat: torch.Tensor, b: np.ndarray, size: int, w: int, h: int) -> tuple[torch.Tensor, np.ndarray]:
    """The official per-box crop + area resize of every box with a non-empty crop, scaled for the nets."""
    y, ey, x, ex = _pad(b, w, h)
    ok = (ey > y - 1) & (ex > x - 1)
    if not ok.any():
        return sat.new_zeros((0, 3, size, size), dtype=torch.float32), ok
    data = _area_crops(sat, np.stack([y[ok] - 1, ey[ok], x[ok] - 1, ex[ok]]), size)
    return (data - 127.5) * 0.0078125, ok


@contextmanager
def _fp32_convolutions(device: torch.device):
    """cuDNN without TF32 while MTCNN runs on a GPU: its thresholds see the same scores as on the CPU."""
    if device.type != "cuda":
        yield
        return
    with _TF32_LOCK:
        prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = prev


_TF32_LOCK = threading.Lock()


def _to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Several small tensors to host NumPy arrays of their dtypes, in one copy (one synchronisation)."""
    if not tensors or tensors[0].device.type == "cpu":
        return [t.numpy() for t in tensors]
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).cpu().numpy()
    out, at = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[at:at + n].reshape(t.shape).astype(np.int64 if t.dtype == torch.int64 else np.float32))
        at += n
    return out


def pyramid_scales(h: int, w: int, min_face_size: int, factor: float) -> list[float]:
    """The official scale pyramid: 12 / min_face_size, times `factor` while the short side stays >= 12."""
    m = 12.0 / min_face_size
    minl = min(h, w) * m
    scales, s = [], m
    while minl >= 12:
        scales.append(s)
        s *= factor
        minl *= factor
    return scales


class PNetPyramid(nn.Module):
    """Stage 1's dense part: area-resampled pyramid + P-Net on every scale of a [1, 3, H, W] image.

    Returns the face probabilities [N] and box regressions [4, N] of all scales' cells, flattened
    and concatenated (scale by scale, row-major); a fixed function of the image shape, so it can be
    replayed from a CUDA graph."""

    def __init__(self, pnet: PNet, min_face_size: int, factor: float):
        super().__init__()
        self.pnet, self.min_face_size, self.factor = pnet, min_face_size, factor

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = img.shape[2:]
        probs, regs = [], []
        for scale in pyramid_scales(h, w, self.min_face_size, self.factor):
            data = F.interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, prob = self.pnet((data - 127.5) * 0.0078125)
            probs.append(prob[0, 1].reshape(-1))
            regs.append(reg[0].reshape(4, -1))
        return torch.cat(probs), torch.cat(regs, 1)

    @staticmethod
    def map_shape(h: int, w: int, scale: float) -> tuple[int, int]:
        """P-Net's output grid for one scale: conv3 (valid) -> pool 2 (ceil) -> conv3 -> conv3."""
        sh, sw = int(h * scale + 1), int(w * scale + 1)
        return (sh - 2 + 1) // 2 - 4, (sw - 2 + 1) // 2 - 4


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
        # Stage 1's networks as one callable (a runtime may replay it from a CUDA graph per image size).
        self.pyramid: nn.Module = PNetPyramid(self.pnet, min_face_size, factor)

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> list[Detection]:
        """All faces in an RGB [H, W, 3] image (uint8), sorted by box area, largest first (select_largest).

        Runs on the module's device (`.to("cuda")`): the networks, the pyramid and the crops run
        there; the candidate lists come back to the host once per stage (three synchronisations)
        for the NMS, which stays the exact NumPy code. On a GPU cuDNN's TF32 is off meanwhile, so
        both devices agree to float rounding."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"MTCNN needs an RGB [H, W, 3] image, got shape {image.shape}")
        device = self.device
        with _fp32_convolutions(device):
            return self._detect(image, device)

    def _detect(self, image: np.ndarray, device: torch.device) -> list[Detection]:
        arr = np.ascontiguousarray(image)
        src = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        if src.dtype != torch.uint8:
            src = src.float()
        img = src.to(device, non_blocking=False).permute(2, 0, 1)[None].float()
        h, w = img.shape[2:]
        th = self.thresholds

        scales = pyramid_scales(h, w, self.min_face_size, self.factor)
        if not scales:
            return []

        # Stage 1: P-Net on every scale (all on the device), the candidates of all scales in one copy.
        prob_all, reg_all = self.pyramid(img)
        shapes = [PNetPyramid.map_shape(h, w, scale) for scale in scales]
        flat = (prob_all >= th[0]).nonzero().squeeze(1)
        flat, score, reg = _to_host(flat, prob_all[flat], reg_all[:, flat])
        sizes = np.array([sh[0] * sh[1] for sh in shapes])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        assert offsets[-1] == prob_all.numel(), "P-Net grid sizes disagree with the pyramid's output"
        which = np.searchsorted(offsets, flat, side="right") - 1
        # Proposals of all scales at once: cell (x, y) of scale s -> [floor((2xy + 1) / s), floor((2xy + 12) / s)]
        # (float32 division by the float32 scale, as the official per-scale code computes it).
        local = flat - offsets[which]
        width = np.array([sh[1] for sh in shapes])[which]
        xy = np.stack([local % width, local // width], 1).astype(np.float32)
        scale = np.asarray(scales, dtype=np.float32)[which][:, None]
        q1 = np.floor((2 * xy + 1) / scale)
        q2 = np.floor((2 * xy + 12 - 1 + 1) / scale)
        proposals = np.concatenate([q1, q2, score[:, None], reg.T], 1)
        cand = []
        for k in np.unique(which):  # per scale, in the official order: NMS 0.5 within the scale
            idx = np.nonzero(which == k)[0]
            cand.append(idx[_nms_iou(proposals[idx, :4], proposals[idx, 4], 0.5)])
        if not cand:
            return []
        boxes = proposals[np.concatenate(cand)]
        boxes = boxes[_nms_iou(boxes[:, :4], boxes[:, 4], 0.7)]
        rw, rh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = np.stack([boxes[:, 0] + boxes[:, 5] * rw, boxes[:, 1] + boxes[:, 6] * rh,
                          boxes[:, 2] + boxes[:, 7] * rw, boxes[:, 3] + boxes[:, 8] * rh, boxes[:, 4]], 1)
        boxes = _rerec(boxes)
        sat = _integral(img)

        # Stage 2: R-Net on 24x24 crops.
        data, ok = _crops(sat, boxes, 24, w, h)
        boxes = boxes[ok]
        if len(boxes) == 0:
            return []
        reg, probs = _to_host(*self.rnet(data))
        score = probs[:, 1]
        keep = score > th[1]
        boxes = np.concatenate([boxes[keep, :4], score[keep, None]], 1)
        reg = reg[keep]
        pick = _nms_iou(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _rerec(_bbreg(boxes[pick], reg[pick]))
        if len(boxes) == 0:
            return []

        # Stage 3: O-Net on 48x48 crops: final boxes and five landmarks.
        data, ok = _crops(sat, boxes, 48, w, h)
        boxes = boxes[ok]
        if len(boxes) == 0:
            return []
        reg, points, probs = _to_host(*self.onet(data))
        score = probs[:, 1]
        keep = score > th[2]
        boxes = np.concatenate([boxes[keep, :4], score[keep, None]], 1)
        reg, points = reg[keep], points[keep]
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * points[:, 5:10] + boxes[:, 1:2] - 1
        points = np.stack([px, py], 2)  # [N, 5, 2]
        boxes = _bbreg(boxes, reg)
        pick = _nms_min(boxes[:, :4].astype(np.float64), boxes[:, 4], 0.7)
        boxes, points = boxes[pick], points[pick]

        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = np.argsort(area)[::-1]
        return [Detection(boxes[i, :4].astype(np.float64), float(boxes[i, 4]), points[i].astype(np.float64))
                for i in order]
