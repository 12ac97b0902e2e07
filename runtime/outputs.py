"""Writing results: PNG images with their generation parameters in PNG text chunks and a JSON sidecar."""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt when the text is Latin-1 (as PIL's PngInfo.add_text writes it), else uncompressed iTXt (UTF-8)."""
    if not 1 <= len(key) <= 79:
        raise ValueError(f"PNG text key must be 1-79 characters, got {key!r}")
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


_POOL: ThreadPoolExecutor | None = None
_PARALLEL_MIN = 256 << 10  # bytes of filtered rows below which one thread compresses


def _deflate(data: memoryview, level: int, last: bool) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY if level else zlib.Z_DEFAULT_STRATEGY)
    return comp.compress(data) + comp.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)


def _zlib_parallel(raw: np.ndarray, level: int) -> bytes:
    """One zlib stream of `raw`, its pieces deflated in threads (zlib releases the GIL).

    Each piece is raw deflate ending on a byte boundary (a full flush; the last piece finishes the
    stream), so the pieces concatenate into one valid deflate stream; with Huffman-only coding no
    piece refers back into another. Header and Adler-32 of the whole make it a zlib stream."""
    global _POOL
    n = raw.nbytes
    pieces = 1 if n < _PARALLEL_MIN else min(4, os.cpu_count() or 1)
    bounds = [n * i // pieces for i in range(pieces + 1)]
    view = memoryview(raw)
    jobs = [(view[a:b], level, i == pieces - 1) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    if pieces == 1:
        body = [_deflate(*jobs[0])]
    else:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="png")
        body = list(_POOL.map(lambda job: _deflate(*job), jobs))
    header = b"\x78\x01"  # deflate, 32 KiB window, no dictionary, 'fastest' (check bits: 0x7801 % 31 == 0)
    return header + b"".join(body) + struct.pack(">I", zlib.adler32(view) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, text: dict[str, str] | None = None, level: int = 1) -> bytes:
    """RGB, RGBA or grey uint8 [H, W(, 3 | 4)] -> PNG bytes, with `text` as text chunks before the pixels.

    Built for speed over size: every row uses the 'Up' filter (one vectorised subtraction, no
    per-row filter search) and zlib compresses at `level` with Huffman coding only (no match
    search), which on photos and generated images is both faster and smaller than level 1's
    default strategy. About 8% larger than PIL's default (level 6, adaptive filters) on a 512x512
    photo, at a small fraction of its time; large images are compressed by up to four threads.
    Lossless: decoders return the exact pixels.
    `level` 0 stores the rows uncompressed."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"encode_png needs uint8 [H, W], [H, W, 3] or [H, W, 4], got {image.dtype} {image.shape}")
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compression level must be in [0, 9], got {level}")
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"empty image {image.shape}")
    rows = np.ascontiguousarray(image).reshape(h, -1)
    raw = np.empty((h, rows.shape[1] + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type 'Up': each byte minus the byte above (the first row: minus 0)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])
    data = _zlib_parallel(raw.reshape(-1), level)
    color_type = {2: 0, 3: 2, 4: 6}[image.shape[2] if image.ndim == 3 else 2]  # grey, RGB, RGBA
    parts = [_PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))]
    parts += [_text_chunk(k, v) for k, v in (text or {}).items()]
    parts += [_chunk(b"IDAT", data), _chunk(b"IEND", b"")]
    return b"".join(parts)


class OutputExistsError(FileExistsError):
    """An output file is already there and --overwrite was not given."""


class OutputFolderError(ValueError):
    """An output's folder cannot be created or written (read-only, not a folder, no permission)."""


def check_writable_folder(folder: Path) -> None:
    """`folder` exists and takes new files, or can be created: probed by creating (and removing) a file in
    it or in its nearest existing parent, which also catches read-only mounts and ACLs that permission
    bits do not show (and works for root, whom permission bits do not stop)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(f"cannot write into {folder}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".caphuman-write-check-")
    except OSError as e:
        where = "" if existing == folder else f" (its nearest existing folder {existing})"
        raise OutputFolderError(f"cannot write into {folder}{where}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def check_new_outputs(paths, overwrite: bool, flag: str = "--overwrite", rename: str = "--out/--name") -> None:
    """The one output rule of every command, checked before any work: every output's folder takes new
    files (`check_writable_folder`), and existing outputs are refused unless `overwrite`."""
    paths = [Path(p) for p in paths]
    for folder in dict.fromkeys(p.parent for p in paths):
        check_writable_folder(folder)
    if overwrite:
        return
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExistsError(f"{existing[0]}{more} already exists; choose another {rename} or pass {flag}")


def ordinary_mode(folder: bool = False) -> int:
    """The mode an ordinary `open(..., "w")` (0666) or `mkdir` (0777) gives, less the umask; mkstemp's files
    are 0600 and mkdtemp's folders 0700."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def write_files_atomically(payloads: dict[Path, bytes]) -> None:
    """Write every file in full under a temporary name first, then rename each into place in the given
    order: a crash or a full disk leaves no half-written file and, when the renames have not started,
    none of them. Files get ordinary permissions (0644 under the usual umask)."""
    staged: list[tuple[str, Path]] = []
    mode = ordinary_mode()
    try:
        for target, payload in payloads.items():
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.chmod(tmp, mode)
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def save_png_with_sidecar(image: np.ndarray, path: str | Path, parameters: dict,
                          overwrite: bool = True) -> tuple[Path, Path]:
    """Write `path` (PNG, parameters in a 'caphuman' text chunk) and `path.json` as a pair: the sidecar
    is renamed into place first, so a PNG under its final name always has its sidecar. `overwrite=False`
    refuses existing files (check_new_outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_suffix(".json")
    check_new_outputs((path, sidecar), overwrite)
    text = json.dumps(parameters, indent=2, sort_keys=True, default=str)
    png = encode_png(np.asarray(image), {"caphuman": text})
    write_files_atomically({sidecar: text.encode() + b"\n", path: png})
    return path, sidecar
