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
kv_len=cache.max_len, cache=runner.cache)` runs the same loop, graph-replayed.
"""
from __future__ import annotations

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class GraphRunner:
    def __init__(self, model, max_len: int, buckets=BUCKETS, hidden_layers=()):
        self.model, self.buckets, self.hidden_layers = model, tuple(buckets), tuple(hidden_layers)
        self.cache = model.new_cache(max_len)
        self.max_len = max_len
        dev = model.device
        self.static = {}
        for b in self.buckets:
            self.static[b] = dict(ids=torch.zeros(1, b, dtype=torch.long, device=dev),
                                  pos=torch.zeros(1, b, dtype=torch.long, device=dev),
                                  slots=torch.arange(b, device=dev),
                                  mask=torch.eye(b, max_len, dtype=torch.bool, device=dev))
        self.graphs, self.outputs = {}, {}
        self.pool = None

    @torch.inference_mode()
    def capture(self):
        """Record one graph per bucket (largest first, sharing one memory pool)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in self.buckets:   # warm-up outside capture (lazy init, kernel selection)
                s = self.static[b]
                self.model(s["ids"], s["pos"], self.cache, s["mask"], s["slots"], self.hidden_layers)
        torch.cuda.current_stream().wait_stream(stream)
        for b in sorted(self.buckets, reverse=True):
            s = self.static[b]
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self.model(s["ids"], s["pos"], self.cache, s["mask"], s["slots"], self.hidden_layers)
            self.pool = g.pool()
            self.graphs[b], self.outputs[b] = g, out
        torch.cuda.synchronize()
        return self

    def __call__(self, ids, pos, cache, attn_mask, slots, hidden_layers=(), logits=True):
        T = ids.shape[1]
        bucket = next((b for b in self.buckets if b >= T), None)
        start = int(cache.length)
        if (cache is not self.cache or not logits or bucket is None or tuple(hidden_layers) != self.hidden_layers
                or start + bucket > self.max_len or attn_mask.shape[-1] != self.max_len or not self.graphs):
            # prefill and anything unusual run eagerly (same function, same numbers)
            return self.model(ids, pos, cache, attn_mask, slots, hidden_layers, logits)
        s = self.static[bucket]
        s["ids"][:, :T].copy_(ids)
        s["pos"][:, :T].copy_(pos)
        s["slots"][:T].copy_(slots)
        s["mask"][:T].copy_(attn_mask)
        if bucket > T:
            # padded rows: token 0 at fresh slots past the new ones, each seeing only itself
            pad = torch.arange(start + T, start + bucket, device=ids.device)
            s["ids"][:, T:] = 0
            s["pos"][:, T:] = pad
            s["slots"][T:] = pad
            s["mask"][T:] = False
            s["mask"][torch.arange(T, bucket, device=ids.device), pad] = True
        self.graphs[bucket].replay()
        out_logits, out_hidden = self.outputs[bucket]
        return out_logits[:, :T], {h: v[:, :T] for h, v in out_hidden.items()}
