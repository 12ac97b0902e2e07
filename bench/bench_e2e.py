"""CapHuman-RT performance: one denoising step, the VAE decode, and photo-to-PNG end to end, each
compared in ONE run on one GPU against our reference mode (the official way of running: fp32,
eager, serial CFG, CapFace twice per step), the same networks' eager kernels captured in a CUDA
graph, torch.compile of the same networks, and our optimized engine.

    python bench/bench_e2e.py --out bench/results            # full size, needs a CUDA GPU
    python bench/bench_e2e.py --config tiny --device cpu     # a smoke run of the script itself

Random weights at the official sizes (timing does not depend on the values). Prints a table and
writes JSON with the GPU, versions and configuration.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from caphuman.export.config import load_config, packaged_config  # noqa: E402
from caphuman.export.models import VAE, CapHumanDenoiser  # noqa: E402
from caphuman.kernels import attention_triton  # noqa: E402
from caphuman.engines.denoiser import Conditioning  # noqa: E402
from caphuman.engines.eager_engine import EagerEngine  # noqa: E402
from caphuman.engines.loop import sample  # noqa: E402
from caphuman.engines.samplers import DDIM, make_plan  # noqa: E402
from caphuman.runtime.sampling import ddim_sample, dpmpp_2m_sample, sample_with  # noqa: E402

RESULTS: dict = {}
SAVE_DIR: Path | None = None  # set by main: bench_step saves after every mode


def log(msg: str) -> None:
    print(msg, flush=True)


def save(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def timed(fn, device: torch.device, repeat: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def make_denoiser(cfg, device, dtype) -> CapHumanDenoiser:
    torch.manual_seed(0)
    den = CapHumanDenoiser(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # non-zero side-network outputs and a partly-on mask, as trained weights give
        for name, p in den.capface.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.01)
    den = den.to(device, dtype)
    den.alphas_cumprod = den.alphas_cumprod.float()
    return den


def inputs(cfg, device, dtype, size: int):
    g = torch.Generator().manual_seed(1)
    lat = size // 8
    return dict(x=torch.randn(1, 4, lat, lat, generator=g).to(device),
                text_c=torch.randn(1, 77, cfg.context_dim, generator=g).to(device, dtype),
                text_u=torch.randn(1, 77, cfg.context_dim, generator=g).to(device, dtype),
                hint=torch.rand(1, 9, size, size, generator=g).to(device, dtype),
                ctx=torch.randn(1, 258, cfg.context_dim, generator=g).to(device, dtype))


def eager_eps(den, inp, cfg: str):
    """The guided eps of one step (t = 951) on the eager engine: CapFace + UNet, guidance 7."""
    eng = EagerEngine(den)
    eng.prepare(Conditioning(inp["text_c"], inp["text_u"], inp["hint"], inp["ctx"], guidance=7.0, cfg=cfg),
                tuple(inp["x"].shape), DDIM, make_plan(DDIM, den.alphas_cumprod, 20))
    return lambda: eng.guided_eps(inp["x"], 951)


# diffusers' recommended inductor settings for UNets (its torch.compile guide)
INDUCTOR_UNET_OPTIONS = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
                         "coordinate_descent_check_all_directions": True}


def bench_step(cfg, device, size: int, repeat: int, modes: list[str]) -> dict:
    """One denoising step (CapFace + UNet with guidance 7) in each mode."""
    from caphuman.engines.factory import create_engine
    out: dict = {}
    fp16 = torch.float16 if device.type == "cuda" else torch.float32

    if "reference" in modes:
        den = make_denoiser(cfg, device, torch.float32)
        inp = inputs(cfg, device, torch.float32, size)
        with torch.no_grad():
            out["reference_fp32_serial_ms"] = timed(eager_eps(den, inp, "serial"), device, repeat=max(3, repeat // 3))
        log(f"  reference (fp32 eager, serial CFG, CapFace x2): {out['reference_fp32_serial_ms']:.2f} ms")
        del den
    inp = inputs(cfg, device, fp16, size)
    if "eager" in modes:
        den = make_denoiser(cfg, device, fp16)
        with torch.no_grad():
            out["eager_fp16_batched_ms"] = timed(eager_eps(den, inp, "batched"), device, repeat=repeat)
        log(f"  eager fp16, batched CFG: {out['eager_fp16_batched_ms']:.2f} ms")
        del den

    engine_modes = {
        # the same networks' eager kernels (SDPA attention, channels-last), one CUDA graph per step,
        # cuDNN's default (heuristic) convolution algorithms: the baseline as the issue measured it
        "graph_eager_kernels": dict(fast_attention=False, channels_last=True, cuda_graph=True,
                                    parallel_side_network=False, conv_autotune=False, rewrite_networks=False),
        # ... with cuDNN's algorithm search (cudnn.benchmark), which every other mode gets
        "graph_eager_kernels_autotuned": dict(fast_attention=False, channels_last=True, cuda_graph=True,
                                              parallel_side_network=False, rewrite_networks=False),
        # torch.compile of the same networks (inductor, default mode), inside our CUDA graph
        "graph_torch_compile": dict(fast_attention=False, channels_last=True, cuda_graph=True, compile=True,
                                    parallel_side_network=False, rewrite_networks=False, compile_options={}),
        # ... with inductor's 1x1 convolutions as matrix products (the option our compiled engine uses)
        "graph_torch_compile_1x1": dict(fast_attention=False, channels_last=True, cuda_graph=True, compile=True,
                                        parallel_side_network=False, rewrite_networks=False,
                                        compile_options={"conv_1x1_as_mm": True}),
        # ours: Triton attention + static cross-attention K/V, channels-last, CapFace on a second
        # stream concurrent with the UNet's down/mid blocks, one CUDA graph per step
        "optimized": dict(fast_attention=True, channels_last=True, cuda_graph=True),
        "optimized_one_stream": dict(fast_attention=True, channels_last=True, cuda_graph=True,
                                     parallel_side_network=False),
        # the engine's compile defaults (DEFAULT_INDUCTOR_OPTIONS: 1x1 convolutions as matrix products)
        "optimized_compiled": dict(fast_attention=True, channels_last=True, cuda_graph=True, compile=True),
        # ... without the fused GEGLU kernel (cuBLAS GEMM + inductor's gelu*mul, as before it existed)
        "optimized_compiled_no_geglu": dict(fast_attention=True, channels_last=True, cuda_graph=True, compile=True,
                                            fused_geglu=False),
        # ... with the attention kernel's launches autotuned (pointer loads) and AUTO's key-count rule
        # alone, as before the measured per-shape table (attention_triton.TUNED_LAUNCHES) existed
        "optimized_compiled_untuned_attention": dict(fast_attention=True, channels_last=True, cuda_graph=True,
                                                     compile=True, tuned_attention=False),
        # ... with inductor's defaults (1x1 convolutions through cuDNN)
        "optimized_compiled_inductor_defaults": dict(fast_attention=True, channels_last=True, cuda_graph=True,
                                                     compile=True, compile_options={}),
        # + the inductor settings diffusers recommends for UNets (coordinate-descent tuning: over
        # 9 minutes to compile on the H100, so not in the default modes)
        "optimized_compiled_tuned": dict(fast_attention=True, channels_last=True, cuda_graph=True, compile=True,
                                         compile_options=INDUCTOR_UNET_OPTIONS),
    }
    for name, kw in engine_modes.items():
        if name not in modes or device.type != "cuda":
            continue
        kw = dict(kw)
        tuned_launches = dict(attention_triton.TUNED_LAUNCHES)
        if not kw.pop("tuned_attention", True):
            attention_triton.TUNED_LAUNCHES.clear()  # read while capturing: the graph keeps the choice
        try:
            den = make_denoiser(cfg, device, fp16)
            eng = create_engine("torch", den, device=device, dtype=fp16, **kw)
            t0 = time.perf_counter()
            with torch.no_grad():
                sample(eng, inp["x"], Conditioning(inp["text_c"], inp["text_u"], inp["hint"], inp["ctx"]), steps=2)
            torch.cuda.synchronize()
            out[f"{name}_setup_s"] = round(time.perf_counter() - t0, 1)
            state = next(iter(eng._states.values()))
            step = state.graph.replay if state.graph is not None else (lambda: eng._step(state, 2, DDIM))
            out[f"{name}_ms"] = timed(step, device, repeat=repeat)
            # as the sampler runs them: 20 steps back to back (the CPU launches ahead of the GPU)
            out[f"{name}_loop20_ms"] = timed(lambda: [step() for _ in range(20)], device,
                                             repeat=max(3, repeat // 4)) / 20
            log(f"  {name}: {out[f'{name}_ms']:.2f} ms, {out[f'{name}_loop20_ms']:.2f} ms per step in a loop "
                f"of 20 (setup {out[f'{name}_setup_s']} s)")
            if SAVE_DIR is not None:  # after every mode: a run cut short keeps what it measured
                RESULTS.setdefault("step", {}).update(out)
                goals(RESULTS)
                save(SAVE_DIR)
            eng.close()
            del eng, den
            torch.cuda.empty_cache()
        except Exception as e:  # a failing mode is reported, not fatal
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  {name}: FAILED {out[f'{name}_error']}")
        finally:
            attention_triton.TUNED_LAUNCHES.update(tuned_launches)
    return out


def bench_people(cfg, device, size: int, repeat: int, modes: list[str], counts=(1, 2, 3)) -> dict:
    """One guided step at batch 1 with 1, 2, 3 people (CapFace once over all of them, in the step's CUDA
    graph), per torch-engine mode; each extra person's cost relative to the one-person step."""
    from caphuman.engines.factory import create_engine
    fp16 = torch.float16 if device.type == "cuda" else torch.float32
    out: dict = {}
    for mode in modes:
        kw = {"optimized": dict(compile=False), "optimized_compiled": dict(compile=True)}[mode]
        den = make_denoiser(cfg, device, fp16)
        eng = create_engine("torch", den, device=device, dtype=fp16, **kw)
        g = torch.Generator().manual_seed(3)
        inp = inputs(cfg, device, fp16, size)
        hints = [inp["hint"]] + [torch.rand(inp["hint"].shape, generator=g).to(device, fp16) for _ in range(max(counts))]
        ctxs = [inp["ctx"]] + [torch.randn(inp["ctx"].shape, generator=g).to(device, fp16) for _ in range(max(counts))]
        for people in counts:
            cond = Conditioning(inp["text_c"], inp["text_u"], hints[0] if people == 1 else hints[:people],
                                ctxs[0] if people == 1 else ctxs[:people])
            t0 = time.perf_counter()
            with torch.no_grad():
                sample(eng, inp["x"], cond, steps=2)
            if device.type == "cuda":
                torch.cuda.synchronize()
            state = next(st for key, st in eng._states.items() if key[-1] == people)
            out[f"{mode}_people{people}_setup_s"] = round(time.perf_counter() - t0, 1)
            step = state.graph.replay if state.graph is not None else (lambda st=state: eng._step(st, 2, DDIM))
            out[f"{mode}_people{people}_ms"] = timed(step, device, repeat=repeat)
            log(f"  {mode}, {people} people: {out[f'{mode}_people{people}_ms']:.2f} ms "
                f"(setup {out[f'{mode}_people{people}_setup_s']} s)")
            if SAVE_DIR is not None:  # after every count: a run cut short keeps what it measured
                RESULTS.setdefault("people", {}).update(out)
                save(SAVE_DIR)
        one = out[f"{mode}_people1_ms"]
        for people in counts[1:]:  # each person beyond the first, as a fraction of the one-person step
            out[f"{mode}_people{people}_cost_per_extra_person"] = round(
                (out[f"{mode}_people{people}_ms"] - one) / one / (people - 1), 3)
        if SAVE_DIR is not None:
            RESULTS.setdefault("people", {}).update(out)
            save(SAVE_DIR)
        eng.close()
        del eng, den
        torch.cuda.empty_cache()
    return out


