"""The denoiser over exported graphs: CapFace and the UNet as two graph `Engine`s (ONNX Runtime or TensorRT).

Per step: the `capface` graph at batch N, then the `unet` graph at batch 2N on the [cond, uncond] pair with
the residuals and the head mask repeated (guidance 1 runs the cond branch alone, as the official sampler
does); the graphs take the mask and the per-residual strengths and do the masked injection themselves.
With `cfg="serial"` and a fused `denoiser` graph, it runs that graph twice per step, the official way.
ID dropout (tau) zeroes the identity context on the host for the steps where t > tau.
"""
from __future__ import annotations

import torch

from .base import Engine
from .denoiser import Conditioning, DenoiserEngine, expand_batch
from .samplers import Plan, Sampler


class GraphDenoiserEngine(DenoiserEngine):
    def __init__(self, capface: Engine, unet: Engine, alphas_cumprod: torch.Tensor, *, dtype=torch.float32,
                 denoiser: Engine | None = None, backend: str | None = None, device: str | torch.device = "cpu",
                 hint_channels: int = 9):
        self.capface, self.unet, self.denoiser = capface, unet, denoiser
        self.backend = backend or unet.backend
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float32)
        self.dtype, self.device = dtype, torch.device(device)
        self.hint_channels = hint_channels
        self.num_residuals = sum(t.name.startswith("residual_") for t in unet.spec.inputs)
        self._req: dict | None = None

    def _prepare(self, cond: Conditioning, batch: int, height: int, width: int, sampler: Sampler,
                 plan: Plan) -> None:
        dev, dt = self.device, self.dtype
        cond_text = expand_batch(cond.text_cond.to(dev, dt), batch)
        uncond_text = expand_batch(cond.text_uncond.to(dev, dt), batch)
        ctx = expand_batch(cond.identity_context.to(dev, dt), batch).contiguous()
        self._req = dict(cond=cond, text=cond_text.contiguous(), pair=torch.cat([cond_text, uncond_text]),
                         uncond=uncond_text.contiguous(), hint=expand_batch(cond.hint.to(dev, dt), batch).contiguous(),
                         ctx=ctx, ctx_off=torch.zeros_like(ctx),
                         strength=cond.strength_vector(self.num_residuals).to(dev))

    def finish(self) -> None:
        self._req = None

    def _eps_pair(self, x, tt, text, ctx, branches: int) -> torch.Tensor:
        r = self._req
        cap = self.capface.run({"sample": x, "timestep": tt, "hint": r["hint"], "identity_context": ctx})
        feed = {"sample": torch.cat([x] * branches), "timestep": torch.cat([tt] * branches),
                "text_embeddings": text, "mask": torch.cat([cap["mask"]] * branches), "strength": r["strength"]}
        for i in range(self.num_residuals):
            feed[f"residual_{i}"] = torch.cat([cap[f"residual_{i}"]] * branches)
        return self.unet.run(feed)["eps"].float()

    def _eps_fused(self, x, tt, text, ctx) -> torch.Tensor:
        r = self._req
        return self.denoiser.run({"sample": x, "timestep": tt, "text_embeddings": text, "hint": r["hint"],
                                  "identity_context": ctx, "strength": r["strength"]})["eps"].float()

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        r, c = self._req, self._req["cond"]
        n = x.shape[0]
        x = x.to(self.device, self.dtype)
        tt = torch.full((n,), t, dtype=torch.long, device=self.device)
        ctx = r["ctx"] if c.identity_on(t) else r["ctx_off"]
        if c.guidance == 1.0:
            return self._eps_pair(x, tt, r["text"], ctx, 1)
        if c.cfg == "serial" and self.denoiser is not None:
            eps_c, eps_u = self._eps_fused(x, tt, r["text"], ctx), self._eps_fused(x, tt, r["uncond"], ctx)
        else:
            pair = self._eps_pair(x, tt, r["pair"], ctx, 2)
            eps_c, eps_u = pair[:n], pair[n:]
        return eps_u + c.guidance * (eps_c - eps_u)

    def close(self) -> None:
        for e in (self.capface, self.unet, self.denoiser):
            if e is not None:
                e.close()
