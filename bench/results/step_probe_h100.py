"""Probe (run 19): is the compiled step's run-to-run spread the cuDNN/Triton algorithm choices made
while warming up under two-stream contention? One process per argument; each builds engines in
the order given and times every captured step round-robin (CUDA events, 3 rounds x 50 replays).

    python bench/results/step_probe_h100.py default,default   # second engine reuses the first's choices
    python bench/results/step_probe_h100.py serial,default    # warm-up fill step on one stream first
    python bench/results/step_probe_h100.py heuristic         # cuDNN heuristics (no algorithm search)

Run 20: the GEMMs' algorithms chosen by timing (torch.cuda.tunable, cuBLAS/cuBLASLt candidates)
instead of cuBLAS heuristics: `eager`/`eager_tunable` (uncompiled engine), `tunable` (compiled).

Results: step_probe_h100_run19.jsonl (default 7.05, after a serial warm-up 7.07, cuDNN heuristics
7.00-7.03 ms: no effect; the engine's `serial_autotune` knob was removed afterwards, so `serial` now
runs the default) and step_probe_h100_run20_tunableop.jsonl (TunableOp 7.08 against 7.04 ms
compiled, 11.47 against 11.44 uncompiled: slower). The write_file call at the end does not exist in
torch 2.11 (the error in run 20's log); results were not needed.
"""
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.bench_e2e import inputs, make_denoiser, timed  # noqa: E402
from engines.torch_engine import TorchDenoiserEngine  # noqa: E402
from export.config import load_config, packaged_config  # noqa: E402

cfg = load_config(packaged_config("cldm_v15"))
device = torch.device("cuda")
inp = inputs(cfg, device, torch.float16, 512)
engines, out = [], {"order": sys.argv[1]}
for i, variant in enumerate(sys.argv[1].split(",")):
    if "tunable" in variant:  # GEMM algorithms timed during the warm-up (never inside the capture)
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_filename("/tmp/tunableop_results.csv")
    den = make_denoiser(cfg, device, torch.float16)
    eng = TorchDenoiserEngine(den, device=device, dtype=torch.float16, compile=not variant.startswith("eager"),
                              conv_autotune=variant != "heuristic")
    eng.serial_autotune = variant == "serial"
    t0 = time.perf_counter()
    with torch.no_grad():
        eng.sample(inp["x"], inp["text_c"], inp["text_u"], inp["hint"], inp["ctx"], steps=2)
    torch.cuda.synchronize()
    out[f"{i}_{variant}_setup_s"] = round(time.perf_counter() - t0, 1)
    if "tunable" in variant:
        torch.cuda.tunable.tuning_enable(False)
        out[f"{i}_{variant}_tuned_gemms"] = len(torch.cuda.tunable.get_results())
    engines.append((f"{i}_{variant}", next(iter(eng._states.values())).graph))
    out[f"{i}_{variant}_first_ms"] = timed(engines[-1][1].replay, device, repeat=50)
    print(json.dumps(out), flush=True)
for r in range(3):
    for name, g in engines:
        out.setdefault(f"{name}_rounds_ms", []).append(round(timed(g.replay, device, repeat=50), 4))
print(json.dumps(out), flush=True)
if torch.cuda.tunable.is_enabled():
    torch.cuda.tunable.write_file()
