"""Batching across requests (tritonserver/generation.py), in-process on the CPU: the scheduler's grouping,
order, latency and robustness with a fake batch runner; the batch generator's numerics on the tiny model."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from caphuman.tritonserver.generation import BatchRunner, Job, RunAheadLimit, Scheduler, bucket_size, parse_buckets


class _Gen:
    """A stand-in GenerationRequest: the batch key is all a Job reads."""

    def __init__(self, steps=2, res=256, guidance=7.0, eta=0.0, strength=1.0, tau=0.0, sampler="ddim"):
        self.key = (steps, (res, res), guidance, eta, strength, tau, sampler)

    def batch_key(self):
        return self.key


class _Recorder:
    def __init__(self, delay=0.0, fail_on=None):
        self.batches: list[list] = []
        self.delay, self.fail_on = delay, fail_on
        self.done = threading.Event()
        self.started = threading.Event()

    def __call__(self, jobs):
        self.started.set()
        if self.fail_on is not None and any(j.owner == self.fail_on for j in jobs):
            raise RuntimeError("boom")
        time.sleep(self.delay)
        self.batches.append([j.owner for j in jobs])


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pred()


def test_buckets():
    assert parse_buckets("8, 1,2,4") == (1, 2, 4, 8)
    for bad in ("", "0,1", "2,4", "a"):
        with pytest.raises(ValueError):
            parse_buckets(bad)
    assert [bucket_size(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]


def test_scheduler_batches_compatible_jobs_in_order_and_keeps_others_waiting():
    rec = _Recorder(delay=0.2)
    sched = Scheduler(rec, max_batch=3)
    sched.submit([Job(_Gen(), owner="first")])
    rec.started.wait(5)  # the first batch runs alone while the rest queue up
    sched.submit([Job(_Gen(), owner="a1"), Job(_Gen(steps=4), owner="b1"), Job(_Gen(), owner="a2"),
                  Job(_Gen(res=320), owner="c1"), Job(_Gen(), owner="a3"), Job(_Gen(), owner="a4"),
                  Job(_Gen(steps=4), owner="b2")])
    _wait(lambda: sum(len(b) for b in rec.batches) == 8)
    assert sched.stop() == []
    assert rec.batches == [["first"], ["a1", "a2", "a3"], ["b1", "b2"], ["c1"], ["a4"]]
    assert sched.batch_sizes == {1: 3, 3: 1, 2: 1}


def test_a_small_request_behind_a_request_of_many_items_waits_for_one_item_not_all():
    """Round-robin over requests: B (1 item) arrives while A's 8 items queue; it runs after A's running item
    and at most one more, not after all 8. A keeps advancing while small requests keep coming (no
    starvation either way)."""
    rec = _Recorder(delay=0.05)
    sched = Scheduler(rec, max_batch=1)
    a = object()
    sched.submit([Job(_Gen(), owner=a, index=i) for i in range(8)])
    rec.started.wait(5)
    sched.submit([Job(_Gen(), owner="b")])
    _wait(lambda: len(rec.batches) == 9)
    order = [o for (o,) in rec.batches]
    assert order.index("b") <= 2, order
    # a stream of one-item requests, one arriving per item run: A still gets every other turn
    rec.batches.clear()
    sched.submit([Job(_Gen(), owner=a, index=i) for i in range(4)])
    for k in range(8):
        _wait(lambda: len(rec.batches) >= k)
        sched.submit([Job(_Gen(), owner=f"s{k}")])
    _wait(lambda: len(rec.batches) == 12)
    order = [o for (o,) in rec.batches]
    assert order.index(a) <= 1 and [i for i, o in enumerate(order) if o is a][-1] <= 8, order
    sched.stop()


def test_lone_job_is_not_delayed_but_a_batch_waits_for_its_clients():
    gate = threading.Event()
    runs: list[tuple[float, list]] = []

    def run(jobs):
        runs.append((time.perf_counter(), [j.owner for j in jobs]))
        if jobs[0].owner == "x":
            gate.wait(10)

    sched = Scheduler(run, max_batch=8, gather_s=0.8)
    t0 = time.perf_counter()
    sched.submit([Job(_Gen(), owner="x")])          # demand 1: runs at once
    _wait(lambda: len(runs) == 1)
    assert runs[0][0] - t0 < 0.2, "a lone request waited for company"
    sched.submit([Job(_Gen(), owner=o) for o in "abc"])
    time.sleep(0.05)
    t_release = time.perf_counter()
    gate.set()                                       # x ends with 3 waiting: demand 4
    time.sleep(0.2)
    sched.submit([Job(_Gen(), owner="d")])           # the 4th client comes back within the gather time
    _wait(lambda: len(runs) == 2)
    assert runs[1][1] == ["a", "b", "c", "d"] and runs[1][0] - t_release >= 0.15
    t1 = time.perf_counter()
    sched.submit([Job(_Gen(), owner="e")])           # demand 4, but nobody else comes: runs after gather_s
    _wait(lambda: len(runs) == 3)
    assert runs[2][1] == ["e"] and 0.6 <= runs[2][0] - t1 < 2.0
    t2 = time.perf_counter()
    sched.submit([Job(_Gen(), owner="f")])           # demand back to 1: at once
    _wait(lambda: len(runs) == 4)
    assert runs[3][0] - t2 < 0.2
    sched.stop()


def test_scheduler_survives_a_failing_batch_and_returns_unrun_jobs_on_stop():
    errors = []
    rec = _Recorder(fail_on="bad")
    sched = Scheduler(rec, max_batch=1, on_error=lambda jobs, e: errors.append((jobs[0].owner, str(e))))
    sched.submit([Job(_Gen(), owner="bad"), Job(_Gen(), owner="good")])
    _wait(lambda: rec.batches == [["good"]])
    assert errors == [("bad", "boom")]
    rec.delay = 0.5
    sched.submit([Job(_Gen(), owner="slow"), Job(_Gen(), owner="never")])
    time.sleep(0.1)
    left = sched.stop()
    assert [j.owner for j in left] == ["never"]
    with pytest.raises(RuntimeError):
        sched.submit([Job(_Gen(), owner="late")])


# ------------------------------------------------------------------------ numerics (tiny model, CPU)
@pytest.fixture(scope="module")
def pipe():
    from caphuman.runtime.pipeline import tiny_random_pipeline
    return tiny_random_pipeline(seed=0)


def _request(pipe, prompt, seed, scale=1.0, **kw):
    from caphuman.runtime.pipeline import GenerationRequest, sphere_hint
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 258, pipe.config.context_dim, generator=g)
    return GenerationRequest(prompt=prompt, hint=sphere_hint(256) * scale, identity_context=ctx, seed=seed,
                             **{"steps": 2, **kw})


def test_steps_wait_for_the_gpu_only_when_asked(pipe, monkeypatch):
    """Progress previews need each step finished; without them the CPU must not wait per step."""
    gen = _request(pipe, "a photo of a person", 3)
    bg = BatchRunner(pipe)
    waits = []
    monkeypatch.setattr(bg, "synchronize", lambda: waits.append(1))
    seen = []
    ref = bg.sample([Job(gen)], callback=lambda i, total, x: seen.append(i))
    assert len(waits) == 2 and seen == [0, 1]
    waits.clear()
    lat = bg.sample([Job(gen)], callback=lambda i, total, x: seen.append(i), sync_steps=False)
    assert waits == [] and seen == [0, 1, 0, 1]
    assert torch.equal(lat, ref)


def test_host_stays_at_most_run_ahead_steps_ahead_of_the_gpu(pipe, monkeypatch):
    """Without per-step waits the host waits on the mark of the step `run_ahead` back, before each
    callback: a cancel (a raising callback) then leaves at most `run_ahead` steps queued."""
    gen = _request(pipe, "a photo of a person", 3, steps=5)
    bg = BatchRunner(pipe, run_ahead=2)
    log = []

    class Mark:
        def __init__(self, step):
            self.step = step

        def synchronize(self):
            log.append(("wait", self.step))

    monkeypatch.setattr(bg, "cuda", True)  # the CUDA path, with the stream calls replaced
    monkeypatch.setattr(bg, "synchronize", lambda: log.append("sync"))
    monkeypatch.setattr(bg, "record_step", lambda: Mark(sum(e[0] == "step" for e in log)))
    ref = bg.sample([Job(gen)], callback=lambda i, total, x: None)  # sync_steps: a wait per step, no marks
    assert log == ["sync"] * 5
    log.clear()
    lat = bg.sample([Job(gen)], callback=lambda i, total, x: log.append(("step", i)), sync_steps=False)
    assert log == [("step", 0), ("step", 1), ("wait", 0), ("step", 2), ("wait", 1), ("step", 3), ("wait", 2),
                   ("step", 4)]
    assert torch.equal(lat, ref)

    class Cancelled(Exception):
        pass

    def cancel_at_3(i, total, x):
        log.append(("step", i))
        if i == 3:
            raise Cancelled
    log.clear()
    with pytest.raises(Cancelled):
        bg.sample([Job(gen)], callback=cancel_at_3, sync_steps=False)
    unfinished = {e[1] for e in log if e[0] == "step"} - {e[1] for e in log if e[0] == "wait"}
    assert unfinished == {2, 3}, log  # the steps the cancel could not stop: run_ahead of them


@pytest.mark.gpu
def test_run_ahead_limit_bounds_unfinished_gpu_work():
    """With real CUDA events: after each `step_issued`, every step but the last `limit` has finished."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from types import SimpleNamespace
    bg = BatchRunner(SimpleNamespace(device=torch.device("cuda")), run_ahead=2)
    limit = RunAheadLimit(bg.run_ahead, bg.record_step)
    done = []
    for step in range(6):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time per "step"
        done.append(torch.cuda.Event())
        done[-1].record()
        limit.step_issued()
        assert all(e.query() for e in done[:-2]), f"step {step}: more than 2 steps unfinished"
        assert step < 2 or not done[-1].query(), "the host waited for the step it had just issued"
    torch.cuda.synchronize()


