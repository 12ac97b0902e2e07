"""The eager engine: the PyTorch modules as they are, the reference every other backend is checked against.

fp32 on the CPU is the parity reference; `cfg="serial"` runs CapFace and the UNet twice per step, the
official way (`CapHuman.apply_model` per branch), and is the reference mode the benchmarks measure
against. Runs extra ControlNets (`CapHumanDenoiser.add_controlnet`).
"""
from __future__ import annotations

import torch

from caphuman.export.models import CapHumanDenoiser

from .denoiser import Conditioning, DenoiserEngine, expand_batch
from .samplers import Plan, Sampler


class EagerEngine(DenoiserEngine):
    backend = "eager"

    def __init__(self, den: CapHumanDenoiser):
        self.den = den
        p = next(den.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.alphas_cumprod = den.alphas_cumprod.detach().to("cpu", torch.float32)
        self.hint_channels = den.config.capface.hint_channels
        self.num_residuals = den.num_residuals
        self._cond: Conditioning | None = None

    def _prepare(self, cond: Conditioning, batch: int, height: int, width: int, sampler: Sampler,
                 plan: Plan) -> None:
        dev, dt = self.device, self.dtype
        if cond.people > 1 and self.den.extra_controls:
            raise ValueError("extra ControlNets run with one person only (their hint is not per person)")
        one = cond.people == 1
        hints = [h.to(dev, dt) for h in cond.hints]
        contexts = [c.to(dev, dt) for c in cond.contexts]
        self._cond = Conditioning(
            text_cond=expand_batch(cond.text_cond.to(dev, dt), batch),
            text_uncond=expand_batch(cond.text_uncond.to(dev, dt), batch),
            hint=hints[0] if one else hints, identity_context=contexts[0] if one else contexts,
            guidance=float(cond.guidance), strength=cond.strength, tau=cond.tau, cfg=cond.cfg,
            person_strength=cond.person_strength)

    def finish(self) -> None:
        self._cond = None

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        c, den = self._cond, self.den
        x = x.to(self.dtype)
        n = x.shape[0]
        tt = torch.full((n,), t, dtype=torch.long, device=x.device)
        if c.cfg == "serial" or c.guidance == 1.0:
            eps_c = den(x, tt, c.text_cond, c.hint, c.identity_context, c.strength, c.tau, c.person_strength)
            if c.guidance == 1.0:
                return eps_c.float()  # the official sampler skips the uncond pass at scale 1
            eps_u = den(x, tt, c.text_uncond, c.hint, c.identity_context, c.strength, c.tau, c.person_strength)
            return (eps_u + c.guidance * (eps_c - eps_u)).float()
        residuals = den.side_residuals(x, tt, c.hint, c.identity_context, c.strength, c.tau, c.person_strength)
        eps = den.controlled_eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([c.text_cond, c.text_uncond]),
                                 [torch.cat([r, r]) for r in residuals])
        eps_c, eps_u = eps[:n], eps[n:]
        return (eps_u + c.guidance * (eps_c - eps_u)).float()
