"""Triton Python backend: the CapHuman orchestrator (decoupled; see ../config.pbtxt and tritonserver/params.py).

execute() (Triton's thread), per request: 1. parse and validate the inputs; 2. identity context (local
cache by photo hash, else BLS to `identity`); 3. per item, the head hint (BLS to `head_condition`) and the
item's parameters; then it hands the items to the scheduler and returns at once.

The scheduler thread (tritonserver/generation.py) runs batches of compatible pending items, from one
request or several: 4. one sampling loop for the batch through the pipeline, on the backend chosen at load
(`serving_backend`: config.pbtxt's engine/engine_dir or the launch options), a progress response per step to
each item that asked; 5. VAE decode and
the image responses, then Triton's empty final response when a request's last item is done. Responses
are sent from that thread (the documented pattern for decoupled Python models).
"""
import json
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from caphuman.tritonserver.backend import error_from_bls, failure_counter, log, model_setup, triton_error
from caphuman.runtime import limits
from caphuman.runtime.pipeline import tensor_hash
from caphuman.tritonserver.generation import BatchRunner, Cancelled, Job, Scheduler, bucket_size, parse_buckets
from caphuman.tritonserver.params import HEAD_MODEL, IDENTITY_MODEL, RequestError, parse_request
from caphuman.tritonserver.services import LRU, sha256
from caphuman.tritonserver.weights import (RANDOM_WEIGHTS_NOTICE, load_generation_pipeline, serving_backend,
                                          weight_files)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# config.pbtxt parameters of this model (besides torch_threads); values are strings.
PARAMETERS = {
    "engine": "auto",             # auto | eager | torch | onnxruntime | tensorrt | tensorrt-rtx (CAPHUMAN_BACKEND overrides it)
    "engine_dir": "",             # ONNX graphs / TensorRT engines (CAPHUMAN_ENGINE_DIR overrides it)
    "compile": "false",           # torch.compile in the torch engine (minutes of start-up)
    "max_batch": "0",             # items denoised together; 0: 8 (a batch request runs as one batch, CPU too)
    "batch_sizes": "1,2,4,8",     # batches are padded up to one of these (one CUDA graph each)
    "batch_gather_ms": "60",      # how long a batch may wait for the next requests of active clients
    "run_ahead_steps": "2",       # steps issued but unfinished on the GPU, running one included (a cancel stops the rest)
    "warm_resolutions": "512",    # CUDA: every batch size is captured at these resolutions before READY
}


def _tensor(name, value, dtype):
    return pb_utils.Tensor(name, np.asarray(value, dtype=dtype))


def _preview(x: torch.Tensor, size: int) -> np.ndarray:
    """A cheap look at the current latents: channels 0-2 min-max normalised, resized to size x size."""
    lat = x[:1, :3].float()
    lo, hi = lat.amin(dim=(2, 3), keepdim=True), lat.amax(dim=(2, 3), keepdim=True)
    img = ((lat - lo) / (hi - lo).clamp_min(1e-6) * 255).clamp(0, 255)
    img = torch.nn.functional.interpolate(img, size=(size, size), mode="nearest")
    return img[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy()


class _Request:
    """One request's stream: its items finish in order; the final flag is sent exactly once."""

    def __init__(self, request, sender, items: int, on_fail=None):
        self.request, self.sender, self.remaining = request, sender, items
        self.on_fail = on_fail  # counts a failed request (backend.failure_counter)
        self.done = False
        self._lock = threading.Lock()

    def cancelled(self) -> bool:
        if self.done:
            return True
        is_cancelled = getattr(self.request, "is_cancelled", None)
        return bool(is_cancelled is not None and is_cancelled())

    def send(self, response) -> bool:
        """False when the stream is closed (the client went away); the request is then done."""
        with self._lock:
            if self.done:
                return False
            try:
                self.sender.send(response)
                return True
            except Exception:  # noqa: BLE001 - the stream is gone
                self.done = True
                return False

    def _final(self, response=None) -> bool:
        """Closes the stream; False if it was closed already."""
        with self._lock:
            if self.done:
                return False
            self.done = True
            try:
                if response is None:
                    self.sender.send(flags=FINAL)
                else:
                    self.sender.send(response, flags=FINAL)
            except Exception:  # noqa: BLE001 - the client is gone; nothing left to tell it
                pass
            return True

    def item_done(self) -> None:
        with self._lock:
            self.remaining -= 1
            last = self.remaining <= 0
        if last:
            self._final()

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, RequestError):
            log(pb_utils, "error", f"caphuman: request failed: {type(exc).__name__}: {exc}")
        if self._final(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc))) and self.on_fail:
            self.on_fail(exc)

    def cancel(self) -> None:
        if not self.done:
            log(pb_utils, "info", f"caphuman: request {self.request.request_id()!r} cancelled by the client")
        self._final()


