"""Replaying the decode/verify forward from CUDA graphs, so a step costs one launch, not hundreds.

At batch 1 an eager forward of a 28-layer model launches several hundred small kernels, and the
Python that launches them takes longer than the GPU needs to read the weights. A CUDA graph
records the launches once and replays them with one call. Graphs need static shapes and static
addresses, so:
- new tokens are padded to a bucket size (1, 2, 4, ..., 64); padded rows attend only to their own
  slot and write into slots past the accepted length, which the mask never shows to anyone;
- attention always spans the whole cache (kv_len = max_len), so the mask has a fixed width;
- the runner owns the KV cache whose addresses the graphs captured.

`GraphRunner` has the same call signature as `Qwen2.forward`, so `generate(..., forward=runner,
kv_len=cache.max_len, cache=runner.cache)` runs the same loop, graph-replayed. It takes its inputs
on the CPU (generate builds them there for any custom forward) and ships them in two copies.
"""
from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class GraphRunner:
    def __init__(self, model, max_len: int, buckets=BUCKETS, hidden_layers=(), compile: bool = False):
        """compile: run each block through torch.compile(Block.forward), which fuses the ~30 small
        elementwise kernels of a block (norms, RoPE, softmax, SwiGLU) into a few. At batch 1 each tiny
        kernel costs a few microseconds even inside a graph, which adds up over 28 layers."""
        self.model, self.buckets, self.hidden_layers = model, tuple(buckets), tuple(hidden_layers)
        from .qwen2 import Block
        self.block_fn = torch.compile(Block.forward, dynamic=True) if compile else None
        self.cache = model.new_cache(max_len)
        self.max_len = max_len
        dev = model.device
        # Per bucket b: one int64 block [3, b] (ids, positions, slots) and one bool mask [b, max_len],
        # on the device (what the graph reads) and pinned on the host (what we fill each step), so a
        # step costs two host-to-device copies before the replay.
        self.static, self.host = {}, {}
        for b in self.buckets:
            idx = torch.stack([torch.zeros(b, dtype=torch.long), torch.arange(b), torch.arange(b)])
            mask = torch.eye(b, max_len, dtype=torch.bool)
            self.static[b] = dict(idx=idx.to(dev), mask=mask.to(dev))
            self.host[b] = dict(idx=idx.pin_memory(), mask=mask.pin_memory())
        self.graphs, self.outputs = {}, {}
        self.pool = None

    @torch.inference_mode()
    def capture(self):
        """Record one graph per bucket (largest first, sharing one memory pool)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in self.buckets:   # warm-up outside capture (lazy init, kernel selection)
                for _ in range(2):
                    self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        for b in sorted(self.buckets, reverse=True):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self._forward(b)
            self.pool = g.pool()
            self.graphs[b], self.outputs[b] = g, out
        torch.cuda.synchronize()
        return self

    def _forward(self, b):
        s = self.static[b]
        ids, pos, slots = s["idx"][0:1], s["idx"][1:2], s["idx"][2]
        return self.model(ids, pos, self.cache, s["mask"], slots, self.hidden_layers, block_fn=self.block_fn)

    def __call__(self, ids, pos, cache, attn_mask, slots, hidden_layers=(), logits=True):
        T = ids.shape[1]
        bucket = next((b for b in self.buckets if b >= T), None)
        start = int(cache.length)
        if (cache is not self.cache or not logits or bucket is None or tuple(hidden_layers) != self.hidden_layers
                or start + bucket > self.max_len or attn_mask.shape[-1] != self.max_len or not self.graphs):
            # prefill and anything unusual run eagerly (same function, same numbers)
            dev = self.model.device
            return self.model(ids.to(dev), pos.to(dev), cache, attn_mask.to(dev), slots.to(dev), hidden_layers,
                              logits)
        h, s = self.host[bucket], self.static[bucket]
        h["idx"][0, :T] = ids[0]
        h["idx"][1, :T] = pos[0]
        h["idx"][2, :T] = slots
        h["mask"][:T] = attn_mask
        if bucket > T:
            # padded rows: token 0 at fresh slots past the new ones, each seeing only itself
            pad = torch.arange(start + T, start + bucket)
            h["idx"][0, T:] = 0
            h["idx"][1, T:] = pad
            h["idx"][2, T:] = pad
            h["mask"][T:] = False
            h["mask"][torch.arange(T, bucket), pad] = True
        s["idx"].copy_(h["idx"], non_blocking=True)
        s["mask"].copy_(h["mask"], non_blocking=True)
        # subtle: the next step refills the pinned buffers only after reading this step's logits,
        # which waits for the stream, so a copy never reads a half-written buffer.
        self.graphs[bucket].replay()
        out_logits, out_hidden = self.outputs[bucket]
        return out_logits[:, :T], {k: v[:, :T] for k, v in out_hidden.items()}
