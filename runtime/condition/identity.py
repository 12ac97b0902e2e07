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

from export.face.bisenet import IMAGENET_MEAN, IMAGENET_STD, KEPT_LABELS, BiSeNet
from export.face.facenet import InceptionResnetV1

from .faces import FaceAnalyzer, Photo


_KEPT = np.zeros(256, dtype=bool)
_KEPT[list(KEPT_LABELS)] = True


def imagenet_input(image: Image.Image, device, dtype) -> torch.Tensor:
    """[1, 3, H, W] ToTensor + ImageNet normalisation of an RGB photo, computed on `device` in float32
    (the 8-bit pixels are what travels), then cast to `dtype`."""
    arr = np.asarray(image.convert("RGB"))
    x = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(device).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return ((x - mean) / std)[None].to(dtype)


@torch.no_grad()
def parse_labels(bisenet: BiSeNet, image: Image.Image) -> np.ndarray:
    """[H, W] uint8 CelebAMask-HQ labels (0..18) of an RGB photo at its native resolution."""
    p = next(bisenet.parameters())
    logits = bisenet(imagenet_input(image, p.device, p.dtype))
    return logits[0].argmax(0).to(torch.uint8).cpu().numpy()


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

    `denoiser` is an `export.models.CapHumanDenoiser` (its `project_identity`), `image_encoder` an
    `export.clip.ImageEncoder`.
    """
    from export.clip import clip_preprocess

    id_feat = facenet_embedding(facenet, photo, fallback=fallback)
    parsed = whiten_non_face(photo.image, parse_labels(bisenet, photo.image))
    p = next(denoiser.parameters())
    tokens = image_encoder(clip_preprocess(parsed).to(p.device, next(image_encoder.parameters()).dtype))
    return denoiser.project_identity(tokens.to(p.dtype), id_feat.to(p.dtype))
