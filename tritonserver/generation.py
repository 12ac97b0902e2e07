"""Batching across requests for the `caphuman` orchestrator, without Triton (tested in-process).

    batches = BatchRunner(pipe, buckets=(1, 2, 4, 8))     # pipe: CapHumanPipeline on any engine
    sched = Scheduler(run_batch, max_batch=8, gather_s=0.06)
    sched.submit([Job(request, owner, index), ...])        # from Triton's execute()
    # the scheduler thread calls run_batch(jobs) with up to 8 compatible jobs, oldest first

A job is one item (one image) of one request. Jobs are compatible when their requests' `batch_key`s are
equal (steps, resolution, guidance, eta, strength, tau, sampler): text, hint, identity context and seed are
per sample. The scheduler takes the first pending job in service order and every compatible pending job after
it (up to `max_batch`). Service order is round-robin over requests (jobs of one `owner`), in arrival order:
each job gets a tag one past the larger of its request's previous tag and the tag of the job taken last, and
jobs run by tag, then arrival. So a request's k-th item comes before any request's (k+1)-th, and a small
request arriving behind a request of many items waits for at most one item of it (plus the running batch),
not all of them; an item costs at most limits.MAX_REQUEST_COST 512x512 steps, and a request that keeps
getting overtaken still advances one item per round. Demand is the size of the previous batch plus the jobs that were waiting when
it ended (about the number of active clients); while fewer jobs than that are at hand, the batch waits up to
`gather_s` for the next requests of those clients, which come back when their images arrive. A single stream
(demand 1) is never delayed.

`BatchRunner.sample` denoises a batch through the pipeline (`CapHumanPipeline.denoise`), padded up to the next
bucket size so that the engine prepares (on the GPU: captures) only a few batch sizes. For one job it
computes exactly what `CapHumanPipeline.generate` computes for the same request. On the GPU, the images of a
request depend on the bucket it ran in at fp16 rounding level (other batch sizes pick other kernels), not on
its neighbours.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

DEFAULT_BUCKETS = (1, 2, 4, 8)


class Cancelled(Exception):
    """Every job of a batch was cancelled (or its client went away): the batch stops at the next step."""


# -------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One item of one request: its `caphuman.runtime.pipeline.GenerationRequest` (num_samples 1, hint and
    identity context on the CPU, already validated), the caller's per-request object and the item index."""
    gen: object
    owner: object = None
    index: int = 0
    progress: bool = False
    preview_size: int = 0
    parameters: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    enqueued: float = field(default_factory=time.perf_counter)
    tag: tuple = (0, 0)            # the scheduler's service order: (round, arrival)

    @property
    def key(self) -> tuple:
        return self.gen.batch_key()


