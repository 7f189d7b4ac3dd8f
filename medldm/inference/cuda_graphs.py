"""The diffusion UNet's forward as a replayed CUDA graph, for the fixed-shape sampling loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medldm.errors import ResourceError


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor | None
    out: torch.Tensor


class GraphedUNet:
    """Calls ``unet(x, timesteps=..., context=...)`` by replaying a CUDA graph captured for that input shape.

    At sampling batch sizes a forward of the brain-LDM UNet is about a thousand small kernels, and launching them
    from Python, not the GPU, sets the pace (benchmarks/RESULTS.md). A replay launches them all at once. Inputs are
    copied into the graph's static buffers and the output is copied out, so this behaves like the module itself
    (eval mode, no gradients). The weights are read in place: a graph stays valid while they are updated in place,
    not if they are replaced."""

    def __init__(self, unet: torch.nn.Module, amp: bool = True, warmup: int = 2) -> None:
        self.unet, self.amp, self.warmup = unet, amp, warmup
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every shape's graph

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, tuple(timesteps.shape), timesteps.dtype,
               None if context is None else (tuple(context.shape), context.dtype))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, timesteps, context)
        g = self.graphs[key]
        g.x.copy_(x)
        g.timesteps.copy_(timesteps)
        if context is not None:
            assert g.context is not None  # the key holds a context: so did the capture
            g.context.copy_(context)
        g.graph.replay()
        return g.out.clone()

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        # autocast's weight-cast cache must be off inside a graph: its tensors would be freed after capture
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            return self.unet(x, timesteps=timesteps, context=context)

    def _capture(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None) -> _Graph:
        static_x, static_t = x.clone(), timesteps.clone()
        static_c = context.clone() if context is not None else None
        # warm-up on a side stream: compiles any compiled regions and lets cuDNN pick its algorithms first
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward(static_x, static_t, static_c)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(static_x, static_t, static_c)
        except RuntimeError as e:
            cause = e.__context__ or e  # a failed forward surfaces as capture_end's own error
            raise ResourceError(f"CUDA graph capture of the UNet failed for input {list(x.shape)} "
                               f"({str(cause).splitlines()[0]}): sample with --eager") from cause
        return _Graph(graph, static_x, static_t, static_c, out)
