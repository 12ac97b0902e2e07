"""`CudaGraphed`: run a network's forward pass from a CUDA graph captured once per input shape.

The condition networks (FaceNet, BiSeNet, CLIP's image and text towers, DECA's encoder) run once or
twice per request at batch 1: eagerly their time is mostly Python and kernel launches (hundreds of
small kernels), which one graph replay removes. Same kernels, same numbers: a replay computes what
the eager forward computes for that input.

    facenet = CudaGraphed(facenet)          # facenet(x) as before; x on the GPU is replayed
    emb = facenet(crop)                     # the first call per shape warms up and captures

On the CPU, with autograd on, or when a capture fails (the error is logged once), the wrapped
module runs eagerly. Outputs are copied out of the graph's static buffers, so results of earlier
calls stay valid. Replays are serialised by a lock (one set of static buffers per shape).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

log = logging.getLogger(__name__)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], outputs):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class CudaGraphed(nn.Module):
    """`module(*tensors)` replayed from one CUDA graph per (shapes, dtypes, device) of its inputs.

    `max_graphs` bounds the captured shapes (least recently used are dropped); a shape is captured
    on its `capture_after`-th call (2: shapes seen once, such as arbitrary photo sizes, stay eager
    and cost no capture); `warmup` eager
    runs precede each capture (lazy initialisation; with `autotune`, cuDNN benchmarks its
    convolution algorithms for these shapes there, and the graph keeps the fastest)."""

    def __init__(self, module: nn.Module, max_graphs: int = 4, warmup: int = 2, autotune: bool = True,
                 capture_after: int = 1):
        super().__init__()
        self.module = module
        self.max_graphs, self.warmup, self.autotune = max_graphs, warmup, autotune
        self.capture_after = max(1, capture_after)
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._seen: OrderedDict[tuple, int] = OrderedDict()
        self._lock = threading.Lock()
        self.failed: str | None = None

    def forward(self, *args: torch.Tensor):
        if (self.failed is not None or torch.is_grad_enabled() or not args
                or not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
                or torch.cuda.is_current_stream_capturing()):
            return self.module(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                self._seen[key] = self._seen.pop(key, 0) + 1
                while len(self._seen) > 64:
                    self._seen.popitem(last=False)
                if self._seen[key] < self.capture_after:
                    return self.module(*args)
                entry = self._capture(args)
                if entry is None:
                    return self.module(*args)
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            for dst, src in zip(entry.inputs, args):
                dst.copy_(src)
            entry.graph.replay()
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.outputs)

    def _capture(self, args: tuple[torch.Tensor, ...]) -> _Captured | None:
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = benchmark or self.autotune
        try:
            static = [a.detach().clone() for a in args]
            stream = torch.cuda.Stream(device=args[0].device)
            stream.wait_stream(torch.cuda.current_stream(args[0].device))
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self.module(*static)
            torch.cuda.current_stream(args[0].device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self.module(*static)
            leaves, _ = tree_flatten(outputs)
            if not any(isinstance(t, torch.Tensor) for t in leaves):
                raise TypeError("the module returned no tensor")
            return _Captured(graph, static, outputs)
        except Exception as e:  # a module that cannot be captured still runs, eagerly
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture of %s failed, running it eagerly: %s", type(self.module).__name__,
                        self.failed)
            try:
                torch.cuda.synchronize()
            except RuntimeError:
                pass
            return None
        finally:
            torch.backends.cudnn.benchmark = benchmark

    @property
    def captured_shapes(self) -> list[tuple]:
        return list(self._graphs)
