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
on the CPU (generate builds them there for any custom forward) and ships them in two copies, or on
the GPU (a draft built there) and writes them into the graph's buffers with device ops.

`GreedyChain` is the autoregressive baseline with no host in the loop (as gpt-fast decodes): one
graph per token that also takes the argmax and writes the next step's inputs on the device, so the
host only queues replays. Speculative steps cannot do that: how many tokens were accepted decides
the next step's inputs, so the host must read it (one sync per step).
"""
from __future__ import annotations

import time
from functools import partial

import torch

from .qwen2 import varying_shape_attention
from .timing import cuda_time

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# catch-up buckets (GraphRunner catchup) for a prompt fed at once: the target's prefill, a draft model's or
# PARD's first proposal. Eagerly, a 1.5B prefill cost ~45 ms on an H100 (live run 8), a 0.5B one 21-68 ms
CATCHUP = (128, 512, 1024)


def record(fn, warmup: int = 2):
    """fn() recorded as one CUDA graph -> (graph, fn's output, which every replay rewrites in place).

    The warm-up calls run on a side stream first, so lazy initialisation, kernel choice and the
    allocations happen outside the capture; what they write must be harmless to write again."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class GraphRunner:
    def __init__(self, model, max_len: int, buckets=BUCKETS, hidden_layers=(), compile: bool = False,
                 fused: bool = False, only: str | None = None, catchup=()):
        """compile: run each block through torch.compile(Block.forward), which fuses the ~30 small
        elementwise kernels of a block (norms, RoPE, softmax, SwiGLU) into a few. At batch 1 each tiny
        kernel costs a few microseconds even inside a graph, which adds up over 28 layers.
        fused: buckets of at most 16 tokens may run `kernels.FusedQwen2` (five Triton kernels + two of
        attention per layer): both are captured, each replayed 20 times, and the faster graph is kept
        (`self.variant[b]`); larger buckets keep the plain (or compiled) forward.
        only: "fused" or "plain" to capture just that variant where it applies (tools/gpu_check.py
        checks each one against the eager forward).
        catchup: larger buckets (e.g. CATCHUP) for the one long step of a request, a prompt fed at
        once (the target's prefill, a draft model's first proposal): captured too, used only for
        steps that no bucket holds, and left out of the cost curve. Eagerly, the 0.5B's 24 layers
        launched from Python took 21-68 ms on an H100 (live run 7); one replay of a padded graph
        takes a few."""
        if only not in (None, "fused", "plain"):
            raise ValueError(f"only must be None, 'fused' or 'plain', got {only!r}")
        self.model, self.buckets, self.hidden_layers = model, tuple(buckets), tuple(hidden_layers)
        # (a catch-up bucket must fit the cache: its padded rows write slots up to its size)
        self.catchup = tuple(sorted(b for b in catchup if max(self.buckets) < b <= max_len))
        self.all_buckets = self.buckets + self.catchup
        self.only = only
        from .qwen2 import Block
        self.block_fn = torch.compile(Block.forward, dynamic=True) if compile else None
        self.fused = None
        if fused:
            from .kernels import FusedQwen2
            self.fused = FusedQwen2(model)
        self.cache = model.new_cache(max_len)
        self.max_len = max_len
        dev = model.device
        # On a CPU there are no CUDA graphs: capture() then only marks the runner ready and each step
        # runs eagerly from the same padded, bucketed static buffers (so a CPU test exercises the
        # bucketing and padding a GPU replays).
        self.on_gpu = torch.device(dev).type == "cuda"
        self.ready = False
        # Per bucket b: one int64 block [3, b] (ids, positions, slots) and one bool mask [b, max_len],
        # on the device (what the graph reads) and pinned on the host (what we fill each step), so a
        # step costs two host-to-device copies before the replay.
        self.static, self.host = {}, {}
        for b in self.all_buckets:
            idx = torch.stack([torch.zeros(b, dtype=torch.long), torch.arange(b), torch.arange(b)])
            mask = torch.eye(b, max_len, dtype=torch.bool)
            self.static[b] = dict(idx=idx.to(dev), mask=mask.to(dev))
            self.host[b] = dict(idx=idx.pin_memory(), mask=mask.pin_memory()) if self.on_gpu else \
                dict(idx=idx.clone(), mask=mask.clone())
        self.graphs, self.outputs, self.variant, self.replay_s = {}, {}, {}, {}
        self.pool = None
        self.fused_failed: dict[int, str] = {}     # bucket -> why the fused kernels could not run it

    def _variants(self, b):
        from .kernels import MAX_T
        both = ("fused", "plain") if self.fused is not None and b <= MAX_T and b not in self.fused_failed \
            else ("plain",)
        if self.only in both:
            return (self.only,)
        return both

    @torch.inference_mode()
    def capture(self):
        """Record one graph per bucket (largest first, sharing one memory pool)."""
        if not self.on_gpu:
            self.variant = {b: self._variants(b)[0] for b in self.all_buckets}
            self.ready = True
            return self
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in self.all_buckets:   # warm-up outside capture (lazy init, kernel selection)
                for variant in self._variants(b):
                    try:
                        for _ in range(2):
                            self._forward(b, variant)
                    except Exception as e:                       # noqa: BLE001 - any kernel failure
                        if variant != "fused" or self.only == "fused":
                            raise
                        # the plain forward still runs this bucket (slower); tools/gpu_check.py fails on it
                        import warnings
                        warnings.warn(f"GraphRunner: the fused kernels failed for {b}-token steps "
                                      f"({type(e).__name__}: {e}); those steps run the plain forward")
                        self.fused_failed[b] = f"{type(e).__name__}: {e}"
        torch.cuda.current_stream().wait_stream(stream)
        for b in sorted(self.all_buckets, reverse=True):
            for variant in self._variants(b):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    out = self._forward(b, variant)
                self.pool = g.pool()
                t = cuda_time(g.replay, warmup=1)   # a whole forward: no cache effects to flush
                if b not in self.graphs or t < self.replay_s[b]:
                    self.graphs[b], self.outputs[b], self.variant[b], self.replay_s[b] = g, out, variant, t
        torch.cuda.synchronize()
        self.ready = True
        return self

    def bucket(self, T: int, room: int | None = None) -> int | None:
        """The bucket a T-token step is padded to: the fastest captured one that holds T rows (and fits the
        `room` cache slots left), so a larger bucket serves a step when its graph replays faster; before
        capture (or on a CPU) the smallest that holds T. None: no bucket fits, the step runs eagerly.

        Measured on the real 1.5B (H200, 2026-12-06): the 8-token graph replayed in 1.73 ms, the 4-token
        one in 1.86 ms (their kernel configurations are tuned per bucket), so 3- and 4-token steps run as 8.
        """
        fits = [b for b in self.buckets if b >= T and (room is None or b <= room)]
        if not fits:       # a long step (a prompt): the smallest catch-up bucket that holds it
            return next((b for b in self.catchup if b >= T and (room is None or b <= room)), None)
        if all(b in self.replay_s for b in fits):
            return min(fits, key=lambda b: (self.replay_s[b], b))
        return fits[0]

    def step_forward(self, T: int, variant: str | None = None):
        """The function that runs a T-token step inside the graphs (Qwen2.forward's signature)."""
        variant = variant or self.variant.get(T, self._variants(T)[0])
        if variant == "fused":
            return self.fused
        return partial(self.model.forward, block_fn=self.block_fn)

    def _forward(self, b, variant):
        s = self.static[b]
        ids, pos, slots = s["idx"][0:1], s["idx"][1:2], s["idx"][2]
        return self.step_forward(b, variant)(ids, pos, self.cache, s["mask"], slots, self.hidden_layers)

    @staticmethod
    def fill(buf: dict, T: int, start: int, ids, pos, slots, attn_mask) -> None:
        """Write a T-token step into one bucket's buffers (idx [3, b], mask [b, max_len]), on the
        host or on the device: rows :T are the step, rows T: padding (token 0 at fresh slots past
        the new ones, each seeing only itself: written where the mask never lets anyone look)."""
        idx, mask = buf["idx"], buf["mask"]
        b = idx.shape[1]
        idx[0, :T] = ids[0]
        idx[1, :T] = pos[0]
        idx[2, :T] = slots
        mask[:T] = attn_mask
        if b > T:
            pad = torch.arange(start + T, start + b, device=idx.device)
            idx[0, T:] = 0
            idx[1, T:] = pad
            idx[2, T:] = pad
            mask[T:] = False
            mask[torch.arange(T, b, device=idx.device), pad] = True

    def __call__(self, ids, pos, cache, attn_mask, slots, hidden_layers=(), logits=True):
        """Qwen2.forward's signature. hidden_layers may be any subset of the runner's own (the graphs
        return those layers; a proposer that needs none still runs in the same graphs)."""
        T = ids.shape[1]
        start = int(cache.length)
        bucket = self.bucket(T, room=self.max_len - start)
        if (cache is not self.cache or bucket is None or not set(hidden_layers) <= set(self.hidden_layers)
                or attn_mask.shape[-1] != self.max_len or not self.ready):
            # prefill and anything unusual run eagerly (same function, same numbers), without cuDNN's
            # attention: a new shape every request would cost it a plan build (qwen2.varying_shape_attention)
            dev = self.model.device
            with varying_shape_attention():
                return self.model(ids.to(dev), pos.to(dev), cache, attn_mask.to(dev), slots.to(dev),
                                  hidden_layers, logits)
        if ids.device.type == "cpu":
            # filled on the host, in pinned memory, and shipped in two copies
            self.fill(self.host[bucket], T, start, ids, pos, slots, attn_mask)
            self.static[bucket]["idx"].copy_(self.host[bucket]["idx"], non_blocking=True)
            self.static[bucket]["mask"].copy_(self.host[bucket]["mask"], non_blocking=True)
        else:
            # a draft built on the GPU (the draft model's chain): written into the graph's buffers
            # by device ops, so the host queues this replay without waiting for the proposal
            self.fill(self.static[bucket], T, start, ids, pos, slots, attn_mask)
        if self.on_gpu:
            # subtle: the next step refills the pinned buffers only after reading this step's logits,
            # which waits for the stream, so a copy never reads a half-written buffer.
            self.graphs[bucket].replay()
            out_logits, out_hidden = self.outputs[bucket]
        else:
            out_logits, out_hidden = self._forward(bucket, self.variant[bucket])
        # (a graph always computes its logits; a prefill that asked for none gets None, as eagerly)
        return out_logits[:, :T] if logits else None, {k: out_hidden[k][:, :T] for k in hidden_layers}


class GreedyChain:
    """Greedy autoregressive decoding in which the device feeds itself.

    state (on the device, int64 [4]): the token to feed, its position, its cache slot, and how many
    tokens are in `out`. One `step` feeds the token, takes the argmax of its logits, appends it to
    `out` and advances the state, all without reading anything back, so on a GPU it is captured once
    as a graph and the host just queues replays; it reads `out` every `check_every` tokens (for EOS)
    and at the end. The tokens equal `generate` with the baseline proposer (tests/test_decoding.py).
    Its record's decode time is pro-rated to the tokens kept: steps run past an EOS are not charged.
    """

    def __init__(self, forward, cache, device):
        self.forward, self.cache = forward, cache       # forward: Qwen2.forward's signature
        self.state = torch.zeros(4, dtype=torch.long, device=device)
        self.out = torch.zeros(cache.max_len, dtype=torch.long, device=device)
        self.cols = torch.arange(cache.max_len, device=device)
        self.graph = None

    def step(self):
        tok, pos, slot = self.state[0:1][None], self.state[1:2][None], self.state[2:3]
        mask = self.cols[None] <= slot                  # [1, max_len]: every cached token and itself
        logits, _ = self.forward(tok, pos, self.cache, mask, slot)
        nxt = logits[0, -1].argmax().view(1)
        self.out.index_copy_(0, self.state[3:4], nxt)
        self.state[0:1].copy_(nxt)
        self.state[1:4] += 1

    @torch.inference_mode()
    def capture(self):
        """Record `step` as one CUDA graph (after two warm-up steps, whose cache writes land in slots
        the next prefill overwrites)."""
        self.state.copy_(torch.tensor([0, 0, 0, 0]))
        self.graph, _ = record(self.step)
        torch.cuda.synchronize()
        return self

    @torch.inference_mode()
    def generate(self, model, prompt_ids, max_new_tokens: int, eos_ids=(), check_every: int = 64,
                 prompt_id="0"):
        """Same arguments and result type as decoding.generate with the baseline proposer (greedy)."""
        from .decoding import GenerationResult, _sync, check_prompt
        from .metrics import StepRecord, request_record
        from .tree import chain_inputs
        prompt = check_prompt(prompt_ids, max_new_tokens, self.cache.max_len)
        device, cache, eos = model.device, self.cache, set(int(e) for e in eos_ids)
        cache.length = 0
        _sync(device)
        t_start = time.perf_counter()
        L = len(prompt) - 1
        if L:
            pos, slots, mask = chain_inputs(0, L, cache.max_len, device)
            model(torch.tensor([prompt[:-1]], device=device), pos, cache, mask, slots, logits=False)
        self.state.copy_(torch.tensor([prompt[-1], L, L, 0]))
        _sync(device)
        prefill_s = time.perf_counter() - t_start
        run = self.graph.replay if self.graph is not None else self.step
        new, stop, ran = [], "length", 0
        while len(new) < max_new_tokens and stop == "length":
            n = min(check_every, max_new_tokens - len(new))
            for _ in range(n):
                run()
            ran += n
            chunk = self.out[len(new):len(new) + n].tolist()    # the one sync per check_every tokens
            for t in chunk:
                new.append(t)
                if t in eos:
                    stop = "eos"
                    break
        cache.length = L + len(new)      # the cache holds everything but the newest token (the root)
        # the steps decoded past an EOS inside the last chunk are not counted: time per step is what
        # this loop measures, and a loop that stopped at the EOS would not have run them (counted, a
        # 10-token answer would be charged 64 steps, and the rate would read 6x too slow)
        per = (time.perf_counter() - t_start - prefill_s) / ran
        wall = prefill_s + per * len(new)
        steps = [StepRecord(proposed=0, accepted=0, emitted=1, propose_s=0.0, verify_s=per, wall_s=per)
                 for _ in new]
        record = request_record("baseline_device_loop", prompt_id, len(prompt), steps, prefill_s, wall)
        return GenerationResult(new, steps, record, stop)


class GraphDraft:
    """A small model behind a GraphRunner, for a proposer that runs its own model (the draft model).

    It stands in for the Qwen2 the proposer was given: `forward` / calling it goes through the runner,
    so each one-token draft step is one graph replay instead of hundreds of launches. Because the
    graphs write into the runner's cache (fixed addresses), `new_cache` hands out that cache, whatever
    size is asked (it holds runner.max_len slots). Masks [T, S] are widened to the runner's static
    width (the extra columns are hidden), and `device` is the CPU: the proposer builds its step
    inputs on the host and the runner ships them in its two copies; ids already on the GPU (a
    drafted token fed back) keep their step on the GPU.
    """

    def __init__(self, runner: GraphRunner):
        self.runner, self.model, self.config = runner, runner.model, runner.model.config

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return self.model.dtype

    def new_cache(self, max_len: int, batch: int = 1):
        if batch != 1:
            raise ValueError("GraphDraft serves batch 1 only")
        return self.runner.cache       # subtle: its length is stale; the proposer rolls back to what it knows

    def forward(self, ids, pos, cache, attn_mask, slots, hidden_layers=(), logits=True):
        T, S = attn_mask.shape[-2:]
        if S > self.runner.max_len:
            raise ValueError(f"a mask over {S} slots does not fit the runner's {self.runner.max_len}: "
                             f"build the draft's GraphRunner with a larger max_len")
        # ids on the CPU, or on the GPU for a token drafted there and fed straight back (DraftModel's
        # greedy chain): the step's inputs stay where the ids are
        on = ids.device
        mask = torch.zeros(T, self.runner.max_len, dtype=torch.bool, device=on)
        mask[:, :S] = attn_mask.reshape(T, S).to(on)
        return self.runner(ids, pos.to(on), cache, mask, slots.to(on), hidden_layers, logits)

    __call__ = forward


def draft_runner(model, max_len: int, buckets=BUCKETS) -> GraphRunner:
    """A captured GraphRunner for a model a proposer runs (the draft model, PARD's drafter), as the live
    bench and the chapters build it: a draft step feeds 1-2 tokens (PARD: its masks + the accepted ones),
    so buckets up to 32, and the catch-up buckets for the prompt fed at a request's first proposal.
    16 spare slots beyond max_len: a drafter runs a few positions ahead of the target."""
    on_gpu = model.device.type == "cuda"
    return GraphRunner(model, max_len + 16, buckets=[b for b in buckets if b <= 32], compile=on_gpu,
                       fused=on_gpu, catchup=CATCHUP).capture()


def fast_forward(model, max_len: int, hidden_layers=()):
    """What a chapter passes to `generate` to run on the GPU fast path: (forward, cache, kv_len).

        forward, cache, kv_len = fast_forward(models.target, max_len=4096)
        generate(models.target, proposer, prompt, 256, forward=forward, cache=cache, kv_len=kv_len)

    On a GPU: a captured GraphRunner (fused Triton kernels for steps of <= 16 tokens, compiled blocks
    beyond, catch-up buckets for the prefill), returning the hidden layers a learned proposer needs.
    On a CPU: the plain forward and a cache of max_len slots (generate's default path; nothing to
    capture). Capture takes ~30-60 s per model on an H200 (compile + kernel tuning), so build it once
    per model and reuse it.
    """
    if model.device.type != "cuda":
        return model.forward, model.new_cache(max_len), None
    runner = GraphRunner(model, max_len, hidden_layers=hidden_layers, compile=True, fused=True,
                         catchup=CATCHUP).capture()
    return runner, runner.cache, max_len