def bucket_size(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (n itself beyond the largest)."""
    return next((b for b in sorted(buckets) if b >= n), n)


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); ValueError on anything else."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1 or values[0] != 1:
        raise ValueError(f"batch sizes must be positive and include 1, got {text!r}")
    return tuple(values)


class RunAheadLimit:
    """Keeps at most `limit` issued steps unfinished on the device (the running one included).

    `record()` marks the device's position after the step just issued (a CUDA event) and returns
    something with `.synchronize()`. Waiting on the mark `limit` steps back leaves `limit` steps
    unfinished (one running, the rest queued): milliseconds of GPU work against the ~0.1 ms it takes
    to issue the next, so the GPU never idles. A cancel, checked as each step is issued, still stops
    everything but those `limit` steps."""

    def __init__(self, limit: int, record: Callable[[], object]):
        if limit < 1:
            raise ValueError(f"run-ahead limit must be >= 1 step, got {limit}")
        self.limit, self.record = limit, record
        self._marks: deque = deque()

    def step_issued(self) -> None:
        self._marks.append(self.record())
        while len(self._marks) > self.limit:
            self._marks.popleft().synchronize()


class BatchRunner:
    """Runs compatible jobs as one batch through the pipeline, padded to a bucket size.

    `run_ahead`: without per-step waits (no progress streaming), how many issued denoising steps may be
    unfinished on the GPU, the running one included, when the step callback runs (see `RunAheadLimit`)."""

    def __init__(self, pipe, buckets: tuple[int, ...] = (1,), run_ahead: int = 2):
        if run_ahead < 1:
            raise ValueError(f"run_ahead must be >= 1 step, got {run_ahead}")
        self.pipe = pipe
        self.buckets = tuple(sorted(buckets))
        self.cuda = pipe.device.type == "cuda"
        self.run_ahead = run_ahead

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.pipe.device).synchronize()

    def record_step(self):
        """A CUDA event at the current end of the pipeline's stream (the step just issued)."""
        event = torch.cuda.Event(blocking=True)  # waiting on it sleeps instead of spinning a CPU core
        event.record(torch.cuda.current_stream(self.pipe.device))
        return event

    @torch.no_grad()
    def sample(self, jobs: list[Job], callback: Callable[[int, int, torch.Tensor], None] | None = None,
               sync_steps: bool = True) -> torch.Tensor:
        """Final latents [len(jobs), 4, h, w] of compatible jobs. The batch is padded (repeating the last
        job) to the next bucket size. `callback(i, total, x)` after every step, x the padded batch. With
        `sync_steps` (on CUDA) the step has finished when it is called; without, the callback runs as the
        step is issued, so the CPU keeps queueing steps ahead of the GPU (a wait after each of 20 steps
        cost ~15 ms per request on the H100: bench/results/serving_h100_run34.json). Whenever there is no
        per-step wait, at most `self.run_ahead` issued steps are unfinished when the callback runs, so a
        callback that raises (cancellation) leaves at most that many to run."""
        if not jobs or any(j.key != jobs[0].key for j in jobs):
            raise ValueError("a batch needs one or more jobs of the same key")
        wait_each_step = sync_steps and callback is not None
        ahead = RunAheadLimit(self.run_ahead, self.record_step) if self.cuda and not wait_each_step else None

        def on_step(i, total, x):
            if wait_each_step:
                self.synchronize()
            elif ahead is not None:
                ahead.step_issued()
            if callback is not None:
                callback(i, total, x)

        return self.pipe.denoise([j.gen for j in jobs], batch_size=bucket_size(len(jobs), self.buckets),
                                 callback=on_step)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 [H, W, 3] of one sample's latents [1, 4, h, w] (the official conversion)."""
        return self.pipe.decode(latents)[0]

    def warm_up(self, resolutions: tuple[int, ...], max_batch: int, steps: int = 2) -> dict:
        """Run every bucket a batch of up to max_batch can use, once at each resolution (prepares the
        engine for each: on CUDA captures their graphs). Returns {what: seconds}."""
        from caphuman.runtime.pipeline import GenerationRequest, sphere_hint
        ctx = torch.zeros(1, 258, self.pipe.config.context_dim)
        times = {}
        for res in resolutions:
            hint = sphere_hint(res)
            for b in self.buckets:
                if b > bucket_size(max_batch, self.buckets):
                    continue
                t0 = time.perf_counter()
                jobs = [Job(GenerationRequest(prompt="warm-up", hint=hint, identity_context=ctx, seed=k, steps=steps))
                        for k in range(b)]
                self.decode(self.sample(jobs)[:1])
                self.synchronize()
                times[f"{res}x{res} batch {b}"] = round(time.perf_counter() - t0, 2)
        return times


# ----------------------------------------------------------------------------------- the scheduler
class Scheduler:
    """One thread that runs `run_batch(jobs)` on batches of compatible pending jobs, oldest first.

    `run_batch` must handle its jobs' errors itself; an exception that escapes it is passed to
    `on_error(jobs, exc)` and the thread goes on."""

    def __init__(self, run_batch: Callable[[list[Job]], None], max_batch: int = 1, gather_s: float = 0.0,
                 on_error: Callable[[list[Job], BaseException], None] | None = None, name: str = "caphuman-batches"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run_batch, self.max_batch, self.gather_s, self.on_error = run_batch, max_batch, gather_s, on_error
        self._pending: deque[Job] = deque()
        self._seq = 0                         # arrival order
        self._vtime = 0                       # the tag of the job taken last
        self._last_tag: dict = {}             # owner -> its latest tag (owners with a tag above _vtime)
        self._cv = threading.Condition()
        self._stopping = False
        self._demand = 1
        self.batch_sizes: Counter = Counter()   # how many batches of each size ran
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the scheduler is stopping")
            now = time.perf_counter()
            for j in jobs:
                j.enqueued = now
                owner = self._owner_key(j)
                j.tag = (max(self._vtime, self._last_tag.get(owner, 0)) + 1, self._seq)
                self._last_tag[owner] = j.tag[0]
                self._seq += 1
            self._pending.extend(jobs)
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    @staticmethod
    def _owner_key(job: Job):
        try:
            hash(job.owner)
            return job.owner
        except TypeError:
            return id(job.owner)

    def _gather(self, batch: list[Job]) -> None:
        """Move compatible pending jobs into the batch in service order, leaving the others in order."""
        key, keep = batch[0].key, deque()
        for job in sorted(self._pending, key=lambda j: j.tag):
            (batch if len(batch) < self.max_batch and job.key == key else keep).append(job)
        self._pending = keep

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if not self._pending:
                return None
            head = min(self._pending, key=lambda j: j.tag)
            self._pending.remove(head)
            self._vtime = max(self._vtime, head.tag[0])
            self._last_tag = {o: t for o, t in self._last_tag.items() if t > self._vtime}  # the rest restart at _vtime
            batch = [head]
            self._gather(batch)
            # Several clients were active last time: give their next requests a moment to arrive.
            want = min(self.max_batch, self._demand)
            deadline = time.monotonic() + self.gather_s
            while len(batch) < want and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
                self._gather(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self.batch_sizes[len(batch)] += 1
            try:
                self.run_batch(batch)
            except BaseException as e:  # noqa: BLE001 - the thread must survive any batch
                if self.on_error is not None:
                    try:
                        self.on_error(batch, e)
                    except BaseException:  # noqa: BLE001
                        pass
            with self._cv:
                self._demand = len(batch) + len(self._pending)

    def stop(self, timeout: float = 60.0) -> list[Job]:
        """Finish the running batch, stop the thread; returns the jobs that never ran."""
        with self._cv:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        self._thread.join(timeout)
        return left