def test_run_ahead_limit_rejects_nonsense(pipe):
    with pytest.raises(ValueError):
        RunAheadLimit(0, object)
    with pytest.raises(ValueError):
        BatchRunner(pipe, run_ahead=0)


def test_one_job_equals_pipeline_generate_exactly(pipe):
    gen = _request(pipe, "a photo of a person", 7, negative_prompt="blurry")
    ref = pipe.generate(gen)
    bg = BatchRunner(pipe)
    steps = []
    lat = bg.sample([Job(gen)], callback=lambda i, total, x: steps.append((i, total)))
    assert steps == [(0, 2), (1, 2)]
    assert torch.equal(lat, ref.latents)
    assert np.array_equal(bg.decode(lat), ref.images[0])
    assert pipe.parameters(gen) == ref.parameters


def test_batch_of_different_requests_matches_each_alone(pipe):
    gens = [_request(pipe, p, s, scale) for p, s, scale in (("a person", 1, 1.0), ("at the beach", 2, 0.7),
                                                             ("in the snow", 3, 1.2))]
    bg = BatchRunner(pipe, buckets=(1, 2, 4))
    seen = []
    lat = bg.sample([Job(g) for g in gens], callback=lambda i, total, x: seen.append(x.shape[0]))
    assert lat.shape[0] == 3 and seen == [4, 4], "3 jobs run padded to the bucket of 4"
    for k, g in enumerate(gens):
        alone = pipe.generate(g).latents[0]
        err = ((lat[k] - alone).abs().max() / alone.abs().max()).item()
        assert err < 1e-4, (k, err)
    assert not torch.allclose(lat[0], lat[1])
    with pytest.raises(ValueError):
        bg.sample([Job(gens[0]), Job(_request(pipe, "x", 4, guidance=5.0))])


def test_batch_through_the_torch_engine_matches_each_alone():
    """The CUDA path's engine (TorchDenoiserEngine), here on the CPU without graphs: a padded batch of
    different requests gives each request's latents, and one job equals `generate` with the same engine."""
    from caphuman.runtime.pipeline import tiny_random_pipeline

    pipe = tiny_random_pipeline(seed=0, backend="torch")
    assert pipe.backend == "torch"
    gens = [_request(pipe, p, s, scale) for p, s, scale in (("a person", 5, 1.0), ("at night", 6, 0.8),
                                                             ("smiling", 7, 1.1))]
    bg = BatchRunner(pipe, buckets=(1, 2, 4))
    lat = bg.sample([Job(g) for g in gens])
    for k, g in enumerate(gens):
        alone = pipe.generate(g)
        err = ((lat[k] - alone.latents[0]).abs().max() / alone.latents[0].abs().max()).item()
        assert err < 1e-4, (k, err)
    one = bg.sample([Job(gens[1])])
    assert torch.equal(one, pipe.generate(gens[1]).latents)
    pipe.engine.close()
