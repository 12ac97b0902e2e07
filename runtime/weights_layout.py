"""The official weights folder layout: one rule for `caphuman generate --weights DIR` and `caphuman serve
--weights DIR` (its table: `caphuman.tritonserver.weights`). Imports nothing heavy."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WeightFiles:
    root: Path
    checkpoint: Path
    sd_checkpoint: Path | None
    vae_checkpoint: Path | None
    clip_dir: Path | None
    facenet: Path | None
    bisenet: Path | None
    deca: Path | None
    flame_model: Path | None
    flame_texture: Path | None

    @classmethod
    def discover(cls, root: str | Path, require_checkpoint: bool = True) -> WeightFiles:
        """The files of `root`; without caphuman.ckpt only when not `require_checkpoint` (`caphuman condition`)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"weights folder not found: {root}")
        ckpt = root / "caphuman.ckpt"
        if require_checkpoint and not ckpt.is_file():
            raise FileNotFoundError(f"weights folder {root} has no caphuman.ckpt")
        files = [p for p in root.iterdir() if p.is_file()]
        vae = [p for p in files if p.name.lower().startswith("vae") and p.suffix in (".ckpt", ".safetensors")]
        sd = [p for p in files if p.suffix in (".ckpt", ".safetensors") and p != ckpt and p not in vae]
        if len(sd) > 1 or len(vae) > 1:
            raise ValueError(f"weights folder {root}: more than one SD checkpoint {[p.name for p in sd]} "
                             f"or VAE {[p.name for p in vae]}; keep one of each")

        def one(pred) -> Path | None:
            hits = [p for p in files if pred(p.name.lower())]
            return hits[0] if hits else None

        clip = root / "clip-vit-large-patch14"
        return cls(root, ckpt, sd[0] if sd else None, vae[0] if vae else None, clip if clip.is_dir() else None,
                   one(lambda n: "vggface2" in n or (n.startswith("facenet") and n.endswith((".pt", ".pth")))),
                   one(lambda n: n == "79999_iter.pth"), one(lambda n: n == "deca_model.tar"),
                   one(lambda n: n == "generic_model.pkl"), one(lambda n: n == "flame_texture.npz"))


# command-line option (dest) -> the WeightFiles field that --weights DIR fills it from
OPTION_FILES = {"checkpoint": "checkpoint", "sd_checkpoint": "sd_checkpoint", "vae_checkpoint": "vae_checkpoint",
                "clip_dir": "clip_dir", "facenet_weights": "facenet", "bisenet_weights": "bisenet",
                "deca_model": "deca", "flame_model": "flame_model", "flame_texture": "flame_texture"}


def use_weights_folder(args, require_checkpoint: bool = True) -> None:
    """Fill the file options of `args` that --weights DIR provides; an option given as well keeps its file,
    an option the command does not have is skipped."""
    if not getattr(args, "weights", None):
        return
    files = WeightFiles.discover(args.weights, require_checkpoint)
    for dest, field in OPTION_FILES.items():
        if hasattr(args, dest) and getattr(args, dest) is None and getattr(files, field) is not None:
            setattr(args, dest, str(getattr(files, field)))
