"""Identity context (spec 2.1-2.4): FaceNet embedding + CLIP tokens of the parsed face -> [1, 258, 768].

* FaceNet: the MTCNN crop of the native-resolution photo -> InceptionResnetV1 -> [1, 512];
* BiSeNet: the native-resolution photo, ToTensor + ImageNet normalisation, argmax of the main head;
  pixels whose label is not in the kept set are painted white (255, 255, 255);
* CLIP: the whitened photo through `clip_preprocess` -> ViT-L/14 last_hidden_state [1, 257, 1024];
* `CapHumanDenoiser.project_identity` -> [img_linear(clip) | id_linear(facenet)] = [1, 258, 768].
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from caphuman.export.face.bisenet import IMAGENET_MEAN, IMAGENET_STD, KEPT_LABELS, BiSeNet
from caphuman.export.face.facenet import InceptionResnetV1

from .faces import FaceAnalyzer, Photo


_KEPT = np.zeros(256, dtype=bool)
_KEPT[list(KEPT_LABELS)] = True


def _pixels(image: Image.Image, device) -> torch.Tensor:
    """[H, W, 3] uint8 RGB pixels of a photo on `device` (the 8-bit pixels are what travels)."""
    arr = np.asarray(image.convert("RGB"))
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(device)


def imagenet_input(pixels: torch.Tensor, dtype) -> torch.Tensor:
    """[1, 3, H, W] ToTensor + ImageNet normalisation of [H, W, 3] uint8 pixels, in float32 on their
    device (the same operations as on the CPU), then cast to `dtype`."""
    x = pixels.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=pixels.device)[:, None, None]
    return ((x - mean) / std)[None].to(dtype)


def _labels(bisenet: BiSeNet, pixels: torch.Tensor) -> torch.Tensor:
    p = next(bisenet.parameters())
    return bisenet(imagenet_input(pixels.to(p.device), p.dtype))[0].argmax(0)


@torch.no_grad()
def parse_labels(bisenet: BiSeNet, image: Image.Image) -> np.ndarray:
    """[H, W] uint8 CelebAMask-HQ labels (0..18) of an RGB photo at its native resolution."""
    p = next(bisenet.parameters())
    return _labels(bisenet, _pixels(image, p.device)).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def parse_face(bisenet: BiSeNet, image: Image.Image) -> Image.Image:
    """`whiten_non_face(image, parse_labels(bisenet, image))`, with the whitening done where BiSeNet
    runs: only the whitened 8-bit photo comes back."""
    p = next(bisenet.parameters())
    pixels = _pixels(image, p.device)
    keep = torch.from_numpy(_KEPT).to(p.device)[_labels(bisenet, pixels).long()]
    return Image.fromarray(torch.where(keep[..., None], pixels, 255).cpu().numpy())


def whiten_non_face(image: Image.Image, labels: np.ndarray) -> Image.Image:
    """The official FaceParser.parse output: non-kept labels (bg, ears, neck, cloth, hair, hat...) -> white."""
    arr = np.asarray(image.convert("RGB")).copy()
    arr[~_KEPT[labels]] = 255
    return Image.fromarray(arr)


@torch.no_grad()
def facenet_embedding(facenet: InceptionResnetV1, photo: Photo, fallback: bool = False) -> torch.Tensor:
    """[1, 512] L2-normalised FaceNet embedding of the photo's largest face."""
    crop = FaceAnalyzer.facenet_crop(photo, fallback=fallback)
    p = next(facenet.parameters())
    return facenet(crop[None].to(p.device, p.dtype))


@torch.no_grad()
def identity_context(denoiser, facenet: InceptionResnetV1, bisenet: BiSeNet, image_encoder, photo: Photo,
                     fallback: bool = False) -> torch.Tensor:
    """[1, 258, ctx] CapFace context of a reference photo.

    `denoiser` is an `caphuman.export.models.CapHumanDenoiser` (its `project_identity`), `image_encoder` an
    `caphuman.export.clip.ImageEncoder`.
    """
    from caphuman.export.clip import clip_preprocess

    id_feat = facenet_embedding(facenet, photo, fallback=fallback)
    parsed = parse_face(bisenet, photo.image)
    p = next(denoiser.parameters())
    tokens = image_encoder(clip_preprocess(parsed).to(p.device, next(image_encoder.parameters()).dtype))
    return denoiser.project_identity(tokens.to(p.dtype), id_feat.to(p.dtype))
