"""The official weights folder layout: one rule for `caphuman generate --weights DIR` and `caphuman serve
--weights DIR` (its table: `caphuman.tritonserver.weights`). Imports nothing heavy."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MERGED_FILE_NAME = "caphuman-merged.safetensors"  # `caphuman build --weights-out`: caphuman.ckpt + SD + VAE in one


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
    def discover(cls, root: str | Path, require_checkpoint: bool = True, use_merged: bool = True) -> WeightFiles:
        """The files of `root`; without caphuman.ckpt only when not `require_checkpoint` (`caphuman condition`).
        Its merged weights file, when there is one, stands for caphuman.ckpt + SD + VAE (unless not
        `use_merged`: the build that merges them anew)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"weights folder not found: {root}")
        ckpt = root / "caphuman.ckpt"
        merged = root / MERGED_FILE_NAME
        use_merged = use_merged and merged.is_file()
        if require_checkpoint and not ckpt.is_file() and not use_merged:
            raise FileNotFoundError(f"weights folder {root} has no caphuman.ckpt (nor {MERGED_FILE_NAME})")
        files = [p for p in root.iterdir() if p.is_file() and p != merged]
        vae = [p for p in files if p.name.lower().startswith("vae") and p.suffix in (".ckpt", ".safetensors")]
        sd = [p for p in files if p.suffix in (".ckpt", ".safetensors") and p != ckpt and p not in vae]
        if len(sd) > 1 or len(vae) > 1:
            raise ValueError(f"weights folder {root}: more than one SD checkpoint {[p.name for p in sd]} "
                             f"or VAE {[p.name for p in vae]}; keep one of each")

        def one(pred) -> Path | None:
            hits = [p for p in files if pred(p.name.lower())]
            return hits[0] if hits else None

        sd, vae = sd[0] if sd else None, vae[0] if vae else None
        if use_merged:  # it replaces caphuman.ckpt + SD + VAE: one read, straight to the device
            _check_merged_sources(merged, {"checkpoint": ckpt, "sd_checkpoint": sd, "vae_checkpoint": vae})
            ckpt, sd, vae = merged, None, None
        clip = root / "clip-vit-large-patch14"
        return cls(root, ckpt, sd, vae, clip if clip.is_dir() else None,
                   one(lambda n: "vggface2" in n or (n.startswith("facenet") and n.endswith((".pt", ".pth")))),
                   one(lambda n: n == "79999_iter.pth"), one(lambda n: n == "deca_model.tar"),
                   one(lambda n: n == "generic_model.pkl"), one(lambda n: n == "flame_texture.npz"))


def _check_merged_sources(merged: Path, present: dict[str, Path | None]) -> None:
    """A merged file beside the files it was merged from must have been merged from those very files
    (names and sizes, read from its header: no hashing at start); else it is stale and refused."""
    from caphuman.export.merged_weights import merged_metadata

    sources = merged_metadata(merged)["sources"]
    stale = [f"{label}: {path.name} ({path.stat().st_size} bytes) but merged from "
             + (f"{sources[label]['name']} ({sources[label]['bytes']} bytes)" if label in sources else "none")
             for label, path in present.items()
             if path is not None and path.is_file() and (label not in sources or (sources[label]["name"],
                                                         sources[label]["bytes"]) != (path.name, path.stat().st_size))]
    if stale:
        raise ValueError(f"{merged} is stale: the folder has {'; '.join(stale)}. Merge again with `caphuman build "
                         f"--backend torch --weights {merged.parent} --weights-out {merged}`, or delete it")


# command-line option (dest) -> the WeightFiles field that --weights DIR fills it from
OPTION_FILES = {"checkpoint": "checkpoint", "sd_checkpoint": "sd_checkpoint", "vae_checkpoint": "vae_checkpoint",
                "clip_dir": "clip_dir", "facenet_weights": "facenet", "bisenet_weights": "bisenet",
                "deca_model": "deca", "flame_model": "flame_model", "flame_texture": "flame_texture"}


def use_weights_folder(args, require_checkpoint: bool = True, use_merged: bool = True) -> None:
    """Fill the file options of `args` that --weights DIR provides; an option given as well keeps its file,
    an option the command does not have is skipped."""
    if not getattr(args, "weights", None):
        return
    files = WeightFiles.discover(args.weights, require_checkpoint, use_merged)
    for dest, field in OPTION_FILES.items():
        if hasattr(args, dest) and getattr(args, dest) is None and getattr(files, field) is not None:
            setattr(args, dest, str(getattr(files, field)))
