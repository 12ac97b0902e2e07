"""Probe (run 21): in the captured two-stream step, the UNet encoder's first kernel ran 820 us after
CapFace's (bench/results/profile_step_h100_run18_compiled.json), and the decoder waited for the
encoder. Does the capture order of the two branches, or a stream priority, change that?

    python bench/results/stream_probe_h100.py default,encfirst,prio,encfirst_prio,one_stream

One process; every engine compiled (inductor's cache makes the later ones quick); each step timed
round-robin (3 x 50 replays), plus one profiled replay: each stream's first and last kernel.

Result (stream_probe_h100_run21.json): in every variant the second branch started 580-900 us after
the first; neither order nor priority made the step faster, so the `encoder_first` knob this
probe set was removed from the engine (setting it now does nothing). Run 22 then captured the
branches as three separate graphs: 7.29 against 7.03 ms for one graph (e2e_h100_run22_*), also
removed.
"""
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.bench_e2e import inputs, make_denoiser, timed  # noqa: E402
from bench.profile_step import profile  # noqa: E402
from engines.torch_engine import TorchDenoiserEngine  # noqa: E402
from export.config import load_config, packaged_config  # noqa: E402

cfg = load_config(packaged_config("cldm_v15"))
device = torch.device("cuda")
inp = inputs(cfg, device, torch.float16, 512)
engines, out = [], {"order": sys.argv[1]}
outfile = Path(sys.argv[2]) if len(sys.argv) > 2 else None
for variant in sys.argv[1].split(","):
    den = make_denoiser(cfg, device, torch.float16)
    eng = TorchDenoiserEngine(den, device=device, dtype=torch.float16, compile=True,
                              parallel_side_network=variant != "one_stream")
    eng.encoder_first = variant.startswith("encfirst")
    if variant.endswith("prio"):
        lo, hi = torch.cuda.Stream.priority_range()
        eng._side_stream = torch.cuda.Stream(device, priority=hi)
    t0 = time.perf_counter()
    with torch.no_grad():
        eng.sample(inp["x"], inp["text_c"], inp["text_u"], inp["hint"], inp["ctx"], steps=2)
    torch.cuda.synchronize()
    out[f"{variant}_setup_s"] = round(time.perf_counter() - t0, 1)
    g = next(iter(eng._states.values())).graph
    engines.append((variant, g, eng))
    out[f"{variant}_ms"] = timed(g.replay, device, repeat=50)
    _, _, _, tl = profile(g.replay, replays=1)
    streams = {}
    for st, start, dur, name in tl:
        f = streams.setdefault(str(st), [start, start + dur, 0, name[:40]])
        f[1] = max(f[1], start + dur)
        f[2] += 1
    out[f"{variant}_streams_first_last_count"] = streams
    print(json.dumps(out), flush=True)
    if outfile:
        outfile.write_text(json.dumps(out, indent=1))
for r in range(3):
    for name, g, _ in engines:
        out.setdefault(f"{name}_rounds_ms", []).append(round(timed(g.replay, device, repeat=50), 4))
print(json.dumps(out), flush=True)
if outfile:
    outfile.write_text(json.dumps(out, indent=1))
