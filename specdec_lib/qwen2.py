"""Our own Qwen2 decoder: config, KV cache and a forward pass that speculative decoding can drive.

Why not transformers' model? Speculation needs three things a generic model hides:
a preallocated cache that can be rolled back or compacted to an accepted tree path, an
attention mask among the new tokens (a tree), and hidden states of chosen layers. Here they
are explicit arguments. The parameter names match transformers' `Qwen2ForCausalLM`, so its
state_dict loads as is (tests check logits agree to 1e-4 in float32).

Shapes: B batch, T new tokens, S key slots attended (cache slots), H hidden size,
nh query heads, nkv key/value heads, hd head dim, V vocab.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2Config":
        """Read a transformers config dict (config.json); unknown keys are ignored."""
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers 5 may nest it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            rope_theta=float(rope_theta), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}


class KVCache:
    """Preallocated keys and values for every layer, as in gpt-fast.

    k, v: [layers, B, nkv, max_len, hd]. `length` is how many slots hold accepted tokens.
    Rolling back is moving `length`; nothing is copied. Slots at or past `length` may hold
    stale rows from rejected drafts: the attention mask never lets a query see them.
    """

    def __init__(self, config: Qwen2Config, max_len: int, batch: int = 1,
                 device="cpu", dtype=torch.float32):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def rollback(self, length: int) -> None:
        """Forget everything after the first `length` slots."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length}")
        self.length = length

    def keep(self, start: int, rows: list[int]) -> None:
        """Keep slots start + rows (e.g. the root and an accepted tree path), packed contiguously.

        [start, start+1, ...] <- [start+rows[0], start+rows[1], ...]; then length = start + len(rows).
        `rows` is increasing (a root-to-leaf path is). The gather reads all sources before writing.
        """
        rows = [int(r) for r in rows]
        n = len(rows)
        if n and start + rows[-1] >= self.max_len:
            raise ValueError("row outside the cache")
        # subtle: a chain prefix (rows == 0..n-1) is already in place: nothing to move, no device work.
        if rows != list(range(n)):
            src = torch.tensor(rows, device=self.k.device) + start
            self.k[:, :, :, start:start + n] = self.k[:, :, :, src]
            self.v[:, :, :, start:start + n] = self.v[:, :, :, src]
        self.length = start + n


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [B, T] -> cos, sin [B, 1, T, hd]. Computed in float32 for every dtype, like transformers."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    angles = pos.to(torch.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by the position's angle. x: [B, heads, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def grouped_attention(q, k, v, mask):
    """Grouped-query attention written as two matmuls: each kv head serves rep = nh / nkv query heads.

    q: [B, nh, T, hd]; k, v: [B, nkv, S, hd]; mask: [T, S] additive, shared by every row of the
    batch, or [B, 1, T, S] (one mask per row: left-padded batches of prompts). The rep query heads of a group
    are stacked along the row axis, so keys and values are never copied rep times. For the few new
    tokens of a decode or verify step (T <= 64) this is faster on a CPU than the fused SDPA kernel
    (measured: book/setup.md); longer prefills and GPUs use SDPA.
    """
    B, nh, T, hd = q.shape
    if q.is_cuda and q.requires_grad and torch.is_grad_enabled():
        return attention_for_training(q, k, v, mask)
    if (q.is_cuda and mask.dim() < 4) or T > 64:
        # The fused kernel wins on a GPU (measured on an H200: notes/gpu_performance.md; the two
        # small matmuls below get generic GEMM kernels there) and for long prefills on a CPU
        # (700 tokens: 76 vs 100 ms per layer in bf16 on the course's CPU).
        # subtle: with one mask per row ([B, 1, T, S], batched generation) SDPA falls back to its math
        # kernel, which copies every key and value rep times for grouped-query attention: at batch 1,024
        # that is ~100 GB of copies per decode step (seen: 4.7k tokens/s on an H200). The two matmuls
        # below read each key once.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=True)
    nkv = k.shape[1]
    rep = nh // nkv
    qg = q.reshape(B, nkv, rep * T, hd)                                 # [B, nkv, rep*T, hd]
    scores = (qg @ k.transpose(-1, -2)).float() * (hd ** -0.5)          # [B, nkv, rep*T, S]
    if mask.dim() == 4:                                                  # [B, 1, T, S] -> [B, 1, 1, T, S]
        mask = mask[:, :, None]
    scores = scores.view(B, nkv, rep, T, -1) + mask.float()             # same mask for every head
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, nkv, rep * T, -1)
    return (probs @ v).view(B, nh, T, hd)