def bench_vae(cfg, device, size: int, repeat: int) -> dict:
    out = {}
    z = torch.randn(1, 4, size // 8, size // 8, device=device)
    torch.manual_seed(0)
    vae32 = VAE(cfg).eval().requires_grad_(False).to(device)
    with torch.no_grad():
        out["vae_decode_fp32_ms"] = timed(lambda: vae32.decode(z), device, repeat=max(3, repeat // 2))
        if device.type == "cuda":
            vae16 = VAE(cfg).eval().requires_grad_(False).to(device, torch.float16)
            vae16.load_state_dict(vae32.state_dict())
            z16 = z.half()
            out["vae_decode_fp16_ms"] = timed(lambda: vae16.decode(z16), device, repeat=repeat)
            vae16.model.to(memory_format=torch.channels_last)
            out["vae_decode_fp16_channels_last_ms"] = timed(lambda: vae16.decode(z16), device, repeat=repeat)
    for k, v in out.items():
        log(f"  {k}: {v:.2f} ms")
    return out


def bench_sampler_difference(cfg, device, size: int) -> dict:
    """DPM-Solver++(2M) in fewer steps vs DDIM at 20 steps: latent difference (random weights, so this
    measures the solvers' agreement, not image quality)."""
    dt = torch.float16 if device.type == "cuda" else torch.float32
    den = make_denoiser(cfg, device, dt)
    inp = inputs(cfg, device, dt, size)
    out = {}
    with torch.no_grad():
        ref = ddim_sample(den, inp["x"], inp["text_c"], inp["text_u"], inp["hint"], inp["ctx"], steps=20)
        for n in (10, 12, 15):
            x = dpmpp_2m_sample(den, inp["x"], inp["text_c"], inp["text_u"], inp["hint"], inp["ctx"], steps=n)
            out[f"dpmpp2m_{n}_vs_ddim20_rel_err"] = ((x - ref).norm() / ref.norm()).item()
    log(f"  {out}")
    return out


class Stages:
    """Wall-clock milliseconds per stage (synchronising the GPU at each boundary)."""

    def __init__(self, device):
        self.device, self.ms, self._t = device, {}, None

    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._t is not None:
            self.ms[self._t[0]] = (now - self._t[1]) * 1e3
        self._t = (name, now) if name else None


SAMPLER_RUNS = (("ddim", 20), ("dpmpp_2m", 10), ("dpmpp_2m", 15))  # the first is the reference of the others


def bench_end_to_end(cfg, device, reference: str, pose: str, repeat: int, compile_engine: bool = False,
                     vae_mode: str = "compile", sampler_runs=SAMPLER_RUNS) -> dict:
    """Photo in, PNG out at 512x512, 20 DDIM steps, guidance 7: detection, identity (FaceNet, BiSeNet,
    CLIP), DECA + head hint, text, denoising, VAE decode, PNG encode. Random weights at the official
    sizes; both modes render the hint with the CUDA rasterizer (the official code renders on the GPU
    with pytorch3d).

    reference mode = the official way: fp32 eager networks, serial CFG, MTCNN (ours, on the CPU) run on
    the native photo and again on DECA's 512 frame, one DECA pass per photo, both prompts encoded,
    PIL's default PNG encoder.
    optimized = fp16 networks; the pose photo decoded while the reference photo is detected; MTCNN on
    the GPU (once when the 512 frame is the photo itself); FaceNet, BiSeNet, CLIP image and text
    towers and DECA's encoder (both photos in one batch) replayed from CUDA graphs; the empty
    negative prompt encoded once per process; the torch engine (one CUDA graph per step, Triton
    attention); the VAE decoder compiled (`vae_mode`); `caphuman.runtime.outputs.encode_png`."""
    from PIL import Image

    from caphuman.engines.factory import create_engine
    from caphuman.export.clip import ImageEncoder, TextEncoder
    from caphuman.export.face.bisenet import BiSeNet
    from caphuman.export.face.deca_encoder import DecaEncoder
    from caphuman.export.face.facenet import InceptionResnetV1
    from caphuman.runtime.condition.builder import ConditionBuilder
    from caphuman.runtime.condition.faces import FaceAnalyzer
    from caphuman.runtime.condition.graphs import CudaGraphed
    from caphuman.runtime.condition.hint import cuda_renderer
    from caphuman.runtime.condition.identity import identity_context
    from caphuman.runtime.condition.text import PromptEncoder
    from caphuman.runtime.outputs import encode_png
    from caphuman.runtime.pipeline import latents_to_uint8

    out: dict = {}
    gpu = device.type == "cuda"
    fast = torch.float16 if gpu else torch.float32  # the CPU run is a smoke test of this script
    t_cold = time.perf_counter()
    prompt, negative = "a photo of a person, best quality", ""

    def build(dtype):
        torch.manual_seed(0)
        m = dict(text=TextEncoder(cfg.text_clip), image=ImageEncoder(cfg.vision_clip), facenet=InceptionResnetV1(),
                 bisenet=BiSeNet(), deca=DecaEncoder(), vae=VAE(cfg))
        m = {k: v.eval().requires_grad_(False).to(device, dtype) for k, v in m.items()}
        m["den"] = make_denoiser(cfg, device, dtype)
        return m

    from caphuman.kernels.raster_reference import render_hint
    renderer = cuda_renderer(device) if gpu else render_hint

    def reference_png(img):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue()

    latents: dict = {}

    def run_once(m, builder, sample_fn, text_fn, decode_fn, png_fn, dtype, together=False, keep=None):
        st = Stages(device)
        st("detect")
        if together:  # the pose photo decodes in a thread while the reference photo is detected
            ref_photo, pose_photo = builder.analyzer.analyze_many([reference, pose])
        else:
            ref_photo, pose_photo = builder.analyzer.analyze(reference), builder.analyzer.analyze(pose)
        st("identity")
        ctx = identity_context(m["den"], m["facenet"], m["bisenet"], m["image"], ref_photo)
        st("condition")
        cond, _, _ = builder.build(ref_photo, pose_photo, "position,pose", renderer=renderer)
        hint = torch.as_tensor(np.asarray(cond.hint) if not gpu else cond.hint, device=device)[None].to(dtype)
        st("text")
        text_c, text_u = text_fn(prompt).to(dtype), text_fn(negative).to(dtype)
        st("denoise")
        noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(12345)).to(device)
        lat = sample_fn(noise, text_c, text_u, hint, ctx.to(dtype))
        if keep is not None:
            latents[keep] = lat.float().clone()
        st("decode")
        img = latents_to_uint8(decode_fn(lat.to(dtype)))[0]
        st("png")
        png = png_fn(img)
        st("")
        st.ms["png_bytes"] = len(png)
        return st.ms

    def median_stages(runs):
        return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}

    def total(stages):
        return sum(v for k, v in stages.items() if k != "png_bytes")

    with torch.no_grad():
        # optimized first: its first image measures the cold start (weights are built, not read)
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        m = build(fast)
        opt = dict(m)
        builder = ConditionBuilder(analyzer=FaceAnalyzer(device=device if gpu else None))
        if gpu:  # the condition networks run from CUDA graphs (batch 1, fixed shapes per photo size)
            for k in ("facenet", "bisenet", "image", "deca"):
                opt[k] = CudaGraphed(m[k])
        builder.deca = opt["deca"]
        prompts = PromptEncoder(m["text"], constant=(negative,), graph=gpu)
        decode_fn = m["vae"].decode
        if gpu and vae_mode == "channels_last":
            m["vae"].model.to(memory_format=torch.channels_last)
        elif gpu and vae_mode == "graph":
            decode_fn = CudaGraphed(m["vae"])
        elif gpu and vae_mode == "compile":
            decode_fn = torch.compile(m["vae"].decode)
        out["vae_mode"] = vae_mode if gpu else "eager"
        eng = create_engine("torch", m["den"], device=device, dtype=fast, compile=compile_engine and gpu)
        out["engine"] = "torch engine, one CUDA graph per step" + (", torch.compile" if compile_engine and gpu else "")
        def opt_run(sampler="ddim", steps=20, keep=None):
            fn = lambda *a: sample_with(sampler, eng, *a, steps=steps, guidance=7.0)  # noqa: E731
            return run_once(opt, builder, fn, prompts, decode_fn, encode_png, fast, together=True, keep=keep)

        first = opt_run()
        out["cold_start_to_first_image_s"] = round(time.perf_counter() - t_cold, 2)
        out["cold_start_note"] = "process already up; builds random-weight networks (no checkpoint read) and captures the graphs"
        runs = [opt_run() for _ in range(repeat)]
        out["optimized_stages_ms"] = median_stages(runs)
        out["optimized_ms"] = total(out["optimized_stages_ms"])
        # each sampler on the same engine, photo to PNG; latents against the first (DDIM-20)
        for sampler, steps in sampler_runs:
            name = f"{sampler}_{steps}"
            opt_run(sampler, steps, keep=name)  # prepares (captures) this sampler's step
            stages = median_stages([opt_run(sampler, steps) for _ in range(repeat)])
            out.setdefault("samplers", {})[name] = {"stages_ms": stages, "total_ms": total(stages)}
            ref_name = f"{sampler_runs[0][0]}_{sampler_runs[0][1]}"
            ref = latents[ref_name]
            out["samplers"][name][f"latents_rel_diff_vs_{ref_name}"] = ((latents[name] - ref).norm() / ref.norm()).item()
            log(f"  {name}: {out['samplers'][name]['total_ms']:.1f} ms, latents vs {ref_name}: "
                f"{out['samplers'][name][f'latents_rel_diff_vs_{ref_name}']:.4f}")
        if gpu:
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            out["graph_capture_failures"] = {k: v.failed for k, v in opt.items() if isinstance(v, CudaGraphed) and v.failed}
            if isinstance(decode_fn, CudaGraphed) and decode_fn.failed:
                out["graph_capture_failures"]["vae"] = decode_fn.failed
            if isinstance(prompts._tower, CudaGraphed) and prompts._tower.failed:
                out["graph_capture_failures"]["text"] = prompts._tower.failed
        out["first_image_stages_ms"] = first
        log(f"  optimized: {out['optimized_ms']:.1f} ms {out['optimized_stages_ms']}")
        eng.close()
        del m, opt, eng, decode_fn, prompts
        if gpu:
            torch.cuda.empty_cache()

        m = build(torch.float32)
        # MTCNN on the CPU, run on the photo and again on its 512 frame; each photo through DECA alone
        ref_builder = ConditionBuilder(analyzer=FaceAnalyzer(reuse_frame_detection=False))
        ref_builder.batch_photos = False
        ref_builder.deca = m["deca"]
        ref_fn = lambda *a: ddim_sample(m["den"], *a, steps=20, guidance=7.0, cfg="serial")
        ref_text = lambda p: m["text"]([p])
        runs = [run_once(m, ref_builder, ref_fn, ref_text, m["vae"].decode, reference_png, torch.float32)
                for _ in range(max(1, repeat - 1))]
        out["reference_stages_ms"] = median_stages(runs)
        out["reference_ms"] = total(out["reference_stages_ms"])
        out["speedup"] = out["reference_ms"] / out["optimized_ms"]
        log(f"  reference: {out['reference_ms']:.1f} ms {out['reference_stages_ms']}")
        del m
    return out


def environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    for mod in ("diffusers", "transformers", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cldm_v15", help="packaged config name or a path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--parts", default="step,vae,e2e,sampler,compile",
                    help="in run order; 'compile' (torch.compile variants of the step) takes minutes; 'people' "
                         "(the step with 1, 2, 3 people) is not in the default run")
    ap.add_argument("--modes", default="reference,eager,graph_eager_kernels,graph_eager_kernels_autotuned,optimized")
    ap.add_argument("--compile-modes", default="graph_torch_compile,graph_torch_compile_1x1,optimized_compiled")
    ap.add_argument("--people-modes", default="optimized,optimized_compiled",
                    help="torch-engine modes of the 'people' part (optimized, optimized_compiled)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    faces = ROOT / "tests" / "data" / "faces"  # real photos shipped with the tests
    ap.add_argument("--reference", default=str(faces / "reference_196251.png"), help="reference photo (e2e)")
    ap.add_argument("--pose", default=str(faces / "pose1.png"), help="pose photo (e2e)")
    ap.add_argument("--e2e-repeat", type=int, default=3)
    ap.add_argument("--e2e-compile", action="store_true", help="end to end with the compiled torch engine (minutes to set up)")
    ap.add_argument("--e2e-vae", default="compile", choices=["compile", "graph", "eager", "channels_last"],
                    help="optimized VAE decode: torch.compile (default; ~26 s to compile on the H100), CUDA graph, "
                         "eager NCHW, eager channels-last")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg_path = args.config if os.path.sep in args.config else packaged_config(
        "cldm_tiny" if args.config == "tiny" else args.config)
    cfg = load_config(cfg_path)
    parts = args.parts.split(",")
    unknown = set(parts) - {"step", "vae", "e2e", "sampler", "compile", "people"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    out = Path(args.out)
    global SAVE_DIR
    SAVE_DIR = out
    RESULTS.update(environment=environment(device), config=str(Path(cfg_path).name), size=args.size,
                   steps=20, guidance=7.0, batch=1)
    save(out)
    jobs = {
        "step": ("one denoising step (CapFace + UNet, guidance 7):",
                 lambda: RESULTS.setdefault("step", {}).update(
                     bench_step(cfg, device, args.size, args.repeat, args.modes.split(",")))),
        "compile": ("one denoising step, torch.compile variants:",
                    lambda: RESULTS.setdefault("step", {}).update(
                        bench_step(cfg, device, args.size, args.repeat, args.compile_modes.split(",")))),
        "vae": ("VAE decode:", lambda: RESULTS.__setitem__("vae", bench_vae(cfg, device, args.size, args.repeat))),
        "e2e": ("end to end (reference photo + pose photo -> PNG):",
                lambda: RESULTS.__setitem__("e2e", bench_end_to_end(cfg, device, args.reference, args.pose,
                                                                      args.e2e_repeat, args.e2e_compile,
                                                                      args.e2e_vae))),
        "people": ("one step with 1, 2, 3 people (batch 1):",
                   lambda: RESULTS.setdefault("people", {}).update(
                       bench_people(cfg, device, args.size, args.repeat, args.people_modes.split(",")))),
        "sampler": ("DPM-Solver++(2M) vs DDIM-20:",
                    lambda: RESULTS.__setitem__("sampler", bench_sampler_difference(cfg, device, args.size))),
    }
    for part in parts:  # in the order asked; results are saved after each
        log(jobs[part][0])
        jobs[part][1]()
        goals(RESULTS)
        save(out)
    goals(RESULTS)
    save(out)
    print(json.dumps(RESULTS, indent=2, default=str))
    return 0


def goals(r: dict) -> None:
    s = r.get("step", {})
    # the goals are judged on what users get: the compiled engine with its defaults where it was
    # measured, otherwise the fastest optimized mode measured
    ours = {k[:-3]: v for k, v in s.items() if k.startswith("optimized") and k.endswith("_ms")
            and not k.endswith("_loop20_ms")}
    mode = "optimized_compiled" if "optimized_compiled" in ours else min(ours, key=ours.get, default=None)
    best = ours.get(mode)
    g = {}
    if best is not None:
        g["step_mode"] = mode
        g["step_ms"] = best
        g["step_goal_7ms"] = best <= 7.0
        if "graph_eager_kernels_ms" in s:
            g["step_vs_graph_eager_kernels"] = s["graph_eager_kernels_ms"] / best
            g["step_goal_2x_vs_graph_eager"] = g["step_vs_graph_eager_kernels"] >= 2.0
        if "graph_eager_kernels_autotuned_ms" in s:  # reported too: the baseline with cudnn.benchmark
            g["step_vs_graph_eager_kernels_autotuned"] = s["graph_eager_kernels_autotuned_ms"] / best
        compiled = {k[:-3]: v for k, v in s.items() if k.startswith("graph_torch_compile") and k.endswith("_ms")
                    and not k.endswith("_loop20_ms")}
        if compiled:  # the best torch.compile configuration measured
            g["best_torch_compile_mode"] = min(compiled, key=compiled.get)
            g["step_vs_best_torch_compile"] = min(compiled.values()) / best
            g["step_goal_faster_than_compile"] = best < min(compiled.values())
        if "reference_fp32_serial_ms" in s:
            g["step_vs_reference"] = s["reference_fp32_serial_ms"] / best
    e = r.get("e2e", {})
    if "optimized_ms" in e and "reference_ms" in e:
        g["e2e_ms"] = e["optimized_ms"]
        g["e2e_goal_250ms"] = e["optimized_ms"] <= 250
        g["e2e_vs_reference"] = e["reference_ms"] / e["optimized_ms"]
        g["e2e_goal_8x"] = g["e2e_vs_reference"] >= 8
    if "peak_memory_gb" in e:
        g["memory_goal_6gb"] = e["peak_memory_gb"] <= 6
    r["goals"] = g


if __name__ == "__main__":
    sys.exit(main())
