"""One-off: relative differences of the before/after latents written by compare_engine_before_after.py."""
import json
import sys
from pathlib import Path

import torch

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for new in sorted(folder.glob("new_*.pt")):
    old = folder / new.name.replace("new_", "old_")
    if old.exists():
        a, b = torch.load(new, weights_only=True), torch.load(old, weights_only=True)
        res[new.stem.replace("new_", "")] = ((a - b).norm() / b.norm()).item()
out.write_text(json.dumps(res, indent=2))
print(json.dumps(res))