def attention_for_training(q, k, v, mask):
    """SDPA for a forward that will be differentiated (training on a GPU): same shapes and result as
    grouped_attention, with each kv head repeated for its rep query heads and cuDNN left out.

    subtle: torch 2.11's cuDNN attention backward returns NaN in dq when an explicit mask is given and
    the sequence length is 64 mod 128 (pytorch/pytorch#196678, reached through Qwen2.5's attention-sink
    heads). PARD's drop-token training feeds a different number of rows every step and went NaN near
    step 85 on the H200 (2026-11-29); every new length also cost cuDNN a graph build. The memory-
    efficient kernel takes a mask and builds nothing; it does not group heads, hence the repeat (keys
    and values are small next to the attention scores it never stores)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)   # query head h reads kv head h // rep
    with varying_shape_attention():      # (with a mask given, flash attention never applies)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))


def varying_shape_attention():
    """A context for eager forwards whose shapes change from call to call (a prompt, a catch-up):
    SDPA may use any kernel but cuDNN's.

    subtle: on an H100/H200 SDPA prefers cuDNN, which builds an execution plan for every new (rows, width)
    shape: 43 ms median and up to 0.7 s per new shape on an H200 (chapters/results/06_eagle3/
    h200_sdpa_shape_cost.json), more than a whole prefill. A prompt is a new shape every request, so a
    proposer that catches up on it eagerly paid that inside its first step. Graph-captured steps keep
    cuDNN: their shapes never change, so the plan is built once, at capture. On a CPU this changes nothing.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32, as transformers does, then cast back.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: Qwen2Config):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask):
        # x: [B, T, H]; k_cache, v_cache: [B, nkv, max_len, hd]; slots: [T]; mask: [T, S] additive
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Write the new keys/values into their slots (index_copy_: no host sync, graph friendly).
        # subtle: under bf16 autocast (training on a GPU) a float32 model's k, v come out bf16 while
        # its cache is float32; .to() is a no-op when the dtypes already agree.
        k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
        S = mask.shape[-1]
        keys, values = k_cache[:, :, :S], v_cache[:, :, :S]  # [B, nkv, S, hd]
        out = grouped_attention(q, keys, values, mask)  # [B, nh, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, slots, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):  # named `model` inside Qwen2 so parameter names match transformers
    def __init__(self, c: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Qwen2(nn.Module):
    """Qwen2ForCausalLM, written out. See `forward` for the one entry point."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.config, max_len, batch, self.device, self.dtype)

    def forward(self, ids, pos, cache: KVCache, attn_mask, slots, hidden_layers=(), logits: bool = True,
                block_fn=None):
        """One pass over T new tokens.

        ids, pos: [B, T] token ids and their RoPE positions (in a tree, position = depth, not slot).
        cache: keys/values of earlier tokens; the new ones are written at `slots` [T].
        attn_mask: [T, S] bool, True = may attend; column j is cache slot j (S <= max_len). Or [B, T, S]:
            one mask per batch row (a left-padded batch: row b hides its padding slots). subtle: every
            query row must see at least one slot (a padding row sees itself), else softmax gives NaN.
        hidden_layers: indices into the residual stream as transformers numbers `hidden_states`:
            0 = embeddings, i = after block i, num_layers = after the final norm; negatives wrap.
        Returns logits [B, T, V] (None when logits=False: a prefill only fills the cache, and the
        LM head over hundreds of rows would cost more than the rest) and {layer: hidden [B, T, H]}.
        block_fn: what runs each decoder block, called as block_fn(block, x, cos, sin, k, v, slots, mask);
            default Block.forward. A GPU runner passes torch.compile(Block.forward) to fuse the small
            elementwise kernels (one compiled function serves all layers).
        Nothing here reads a value back to the host, so the step can be captured in a CUDA graph.
        """
        n = self.config.num_hidden_layers
        want = {h % (n + 1) for h in hidden_layers}
        hidden = {}
        x = self.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        # additive float mask: 0 where visible, -inf elsewhere (bool masks misbehave in some kernels)
        mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill(~attn_mask, float("-inf"))
        if mask.dim() == 3:   # [B, T, S] -> [B, 1, T, S]: broadcast over heads
            mask = mask[:, None]
        if 0 in want:
            hidden[0] = x
        block_fn = block_fn or Block.forward
        for i, layer in enumerate(self.model.layers):
            x = block_fn(layer, x, cos, sin, cache.k[i], cache.v[i], slots, mask)
            if i + 1 in want and i + 1 < n:
                hidden[i + 1] = x
        x = self.model.norm(x)
        if n in want:
            hidden[n] = x
        return (self.lm_head(x) if logits else None), {h: hidden[h % (n + 1)] for h in hidden_layers}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_pretrained(model: Qwen2, folder) -> None:
    """Write config.json + model.safetensors, a folder `load_folder` (and transformers) can read."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(folder / "model.safetensors"))


def load_folder(folder, device="cpu", dtype=torch.float32) -> Qwen2:
    """Load a transformers-style folder (config.json + *.safetensors shards) without transformers."""
    from safetensors.torch import load_file
    folder = Path(folder)
    config = Qwen2Config.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = Qwen2(config)
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval()


def from_transformers(hf_model, device=None, dtype=None) -> Qwen2:
    """Copy the weights of a transformers Qwen2ForCausalLM into our module."""
    config = Qwen2Config.from_dict(hf_model.config.to_dict())
    with torch.device("meta"):
        model = Qwen2(config)
    sd = dict(hf_model.state_dict())
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    dtype = dtype or next(hf_model.parameters()).dtype
    model.load_state_dict({k: v.detach().to(dtype).clone() for k, v in sd.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device or next(hf_model.parameters()).device).eval()


def random_model(config: Qwen2Config, seed: int = 0, std: float = 0.02, dtype=torch.float32, device="cpu") -> Qwen2:
    """A seeded, randomly initialised model (the `tiny` profile; timing-only 7B shapes on a GPU).

    Weights are drawn on `device` with a generator there, so a 7B-shaped model needs no host memory.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = Qwen2(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * std)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()
