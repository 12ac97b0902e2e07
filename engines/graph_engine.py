"""The denoiser over exported graphs: CapFace and the UNet as two graph `Engine`s (ONNX Runtime or TensorRT).

Per step: the `capface` graph at batch N, then the `unet` graph at batch 2N on the [cond, uncond] pair with
the residuals and the head mask repeated (guidance 1 runs the cond branch alone, as the official sampler
does); the graphs take the mask and the per-residual strengths and do the masked injection themselves.
With `cfg="serial"` and a fused `denoiser` graph, it runs that graph twice per step, the official way.
ID dropout (tau) zeroes the identity context on the host for the steps where t > tau.

Several people: the `capface` graph runs once at batch P*N (every person's hint and identity context), and
each person's residuals are scaled, hard-masked and summed here, in torch, with the functions the modules
use; the `unet` graph then gets the sum with an all-ones mask and unit strengths (which leave it as it is).
"""
from __future__ import annotations

import torch

from caphuman.export.networks import inject_residuals

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
        people = cond.people
        # people stacked person-major: rows p*N .. p*N+N-1 are person p's
        ctx = torch.cat([expand_batch(c.to(dev, dt), batch) for c in cond.contexts]).contiguous()
        hint = torch.cat([expand_batch(h.to(dev, dt), batch) for h in cond.hints]).contiguous()
        strength = cond.strength_vector(self.num_residuals).to(dev)
        self._req = dict(cond=cond, text=cond_text.contiguous(), pair=torch.cat([cond_text, uncond_text]),
                         uncond=uncond_text.contiguous(), hint=hint, ctx=ctx, ctx_off=torch.zeros_like(ctx),
                         people=people, strength=strength if people == 1 else torch.ones_like(strength),
                         person_scales=[strength * ps for ps in cond.person_scales])

    def finish(self) -> None:
        self._req = None

    def _eps_pair(self, x, tt, text, ctx, branches: int) -> torch.Tensor:
        r = self._req
        people = r["people"]
        cap = self.capface.run({"sample": torch.cat([x] * people), "timestep": torch.cat([tt] * people),
                                "hint": r["hint"], "identity_context": ctx})
        residuals, mask = [cap[f"residual_{i}"] for i in range(self.num_residuals)], cap["mask"]
        if people > 1:
            residuals, mask = self._sum_people(residuals, mask, x.shape[0])
        feed = {"sample": torch.cat([x] * branches), "timestep": torch.cat([tt] * branches),
                "text_embeddings": text, "mask": torch.cat([mask] * branches), "strength": r["strength"]}
        for i, res in enumerate(residuals):
            feed[f"residual_{i}"] = torch.cat([res] * branches)
        return self.unet.run(feed)["eps"].float()

    def _sum_people(self, residuals: list[torch.Tensor], mask: torch.Tensor, n: int):
        """Each person's residuals scaled by its strengths and hard-masked by its own head mask, summed over the
        people (person-major rows); with the all-ones mask that leaves the sum unchanged in the UNet graph."""
        scales = self._req["person_scales"]
        total = []
        for i, res in enumerate(residuals):
            acc = None
            for p, scale in enumerate(scales):
                rows = slice(p * n, (p + 1) * n)
                part = inject_residuals([res[rows]], mask[rows], [scale[i]])[0]
                acc = part if acc is None else acc + part
            total.append(acc)
        return total, torch.ones_like(mask[:n])

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
        if c.cfg == "serial" and self.denoiser is not None and r["people"] == 1:
            eps_c, eps_u = self._eps_fused(x, tt, r["text"], ctx), self._eps_fused(x, tt, r["uncond"], ctx)
        else:
            pair = self._eps_pair(x, tt, r["pair"], ctx, 2)
            eps_c, eps_u = pair[:n], pair[n:]
        return eps_u + c.guidance * (eps_c - eps_u)

    def close(self) -> None:
        for e in (self.capface, self.unet, self.denoiser):
            if e is not None:
                e.close()
