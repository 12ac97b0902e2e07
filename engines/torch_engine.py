"""The torch engine: the fast path on the GPU we can reach.

One denoising step -- CapFace at batch N (N x people with several people: one pass for all of them), the
UNet at batch 2N on the [cond, uncond] pair, guidance and the sampler's update (`caphuman.engines.samplers`)
-- runs as ONE CUDA graph over static buffers, captured once per (batch, height, width, sampler, guidance
on/off, noise on/off, tau on/off, people) and replayed
every step; per step only the timestep, the sampler's scalars and the tau gate are written into their
buffers (device-side copies: the host never waits for the GPU). Networks run in fp16 (or fp32), channels-last, with the Triton
attention processors of `caphuman.export.attention_processors` where that module is present.

Cross-attention K/V are computed once per request: `StaticCrossKV` holds one K and one V buffer
per cross-attention layer; a request writes the text pair's and the identity context's
projections into them (outside the graph) and the captured graph reads them. ID dropout (tau)
multiplies CapFace's cached K/V by a 0/1 gate, which equals projecting the gated context because
SD's `to_k`/`to_v` have no bias.

Aliasing: `step` returns the static buffers (x and the sampler's state), valid until the next step.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import time
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from caphuman.export.models import CapHumanDenoiser
from caphuman.export.networks import hard_mask_like, run_unet, unet_decode, unet_encode
from caphuman.export.onnx_specs import graph_specs
from caphuman.export.time_projections import fuse_time_projections

from .base import EngineError, check_feed
from .denoiser import NUM_IDENTITY_TOKENS, Conditioning, DenoiserEngine
from .samplers import Plan, Sampler

log = logging.getLogger(__name__)


def _kernel_module(name: str):
    """One of export's kernel hook-ups (attention processors, fused GEGLU), or None where its
    dependencies (triton, diffusers) are missing: the engine then runs the networks unchanged."""
    try:
        return importlib.import_module(f"caphuman.export.{name}")
    except ImportError:
        return None


class StaticCrossKV:
    """Cross-attention K/V in static buffers, duck-typed as the `kv_cache` of `FastAttnProcessor`.

    mode "off": compute K/V as usual; "fill": compute them and store into this key's buffers,
    remembering which context each layer reads; "use": return the buffers (inside CUDA graphs).
    """

    def __init__(self):
        self.mode = "off"
        self.sources: dict[str, torch.Tensor] = {}       # source name -> the static context buffer
        # attn.kv_cache_name -> (attn, source, K, V); keyed by the layer's name, not id(attn): the K/V become
        # inputs of the compiled graphs under this key, and an id-based key differs in every process, which
        # made AOTAutograd's cache (hence torch artifacts) miss and re-trace the UNet at each start
        self.entries: dict[str, tuple] = {}
        self.gate: torch.Tensor | None = None            # 0/1 for the identity context (tau), or None

    def get_or_compute(self, attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "off":
            return attn.to_k(context), attn.to_v(context)
        entry = self.entries.get(attn.kv_cache_name)
        if self.mode == "fill":
            source = next((n for n, buf in self.sources.items() if buf is context), None)
            if source is None:
                raise EngineError("cross-attention context is not a static buffer of the torch engine")
            if source == "identity" and (attn.to_k.bias is not None or attn.to_v.bias is not None):
                raise EngineError("identity K/V gating needs bias-free to_k/to_v (SD1.x has none)")
            k, v = attn.to_k(context), attn.to_v(context)
            if entry is None:
                entry = (attn, source, k, v)
                self.entries[attn.kv_cache_name] = entry
            else:
                entry[2].copy_(k)
                entry[3].copy_(v)
        if entry is None:
            raise EngineError("K/V of a cross-attention layer were not filled before use")
        _, source, k, v = entry
        if source == "identity" and self.gate is not None:
            return k * self.gate, v * self.gate
        return k, v

    @torch.no_grad()
    def refill(self) -> None:
        """Recompute every stored K/V from the current contents of the context buffers (eager)."""
        for attn, source, k, v in self.entries.values():
            ctx = self.sources[source]
            k.copy_(attn.to_k(ctx))
            v.copy_(attn.to_v(ctx))


@dataclass
class _StepState:
    """Static buffers and the captured graph of one (batch, size, sampler, flags) key."""
    x: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    guided: torch.Tensor  # CapFace's guided hint, computed once per request (it depends on the hint alone)
    hard: dict  # (h, w) -> the hard head mask at that residual resolution, once per request
    ctx: torch.Tensor
    strength: torch.Tensor
    guidance: torch.Tensor
    model_scale: torch.Tensor | None   # the sampler's input scale (None: the model sees x as it is)
    coeffs: torch.Tensor               # the sampler's per-step scalars
    state: tuple                       # the sampler's carried tensors
    noise: torch.Tensor | None
    gate: torch.Tensor | None
    control_hints: list                # one per extra ControlNet, at the UNet's batch (both branches)
    coeff_values: list = field(default_factory=list)     # views of coeffs' elements, filled per step
    strength_values: list = field(default_factory=list)  # views of strength's elements, filled per request
    kv: StaticCrossKV = field(default_factory=StaticCrossKV)
    graph: torch.cuda.CUDAGraph | None = None
    people: int = 1                    # CapFace runs at batch people*N (person-major rows)


# inductor options of `compile=True` unless `compile_options` is given: 1x1 convolutions (proj_in,
# proj_out, zero convs, shortcuts) as matrix products, which inductor fuses with their neighbours
# (6.91 against 7.01 ms per step on the H100: bench/results/e2e_h100_run16_shared_prefix_1x1.json)
DEFAULT_INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True}


class TorchDenoiserEngine(DenoiserEngine):
    """The CapHuman denoiser in PyTorch, fast: `step` replays one CUDA graph per step (see the module
    docstring); `run` computes the `denoiser` graph's I/O (one eps, no guidance) for checks."""

    backend = "torch"

    def __init__(self, den: CapHumanDenoiser, *, device: str | torch.device = "cuda", dtype=torch.float16,
                 channels_last: bool | None = None, fast_attention: bool = True, cuda_graph: bool | None = None,
                 compile: bool = False, parallel_side_network: bool | None = None, rewrite_networks: bool = True,
                 compile_options: dict | None = None, compile_backend="inductor", conv_autotune: bool = True,
                 fused_geglu: bool | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        on_gpu = self.device.type == "cuda"
        self.cuda_graph = on_gpu if cuda_graph is None else cuda_graph
        if self.cuda_graph and not on_gpu:
            raise EngineError("CUDA graphs need a CUDA device")
        schedule = den.alphas_cumprod.detach().float().cpu().clone()  # .to(fp16) would round the schedule
        self.den = den.to(self.device, dtype).eval().requires_grad_(False)
        self.den.alphas_cumprod = schedule.to(self.device)
        self.alphas_cumprod = schedule
        self.spec = graph_specs(den.config)["denoiser"]
        self.hint_channels = den.config.capface.hint_channels
        self.num_residuals = den.num_residuals
        if compile:
            self.backend = "torch-compiled"
        self.channels_last = channels_last if channels_last is not None else on_gpu
        if self.channels_last:
            self.den.unet.to(memory_format=torch.channels_last)
            self.den.capface.to(memory_format=torch.channels_last)
            self.den.controlnets.to(memory_format=torch.channels_last)
        # Same-math rewrites of the networks, with fused weight copies made from the weights as
        # they are now (held outside the modules: the state dict keeps its keys): the blocks' time
        # projections as one GEMM, transformer outputs left in channels-last, and (below, with our
        # attention) self-attention q/k/v as one GEMM. Load weights before building the engine.
        self.rewrite_networks = rewrite_networks
        if rewrite_networks:
            for net in (self.den.unet, self.den.capface.net):
                fuse_time_projections(net)
                if self.channels_last:
                    keep_transformer_outputs_channels_last(net)
        self._attn = _kernel_module("attention_processors") if fast_attention else None
        self._proxy = _KVProxy()
        if self._attn is not None:
            for label, net in (("unet", self.den.unet), ("capface", self.den.capface.net)):
                for name, m in net.named_modules():
                    if isinstance(m, self._attn.Attention):
                        m.kv_cache_name = f"{label}.{name}"  # StaticCrossKV's key
                        m.set_processor(self._attn.FastAttnProcessor(self._attn.AttnBackend.AUTO, self._proxy))
                        if rewrite_networks:
                            m.processor.fuse_qkv(m)  # self-attention q/k/v in one GEMM
        # The feed-forwards' GEGLU as one Triton GEMM with the gated GELU in its epilogue, with our
        # other kernels (fused_geglu defaults to fast_attention); inside CUDA graphs only, where it
        # measured faster (export/fused_ff.py, docs/kernels.md)
        self._fused_ff = (_kernel_module("fused_ff") if (fast_attention if fused_geglu is None else fused_geglu)
                          else None)
        if self._fused_ff is not None:
            for net in (self.den.unet, self.den.capface.net):
                self._fused_ff.enable_fused_geglu(net)
        # The UNet's first self-attention sees the two CFG branches before any text has entered
        # (same latents, same timestep): it runs on one branch and is tiled (see _step).
        self._first_self_attn = _first_self_attention_processor(self.den.unet) if self._attn is not None else None
        self._unet_fn = self.den.unet
        self._capface_fn = self.den.capface
        self._capface_res_fn = self._capface_residuals
        self._unet_enc_fn = self._unet_first_half
        self._compiled = None
        self.compile_backend = compile_backend if compile else None   # (with compile_options) what artifacts key on
        self.compile_options = None
        if compile:
            # one compiled graph per (batch, size, flags) key and function: a server's buckets and
            # request variants pass dynamo's default limit of 8, after which it runs them eagerly
            limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))

            options = None
            if compile_backend == "inductor":
                options = DEFAULT_INDUCTOR_OPTIONS if compile_options is None else compile_options
            self.compile_options = options

            def compiled(fn):
                return torch.compile(fn, dynamic=False, backend=compile_backend, options=options)

            self._compiled = compiled
            self._unet_fn = compiled(self.den.unet)
            self._capface_fn = compiled(self.den.capface)
            self._capface_res_fn = compiled(self._capface_residuals)
            self._unet_enc_fn = compiled(self._unet_enc_fn)
        self._decoders: dict[str, tuple[Callable, Callable]] = {}  # sampler name -> (eager, fast) decode+update
        # cuDNN picks each convolution's algorithm by timing them (cudnn.benchmark) during the
        # warm-up before a CUDA-graph capture; the capture replays those choices
        self.conv_autotune = conv_autotune
        # CapFace only feeds the UNet's skip connections and mid output, so the UNet's down and mid
        # blocks do not wait for it: on the GPU CapFace runs on a second stream, concurrently with
        # them (inside the same CUDA graph), and the UNet's up blocks join both.
        parallel = on_gpu if parallel_side_network is None else parallel_side_network
        if parallel and not on_gpu:
            raise EngineError("parallel_side_network needs a CUDA device (it uses a second CUDA stream)")
        self._side_stream = torch.cuda.Stream(self.device) if parallel else None
        self._states: dict[tuple, _StepState] = {}
        self._active: _StepState | None = None       # the prepared request's state
        self._branches = 2
        self._cond: Conditioning | None = None
        self._plan_rows: tuple | None = None        # (plan, its coefficient rows and input scales as floats)

    # -- the denoiser graph's I/O: one fused call, no guidance (checks against the ONNX graph) ------
    @torch.no_grad()
    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.spec, feed)
        self._proxy.target = None
        f = {k: v.to(self.device) for k, v in feed.items()}
        f = {k: (v.to(self.dtype) if v.is_floating_point() and k != "strength" else v) for k, v in f.items()}
        res, mask = self._capface_fn(f["sample"], f["timestep"], f["hint"], f["identity_context"])
        scaled = [(r * f["strength"][i]) * hard_mask_like(mask, r) for i, r in enumerate(res)]
        return {"eps": run_unet(self._unet_fn, f["sample"], f["timestep"], f["text_embeddings"], scaled)}

    # -- the DenoiserEngine contract ----------------------------------------------------------------
    def _prepare(self, cond: Conditioning, n: int, h: int, w: int, sampler: Sampler, plan: Plan) -> None:
        """Fill this request's buffers; on a new key, warm up (Triton JIT, cuDNN) and capture the step."""
        branches = 1 if cond.guidance == 1.0 else 2
        scaled_input = bool((plan.model_scale != 1).any())
        people = cond.people
        if people > 1 and self.den.extra_controls:
            raise ValueError("extra ControlNets run with one person only (their hint is not per person)")
        key = (n, h, w, branches, sampler.name, sampler.update, plan.noisy, bool(cond.tau), scaled_input,
               len(self.den.extra_controls), people)
        first = key not in self._states
        # a new key's state is kept only once its warm-up and capture succeeded
        s = self._states[key] if not first else self._state(n, h, w, branches, sampler, plan, bool(cond.tau),
                                                            scaled_input, people)
        dt = self.dtype
        c = cond.text_cond.to(self.device, dt).expand(n, -1, -1)
        s.text.copy_(c if branches == 1 else torch.cat([c, cond.text_uncond.to(self.device, dt).expand(n, -1, -1)]))
        # people stacked person-major: rows p*n .. p*n+n-1 are person p's
        self._fill_hints(s, torch.cat([hint.to(self.device, dt).expand(n, -1, -1, -1) for hint in cond.hints]))
        s.ctx.copy_(torch.cat([ctx.to(self.device, dt).expand(n, -1, -1) for ctx in cond.contexts]))
        # scalars by fills, not host-to-device copies: a copy from pageable memory waits for the GPU, and the
        # host would stop queueing work ahead of it
        strengths = cond.strength_vector(self.num_residuals).tolist()
        if people == 1:
            for buf, value in zip(s.strength_values, strengths):
                buf.fill_(value)
        else:
            for i, value in enumerate(strengths):
                for p, person_scale in enumerate(cond.person_scales):
                    s.strength[i, p * n:(p + 1) * n].fill_(value * person_scale)
        s.guidance.fill_(float(cond.guidance))
        self._cond, self._branches = cond, branches
        self._decoder(sampler)
        started = time.perf_counter()
        hits = _inductor_cache_counts()
        self._setup_kv(s, sampler, branches, first, plan)
        if first and self._compiled is not None and self.cuda_graph:  # the warm-up before capture compiles
            now = _inductor_cache_counts()
            log.info("torch engine: compiled batch %d at %dx%d (%s) in %.1f s; inductor cache %d hit(s), %d miss(es)",
                     n, h, w, sampler.name, time.perf_counter() - started, now[0] - hits[0], now[1] - hits[1])
        if first:
            self._states[key] = s
        self._active = s
        self._plan_rows = (plan, plan.coeffs.tolist(), plan.model_scale.tolist())

    def finish(self) -> None:
        self._proxy.target = None
        self._active, self._cond, self._plan_rows = None, None, None

    def step(self, x: torch.Tensor, state: tuple, plan: Plan, sampler: Sampler, i: int,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        s = self._active
        if self._plan_rows[0] is not plan:
            self._plan_rows = (plan, plan.coeffs.tolist(), plan.model_scale.tolist())
        _, rows, scales = self._plan_rows
        if x is not s.x:
            s.x.copy_(x)
        for buf, value in zip(s.state, state):
            if value is not buf:
                buf.copy_(value)
        t = plan.timesteps[i]
        s.t.fill_(t)
        for buf, value in zip(s.coeff_values, rows[i]):  # fills: the host never waits for the GPU here
            buf.fill_(value)
        if s.model_scale is not None:
            s.model_scale.fill_(scales[i])
        if s.gate is not None:
            s.gate.fill_(1.0 if self._cond.identity_on(t) else 0.0)
        if s.noise is not None:
            s.noise.copy_(noise)
        if s.graph is not None:
            s.graph.replay()
        else:
            self._step(s, self._branches, sampler)
        return s.x, s.state

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The guided eps alone (no sampler update), eagerly on the prepared request's buffers."""
        s, branches = self._active, self._branches
        s.x.copy_(x)
        s.t.fill_(t)
        if s.model_scale is not None:
            s.model_scale.fill_(1.0)
        if s.gate is not None:
            s.gate.fill_(1.0 if self._cond.identity_on(t) else 0.0)
        scaled = self._capface_residuals(s.x, s.t, s.guided, s.ctx, s.strength, s.hard, s.model_scale, s.people)
        enc = self._unet_first_half(s.x, s.t, s.text, branches, s.model_scale)
        return self._guided(enc, self._with_controls(s, scaled, branches), s.guidance, s.x.shape[0], branches)

    # -- one step ------------------------------------------------------------------------------------
    def _step(self, s: _StepState, branches: int, sampler: Sampler) -> None:
        """One denoising step on the static buffers (captured as a CUDA graph)."""
        if self._first_self_attn is None:
            self._step_body(s, branches, sampler)
            return
        # a Python flag, read while running/tracing/capturing this step only (`run` takes any input)
        self._first_self_attn.identical_batch_halves = branches == 2
        try:
            self._step_body(s, branches, sampler)
        finally:
            self._first_self_attn.identical_batch_halves = False

    def _step_body(self, s: _StepState, branches: int, sampler: Sampler) -> None:
        """CapFace (on the side stream when there is one, concurrent with the UNet's down and mid
        blocks), the UNet's two halves, guidance and the sampler's update: three (compiled) functions
        that read the static buffers, so the casts, CFG concatenations and the update fuse into
        the networks' kernels."""
        side = self._side_stream
        eager_dec, fast_dec = self._decoder(sampler)
        if s.kv.mode == "fill":
            capface_fn, enc_fn, dec_fn = self._capface_residuals, self._unet_first_half, eager_dec
        else:
            capface_fn, enc_fn, dec_fn = self._capface_res_fn, self._unet_enc_fn, fast_dec
        if side is not None:
            main = torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                scaled = capface_fn(s.x, s.t, s.guided, s.ctx, s.strength, s.hard, s.model_scale, s.people)
            # made on the side stream, read on main: keep the allocator from reusing them early
            for r in scaled:
                r.record_stream(main)
        else:
            scaled = capface_fn(s.x, s.t, s.guided, s.ctx, s.strength, s.hard, s.model_scale, s.people)
        enc = enc_fn(s.x, s.t, s.text, branches, s.model_scale)
        if side is not None:
            main.wait_stream(side)
        scaled = self._with_controls(s, scaled, branches)
        x_next, state = dec_fn(enc, scaled, s.x, s.guidance, s.coeffs, s.state, s.noise, branches)
        s.x.copy_(x_next)
        for buf, value in zip(s.state, state):
            if value is not buf:
                buf.copy_(value)

    def _model_input(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        return (x if scale is None else x * scale).to(self.dtype)

    def _capface_residuals(self, x: torch.Tensor, t: torch.Tensor, guided: torch.Tensor, ctx: torch.Tensor,
                           strength: torch.Tensor, hard: dict, scale: torch.Tensor | None = None,
                           people: int = 1) -> list[torch.Tensor]:
        """CapFace's residuals, scaled and hard-masked as the official code does (one compiled
        function with the network, so the scaling fuses into its last kernels). Several people: CapFace
        runs once on all of them (batch people*N), each row scaled by its person's strengths and masked by
        its person's head mask, and the people's contributions summed."""
        xi = self._model_input(x, scale)
        if people > 1:
            xi, t = xi.repeat(people, 1, 1, 1), t.repeat(people)
        res = self.den.capface.encode(xi, t, guided, ctx)
        scaled = [(r * strength[i]) * hard[tuple(r.shape[-2:])] for i, r in enumerate(res)]
        if people == 1:
            return scaled
        return [r.view(people, -1, *r.shape[1:]).sum(0) for r in scaled]

    def _unet_first_half(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, branches: int,
                         scale: torch.Tensor | None = None):
        """The UNet's down and mid blocks on the fp32 latents, both CFG branches in one batch (with
        the network rewrites, the text-free prefix runs once for both: `unet_encode`'s branches)."""
        xi = self._model_input(x, scale)
        if branches == 2 and self.rewrite_networks:
            return unet_encode(self.den.unet, xi, t, text, branches=2)
        if branches == 2:
            xi, t = torch.cat([xi, xi]), torch.cat([t, t])
        return unet_encode(self.den.unet, xi, t, text)

    def _with_controls(self, s: _StepState, scaled: list[torch.Tensor], branches: int) -> list[torch.Tensor]:
        """CapFace's residuals plus the extra ControlNets' (unmasked, scaled, each CFG branch with its own
        text), at the UNet's batch."""
        if not s.control_hints:
            return scaled
        x = self._model_input(s.x, s.model_scale)
        xb, tb = (torch.cat([x, x]), torch.cat([s.t, s.t])) if branches == 2 else (x, s.t)
        out = [r.repeat(branches, 1, 1, 1) if branches > 1 else r for r in scaled]
        for extra, hint in zip(self.den.extra_controls, s.control_hints):
            res, _ = extra.network(xb, tb, hint, s.text)
            out = [a + r * extra.scale for a, r in zip(out, res)]
        return out

    def _guided(self, enc, residuals: list[torch.Tensor], guidance: torch.Tensor, n: int, branches: int):
        """The UNet's up blocks (residuals of batch n tiled over the branches) and guidance: float32 eps."""
        out = unet_decode(self.den.unet, enc, residuals)
        if branches == 1:
            return out.to(torch.float32)
        eps_c, eps_u = out[:n], out[n:]
        return (eps_u + guidance * (eps_c - eps_u)).to(torch.float32)

    def _decoder(self, sampler: Sampler) -> tuple[Callable, Callable]:
        """(eager, compiled or eager) functions: the UNet's second half, guidance and `sampler`'s update."""
        pair = self._decoders.get(sampler.name)
        if pair is None or pair[2] is not sampler.update:
            update = sampler.update

            def decode_and_update(enc, residuals, x, guidance, coeffs, state, noise, branches):
                eps = self._guided(enc, residuals, guidance, x.shape[0], branches)
                return update(x, eps, coeffs, state, noise)

            fast = self._compiled(decode_and_update) if self._compiled is not None else decode_and_update
            pair = (decode_and_update, fast, update)
            self._decoders[sampler.name] = pair
        return pair[:2]

    def _state(self, n: int, h: int, w: int, branches: int, sampler: Sampler, plan: Plan, tau_on: bool,
               scaled_input: bool, people: int = 1) -> _StepState:
        dev, dt, cfg = self.device, self.dtype, self.den.config
        lat = cfg.unet.in_channels

        def scalar(dtype=torch.float32):
            return torch.zeros((), device=dev, dtype=dtype)

        width = cfg.capface.model_channels * cfg.capface.channel_mult[0]  # conv_in's width, as the guided hint's
        rows = people * n  # CapFace's batch
        guided = torch.zeros(rows, width, h // 8, w // 8, device=dev, dtype=dt)
        if self.channels_last:
            guided = guided.to(memory_format=torch.channels_last)  # as conv_in's output, which it is added to
        hard, rh, rw = {}, h // 8, w // 8
        for _ in cfg.capface.channel_mult:  # residual resolutions: each downsample (3x3, stride 2, pad 1) rounds up
            hard[(rh, rw)] = torch.zeros(rows, 1, rh, rw, device=dev, dtype=dt)
            rh, rw = -(-rh // 2), -(-rw // 2)
        latents = lambda: torch.zeros(n, lat, h // 8, w // 8, device=dev)  # noqa: E731
        controls = [torch.zeros(n * branches, c.hint.shape[1], h, w, device=dev, dtype=dt)
                    for c in self.den.extra_controls]
        s = _StepState(x=latents(), t=torch.zeros(n, dtype=torch.long, device=dev),
                       text=torch.zeros(n * branches, 77, cfg.context_dim, device=dev, dtype=dt),
                       guided=guided, hard=hard,
                       ctx=torch.zeros(rows, NUM_IDENTITY_TOKENS, cfg.context_dim, device=dev, dtype=dt),
                       # per residual; with several people, per residual and CapFace row
                       # (several people: in the networks' dtype, or the fp16 residuals would be promoted)
                       strength=torch.zeros((self.num_residuals,), device=dev) if people == 1
                       else torch.zeros((self.num_residuals, rows, 1, 1, 1), device=dev, dtype=dt), guidance=scalar(),
                       model_scale=scalar() if scaled_input else None,
                       coeffs=torch.zeros(plan.coeffs.shape[1], device=dev),
                       state=tuple(latents() for _ in range(sampler.state_size)),
                       noise=latents() if plan.noisy else None,
                       gate=scalar(dt) if tau_on else None, control_hints=controls, people=people)
        s.kv.sources = {"text": s.text, "identity": s.ctx}
        s.kv.gate = s.gate
        s.coeff_values = list(s.coeffs.unbind())
        s.strength_values = list(s.strength.unbind()) if people == 1 else []
        return s

    def _fill_hints(self, s: _StepState, hint: torch.Tensor) -> None:
        """The per-request hint work, outside the per-step graph: CapFace's guided hint and its hard
        head masks at every residual resolution (the same ops as in CapFace's forward), and the extra
        ControlNets' hints at the UNet's batch."""
        guided, mask = self.den.capface.embed_hint(hint)
        s.guided.copy_(guided)
        for buf in s.hard.values():
            buf.copy_(hard_mask_like(mask, buf))
        for extra, buf in zip(self.den.extra_controls, s.control_hints):
            buf.copy_(extra.hint.to(buf).expand(buf.shape[0], -1, -1, -1))

    def _setup_kv(self, s: _StepState, sampler: Sampler, branches: int, first: bool, plan: Plan) -> None:
        """Fill K/V for this request; on a new key, warm up (Triton JIT, cuDNN) and capture."""
        self._proxy.target = s.kv
        if not first:
            s.kv.refill()
            return
        x0 = s.x.clone()
        # a valid step for the warm-up runs (their results are discarded)
        s.coeffs.copy_(plan.coeffs[0])
        if s.model_scale is not None:
            s.model_scale.fill_(float(plan.model_scale[0]))
        s.t.fill_(plan.timesteps[0])
        if s.gate is not None:
            s.gate.fill_(1.0)
        s.kv.mode = "fill"
        if self.cuda_graph:
            benchmark = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = benchmark or self.conv_autotune
            try:
                self._warm_up_and_capture(s, branches, sampler, x0)
            finally:
                torch.backends.cudnn.benchmark = benchmark
        else:
            self._step(s, branches, sampler)
            s.kv.mode = "use"
        s.x.copy_(x0)
        for buf in s.state:
            buf.zero_()

    def _warm_up_and_capture(self, s: _StepState, branches: int, sampler: Sampler, x0: torch.Tensor) -> None:
        """Warm up exactly as the capture will run (Triton JIT and autotune, cuDNN algorithm search
        happen here, never inside the capture), then capture one step."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # as if capturing, so that AUTO picks the same paths for our kernels (attention and GEGLU)
        warm = (_kernel_module("attention_processors").graph_warmup()
                if self._attn is not None or self._fused_ff is not None else contextlib.nullcontext())
        with torch.cuda.stream(side), warm:
            for _ in range(2):
                self._step(s, branches, sampler)
                s.x.copy_(x0)
                s.kv.mode = "use"
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(s, branches, sampler)
        s.graph = graph  # only a completed capture is ever replayed

    def close(self) -> None:
        if self._attn is not None:
            for net in (self.den.unet, self.den.capface.net):
                self._attn.disable_fast_attention(net)
        if self._fused_ff is not None:
            for net in (self.den.unet, self.den.capface.net):
                self._fused_ff.disable_fused_geglu(net)
        self._states.clear()
        self._active = None


def _inductor_cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's compiled-graph cache in this process: whether compiled code came from the
    cache (a warm cache, or loaded torch artifacts) or was generated."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def _transformer_output_channels_last(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """diffusers' Transformer2DModel._get_output_for_continuous_inputs without its `.contiguous()`:
    the permuted [B, H, W, C] tokens already are a channels-last [B, C, H, W] tensor, and forcing
    them to NCHW only makes the channels-last 1x1 conv and the next GroupNorm convert them back."""
    if not self.use_linear_projection:
        hidden_states = self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2))
    else:
        hidden_states = self.proj_out(hidden_states).reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return hidden_states + residual


def keep_transformer_outputs_channels_last(net: torch.nn.Module) -> int:
    """Make every diffusers Transformer2DModel in ``net`` return its output in the channels-last
    layout it computes it in (same values); returns how many were changed."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    changed = 0
    for m in net.modules():
        if isinstance(m, Transformer2DModel) and m.is_input_continuous:
            m._get_output_for_continuous_inputs = types.MethodType(_transformer_output_channels_last, m)
            changed += 1
    return changed


def _first_self_attention_processor(unet):
    """The processor of the UNet's first self-attention (down block 0, transformer block 0, attn1),
    or None where the UNet has none there."""
    try:
        attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    except (AttributeError, IndexError, TypeError):
        return None
    proc = getattr(attn, "processor", None)
    return proc if hasattr(proc, "identical_batch_halves") and not attn.is_cross_attention else None


class _KVProxy:
    """The one `kv_cache` object the processors hold; forwards to the active key's StaticCrossKV
    (None: compute K/V as usual)."""

    def __init__(self):
        self.target: StaticCrossKV | None = None

    def get_or_compute(self, attn, context):
        if self.target is None:
            return attn.to_k(context), attn.to_v(context)
        return self.target.get_or_compute(attn, context)