class TritonPythonModel:
    def initialize(self, args):
        config, self.device, self.settings = model_setup(args, pb_utils, extra_parameters=PARAMETERS)
        self.count_failure = failure_counter(pb_utils, "caphuman")
        p = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        p = {k: p.get(k) or default for k, default in PARAMETERS.items()}
        cuda = self.device.startswith("cuda")
        try:
            backend, engine_dir = serving_backend(p["engine"], p["engine_dir"], cuda)
            if p["compile"] not in ("true", "false"):
                raise ValueError(f"compile must be 'true' or 'false', got {p['compile']!r}")
            max_batch = int(p["max_batch"]) or 8
            buckets = parse_buckets(p["batch_sizes"])
            gather_s = float(p["batch_gather_ms"]) / 1e3
            run_ahead = int(p["run_ahead_steps"])
            warm = tuple(int(r) for r in p["warm_resolutions"].split(",") if r.strip())
            if max_batch < 1 or gather_s < 0 or run_ahead < 1:
                raise ValueError("max_batch >= 0, batch_gather_ms >= 0, run_ahead_steps >= 1")
            for r in warm:
                limits.check_resolution("warm_resolutions", r)
        except ValueError as e:
            raise pb_utils.TritonModelException(f"caphuman: bad config.pbtxt parameter: {e}") from None
        files = weight_files()
        self.random_weights = files is None
        if self.random_weights:
            log(pb_utils, "warn", f"caphuman: {RANDOM_WEIGHTS_NOTICE}")
        self.pipe = load_generation_pipeline(files, self.device, backend, engine_dir, compile=p["compile"] == "true")
        # padding to a few batch sizes pays where the engine prepares (captures) per size
        self.prepared_sizes = backend in ("torch", "tensorrt", "tensorrt-rtx")
        self.generator = BatchRunner(self.pipe, buckets if self.prepared_sizes else (1,), run_ahead=run_ahead)
        self.max_batch = max_batch
        self.identity_cache = LRU(self.settings.identity_cache_entries)
        self.hint_cache = LRU(min(self.settings.hint_cache_entries, 32))  # 9 MB each at 512x512
        self._warm_up(warm, max_batch)
        self.scheduler = Scheduler(self._run_batch, max_batch, gather_s, on_error=self._batch_error)
        log(pb_utils, "info", f"caphuman: device {self.device}, backend {self.pipe.backend}, max batch {max_batch}, "
                              f"batch sizes {self.generator.buckets}, gather {gather_s * 1e3:.0f} ms, "
                              f"run-ahead {run_ahead} steps")

    def _warm_up(self, resolutions, max_batch):
        from caphuman.runtime.pipeline import GenerationRequest, sphere_hint
        t0 = time.perf_counter()
        if not self.prepared_sizes:  # eager, onnxruntime: one 2-step generation at 256x256
            ctx = torch.zeros(1, 258, self.pipe.config.context_dim)
            self.pipe.generate(GenerationRequest(prompt="warm-up", hint=sphere_hint(256), identity_context=ctx, steps=2))
            detail = ""
        else:  # every batch size at the usual resolutions (CUDA: captures their graphs)
            detail = f": {self.generator.warm_up(resolutions, max_batch)}"
        log(pb_utils, "info", f"caphuman: warm in {time.perf_counter() - t0:.1f} s (device {self.device}){detail}")

    # ------------------------------------------------------------------------------------ serving
    def execute(self, requests):
        for request in requests:
            state = _Request(request, request.get_response_sender(), 1, self.count_failure)
            try:
                self.scheduler.submit(self._prepare(request, state))
            except Exception as e:  # noqa: BLE001 - each request gets its own error; the model keeps serving
                state.fail(e)
        return None

    def _bls(self, model, inputs, outputs):
        response = pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                             requested_output_names=outputs).exec()
        if response.has_error():
            raise error_from_bls(pb_utils, model, response.error())
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    def _identity(self, key: str, reference: bytes):
        """(context [258, C], its metadata hash, "hit" or "miss", which cache hit (this instance's: "orchestrator",
        or the identity model's), ms); `key` is the photo's sha256."""
        t0 = time.perf_counter()
        cached = self.identity_cache.get(key)
        if cached is not None:
            return (*cached, "hit", "orchestrator", (time.perf_counter() - t0) * 1e3)
        out = self._bls(IDENTITY_MODEL, [_tensor("IMAGE", [[reference]], np.object_)],
                        ["CONTEXT", "CACHE_HIT", "ELAPSED_MS"])
        ctx = torch.from_numpy(out["CONTEXT"][0].copy())
        digest = tensor_hash(ctx[None])
        self.identity_cache.put(key, (ctx, digest))
        hit = bool(out["CACHE_HIT"].reshape(-1)[0])
        return ctx, digest, "hit" if hit else "miss", "identity-model" if hit else None, \
            (time.perf_counter() - t0) * 1e3

    def _hint(self, req, reference: bytes, ref_key: str, pose, head, head_controls: str):
        """(hint [1, 9, R, R], its metadata hash, cache hit, notes, fraction in frame). This instance keeps the
        last hints (a person's next request skips the BLS call and the 9-channel copy); else the head model's cache."""
        key = (ref_key, sha256(pose) if pose is not None else None, head, req.modes, req.light, head_controls,
               req.resolution)
        cached = self.hint_cache.get(key)
        if cached is not None:
            return (*cached[:2], True, *cached[2:])
        inputs = [_tensor("REFERENCE_IMAGE", [reference], np.object_),
                  _tensor("RESOLUTION", [req.resolution], np.int32),
                  _tensor("MODES", [req.modes.encode()], np.object_),
                  _tensor("LIGHT", [req.light.encode()], np.object_)]
        if pose is not None:
            inputs.append(_tensor("POSE_IMAGE", [pose], np.object_))
        if head is not None:
            inputs.append(_tensor("HEAD_POSE", head, np.float32))
        if head_controls:
            inputs.append(_tensor("HEAD_CONTROLS", [head_controls.encode()], np.object_))
        out = self._bls(HEAD_MODEL, inputs, ["HINT", "CACHE_HIT", "ELAPSED_MS", "NOTES", "IN_FRAME"])
        notes = [n.decode() for n in out["NOTES"].reshape(-1) if n]
        hint = torch.from_numpy(out["HINT"].copy())[None]
        if not torch.isfinite(hint).all():
            raise RuntimeError("head condition hint is not finite")
        digest = tensor_hash(hint)
        in_frame = float(out["IN_FRAME"].reshape(-1)[0])
        self.hint_cache.put(key, (hint, digest, notes, in_frame))
        return hint, digest, bool(out["CACHE_HIT"].reshape(-1)[0]), notes, in_frame

    def _people(self, req, ref_keys: list[str]):
        """Several people: each person's (hint, its hash, cache hit, notes) in the shared frame, the layout
        checked (the rule of `caphuman generate --person`)."""
        from caphuman.runtime.condition.people import LayoutError, Person, check_layout, head_silhouette, spread_controls

        from caphuman.tritonserver.params import head_controls
        people = [Person(reference=key, controls=head_controls(json.dumps({k: v for k, v in p.items() if k != "strength"})))
                  for key, p in zip(ref_keys, req.people)]
        hints = []
        for i, (person, controls) in enumerate(zip(people, spread_controls(people))):
            values = {k: v for k, v in vars(controls).items() if v is not None and k != "light"}
            pose = req.pose_images[i] if req.pose_images else None  # 0 or one per person (parse_request)
            hints.append(self._hint(req, req.references[i], ref_keys[i], pose, None,
                                    json.dumps(values, sort_keys=True) if values else ""))
        try:
            check_layout([h[4] for h in hints], [head_silhouette(h[0][0].numpy()) for h in hints])
        except LayoutError as e:
            raise RequestError(f"PEOPLE: {e}") from None
        return [h[:4] for h in hints]

    def _prepare(self, request, state: _Request) -> list:
        """Steps 1-3 for every item: the jobs. Raises RequestError for a bad request."""
        from caphuman.runtime.pipeline import GenerationRequest

        t_start = time.perf_counter()
        arrays = {t.name(): t.as_numpy() for t in request.inputs()}
        req = parse_request(arrays, self.settings)
        state.remaining = req.num_items
        t_parsed = time.perf_counter()
        ref_keys = [sha256(r) for r in req.references]
        identities = [self._identity(key, ref) for key, ref in zip(ref_keys, req.references)]
        ctx, id_digest = identities[0][0], identities[0][1]
        id_cache = [i[2] for i in identities] if req.num_people > 1 else identities[0][2]
        id_cache_level = [i[3] for i in identities] if req.num_people > 1 else identities[0][3]
        id_ms = sum(i[4] for i in identities)
        people = self._people(req, ref_keys) if req.num_people > 1 else None
        jobs = []
        for i in range(req.num_items):
            t0 = time.perf_counter()
            if people is None:
                hint, hint_digest, hint_hit, notes, _ = self._hint(
                    req, req.reference, ref_keys[0], req.item(req.pose_images, i), req.item(req.head_poses, i),
                    req.head_controls)
                person = dict(hint=hint, identity_context=ctx[None])
            else:
                hint_digest, id_digest = [p[1] for p in people], [ident[1] for ident in identities]
                hint_hit, notes = all(p[2] for p in people), [n for p in people for n in p[3]]
                person = dict(hint=[p[0] for p in people], identity_context=[ident[0][None] for ident in identities],
                              person_strength=[p["strength"] for p in req.people])
            gen = GenerationRequest(prompt=req.prompts[0] if len(req.prompts) == 1 else req.prompts[i],
                                    negative_prompt=req.negative_prompt, added_prompt=req.added_prompt,
                                    seed=req.seed + i, steps=req.steps, guidance=req.guidance, eta=req.eta,
                                    strength=req.strength, tau=req.tau, sampler=req.sampler, **person)
            try:
                gen.validate(self.pipe.config.unet.in_channels)
            except ValueError as e:
                raise RequestError(str(e)) from None
            warnings = []
            if self.pipe.text_encoder.tokenize([gen.full_prompt()]).truncated[0]:
                warnings.append("prompt is longer than CLIP's 77 tokens and was truncated (as CLIP and the official code do)")
            if len(req.negative_prompt) and self.pipe.text_encoder.tokenize([req.negative_prompt]).truncated[0]:
                warnings.append("negative prompt is longer than 77 tokens and was truncated")
            params = {**self.pipe.parameters(gen, "batched", hint_digest, id_digest), "index": i, "seed": req.seed + i, "warnings": warnings,
                      "condition_notes": notes, "random_weights": self.random_weights,
                      "pose_image": req.item(req.pose_images, i) is not None if people is None
                      else len(req.pose_images) > 0,
                      "head_pose": req.item(req.head_poses, i), "modes": req.modes, "light": req.light or None,
                      "head_controls": json.loads(req.head_controls) if req.head_controls else None,
                      "people_controls": req.people if people is not None else None,
                      "resolution": req.resolution}
            if self.random_weights:
                params["notice"] = RANDOM_WEIGHTS_NOTICE
            timings = {"parse_ms": (t_parsed - t_start) * 1e3, "identity_ms": id_ms, "identity_cache": id_cache,
                       "identity_cache_level": id_cache_level,
                       "head_condition_ms": (time.perf_counter() - t0) * 1e3,
                       "head_condition_cache": "hit" if hint_hit else "miss", "_t0": t0}
            jobs.append(Job(gen, state, i, req.progress, req.preview_size, params, timings))
        return jobs

    # ------------------------------------------------------------------------ the scheduler thread
    def _run_batch(self, jobs):
        """Steps 4-5 for a batch of compatible jobs (called by the scheduler thread)."""
        live = []
        for job in jobs:
            if job.owner.cancelled():
                job.owner.cancel()
            else:
                live.append(job)
        if not live:
            return
        t1 = time.perf_counter()
        marks = {}

        def on_step(k, total, x):
            marks["total"] = total
            alive = False
            for j, job in enumerate(live):
                if job.owner.cancelled():
                    job.owner.cancel()
                    continue
                alive = True
                if not job.progress:
                    continue
                outs = [_tensor("KIND", [b"progress"], np.object_), _tensor("INDEX", [job.index], np.int32),
                        _tensor("STEP", [k + 1], np.int32), _tensor("TOTAL_STEPS", [total], np.int32),
                        _tensor("METADATA", [b"{}"], np.object_)]
                if job.preview_size:
                    outs.append(pb_utils.Tensor("IMAGE", _preview(x[j:j + 1], job.preview_size)))
                job.owner.send(pb_utils.InferenceResponse(output_tensors=outs))
            if not alive:
                raise Cancelled()

        try:
            # Wait for each step only where a client streams progress (its previews need the step done);
            # otherwise the host stays run_ahead_steps ahead of the GPU. Cancellation is a host-side flag,
            # checked as each step is issued: the steps not yet finished then (at most run_ahead_steps) still run.
            latents = self.generator.sample(live, callback=on_step, sync_steps=any(j.progress for j in live))
            self.generator.synchronize()  # so that sampling_ms is GPU-complete sampling time
            t2 = time.perf_counter()
            images = []
            for j, job in enumerate(live):  # decode all first, then answer all: the clients come back together
                images.append(self.generator.decode(latents[j:j + 1]) if not job.owner.cancelled() else None)
        except Cancelled:
            for job in live:
                job.owner.cancel()
            return
        t3 = time.perf_counter()
        total = marks.get("total", live[0].gen.steps)
        for job, image in zip(live, images):
            if image is None or job.owner.cancelled():
                job.owner.cancel()
                continue
            timings = dict(job.timings)
            t0 = timings.pop("_t0")
            timings.update(queue_ms=(t1 - job.enqueued) * 1e3, sampling_ms=(t2 - t1) * 1e3,
                           vae_decode_ms=(t3 - t2) * 1e3, item_ms=(time.perf_counter() - t0) * 1e3,
                           batch_size=len(live), batch_padded_to=bucket_size(len(live), self.generator.buckets))
            timings = {k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()}
            meta = {**job.parameters, "timings": timings}
            ok = job.owner.send(pb_utils.InferenceResponse(output_tensors=[
                _tensor("KIND", [b"image"], np.object_), _tensor("INDEX", [job.index], np.int32),
                _tensor("STEP", [total], np.int32), _tensor("TOTAL_STEPS", [total], np.int32),
                pb_utils.Tensor("IMAGE", np.ascontiguousarray(image)),
                _tensor("METADATA", [json.dumps(meta, default=str).encode()], np.object_)]))
            if ok:
                job.owner.item_done()
            else:
                job.owner.cancel()

    def _batch_error(self, jobs, exc):
        for job in jobs:
            job.owner.fail(exc)

    def finalize(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            for job in scheduler.stop():
                job.owner.fail(RuntimeError("the model is unloading"))
        if getattr(self, "pipe", None) is not None:
            self.pipe.engine.close()
        self.pipe = None
