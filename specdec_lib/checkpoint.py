"""Checkpoints of learned proposers: safetensors, with a JSON header saying what they belong to.

A Medusa head or an EAGLE drafter is trained on one target's hidden states; loaded onto another
target it would still run and silently propose garbage. So every checkpoint records its base
model's fingerprint (and method, config, data manifest hash, steps, date), and loading refuses a
mismatch with a clear error.

Weights go to git for the `small` pair, so they must stay small (all learned methods together
<= 24 MiB, and no file over 8 MB). `bits=8` stores each matrix as int8 with one float scale per row
(w ~= q * scale, q = round(w / scale), scale = max|row| / 127), a quarter of float32's bytes;
`bits=4` stores 4-bit integers in -7..7, two to a byte, with one float16 scale per group of 64 columns
(scale = max|group| / 7), an eighth of float32's bytes plus 1/32 for the scales. Groups rather than
rows because 15 levels are coarse: one large weight would flatten its whole row, but only its group.

    specdec_lib/assets/checkpoints/<method>-<profile>.safetensors
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

CHECKPOINT_DIR = Path(__file__).resolve().parent / "assets" / "checkpoints"
SCALE_SUFFIX = ".__row_scale"       # int8: float32 [R]
GROUP_SUFFIX = ".__group_scale"     # int4: float16 [R, C / GROUP]
GROUP = 64


class CheckpointMismatch(ValueError):
    pass


def target_fingerprint(model) -> str:
    """sha256 over the config and a fixed sample of weight rows, cast to bf16 (so a model loaded in
    float32 or bf16, on a CPU or a GPU, has the same fingerprint)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    sd = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                 f"model.layers.{model.config.num_hidden_layers - 1}.mlp.down_proj.weight"):
        w = sd[name]
        rows = torch.linspace(0, w.shape[0] - 1, 16).long().to(w.device)
        h.update(w[rows].detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def checkpoint_path(method: str, profile: str) -> Path:
    return CHECKPOINT_DIR / f"{method}-{profile}.safetensors"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> int8 [R, C] and float32 scales [R]. A zero row gets scale 1 (q = 0)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float (C a multiple of group) -> uint8 [R, C / 2] (column 2j in the low nibble, 2j + 1 in
    the high one, each stored as q + 8 with q in -7..7) and float16 scales [R, C / group]."""
    w = w.detach().float()
    R, C = w.shape
    g = w.view(R, C // group, group)
    scale = (g.abs().amax(dim=2) / 7.0).to(torch.float16).float()   # rounded first: dequantize uses these
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(g / scale[:, :, None]).clamp(-7, 7).view(R, C).to(torch.int16) + 8   # 1..15
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale.to(torch.float16)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_int4: uint8 [R, C / 2], float16 [R, C / group] -> float32 [R, C]."""
    b = packed.to(torch.int16)
    q = torch.stack([(b & 15) - 8, (b >> 4) - 8], dim=2).view(packed.shape[0], -1).float()  # [R, C]
    group = q.shape[1] // scale.shape[1]
    return q * scale.float().repeat_interleave(group, dim=1)


def save_checkpoint(path, module: torch.nn.Module, *, method: str, base_model, config: dict,
                    data_sha256: str | None, steps: int, bits: int = 32, extra: dict | None = None) -> Path:
    """Write module.state_dict() + the header. The module holds only what was trained (heads, a drafter,
    adapters), never the frozen base model: the checkpoint is the change, not the model.

    bits: 32 keeps every tensor as it is; 16 stores floats as bf16; 8 and 4 quantize each matrix of at
    least 4096 entries (int8 per row; int4 per group of 64 columns, int8 for a matrix whose columns do
    not split into groups of 64) and store the other floats as bf16."""
    from safetensors.torch import save_file
    if bits not in (32, 16, 8, 4):
        raise ValueError(f"bits must be 32, 16, 8 or 4, not {bits!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        matrix = t.dim() == 2 and t.is_floating_point() and t.numel() >= 4096
        if bits == 4 and matrix and t.shape[1] % GROUP == 0:
            tensors[name], tensors[name + GROUP_SUFFIX] = quantize_int4(t)
        elif bits in (4, 8) and matrix:
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize_int8(t)
        else:
            tensors[name] = t.to(torch.bfloat16) if (bits < 32 and t.is_floating_point()) else t
    header = dict(method=method, base_model=getattr(base_model, "name_or_path", None) or config.get("base_model_name"),
                  base_fingerprint=target_fingerprint(base_model), config=config, data_sha256=data_sha256,
                  steps=steps, bits=bits, int8=bits == 8, date=time.strftime("%Y-%m-%d"), **(extra or {}))
    save_file(tensors, str(path), metadata={"header": json.dumps(header, sort_keys=True)})
    return path


def update_header(path, **fields) -> None:
    """Add fields to a checkpoint's header, rewriting the file with its stored tensors unchanged."""
    from safetensors.torch import load_file, save_file
    header = {**read_header(path), **fields}
    save_file(load_file(str(path)), str(path), metadata={"header": json.dumps(header, sort_keys=True)})


def read_header(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["header"])


def load_checkpoint(path, module: torch.nn.Module, *, method: str, base_model) -> dict:
    """Load weights into module (in place, in module's dtype and device); return the header.

    Raises CheckpointMismatch when the checkpoint is for another method or another base model."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {path}: train one with `python -m specdec_lib.train {method} "
                                f"--profile <profile>`")
    header = read_header(path)
    if header["method"] != method:
        raise CheckpointMismatch(f"{path.name} is a {header['method']} checkpoint, not {method}")
    fp = target_fingerprint(base_model)
    if header["base_fingerprint"] != fp:
        raise CheckpointMismatch(
            f"{path.name} was trained for another base model ({header.get('base_model')}, fingerprint "
            f"{header['base_fingerprint'][:12]}), not this one ({fp[:12]}): train one for this model with "
            f"`python -m specdec_lib.train {method} --profile <profile>`")
    raw = load_file(str(path))
    state = {}
    for name, t in raw.items():
        if name.endswith((SCALE_SUFFIX, GROUP_SUFFIX)):
            continue
        if name + SCALE_SUFFIX in raw:
            t = t.float() * raw[name + SCALE_SUFFIX][:, None]
        elif name + GROUP_SUFFIX in raw:
            t = dequantize_int4(t, raw[name + GROUP_SUFFIX])
        state[name] = t
    current = module.state_dict()
    missing = set(current) - set(state)
    unexpected = set(state) - set(current)
    if missing or unexpected:
        raise CheckpointMismatch(f"{path.name} does not fit this {method} module: missing {sorted(missing)[:4]}, "
                                 f"unexpected {sorted(unexpected)[:4]} (config in the header: {header['config']})")
    module.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()})
    return header


def ensure_checkpoint(method: str, models, **options) -> Path:
    """The checkpoint `build` loads by default: the committed one for real profiles; under `tiny`, one
    trained here in seconds (cached in the temp folder, keyed by method and options)."""
    if models.profile != "tiny":
        path = checkpoint_path(method, models.profile)
        if not path.exists():
            raise FileNotFoundError(f"no {method} checkpoint for the {models.profile!r} profile at {path}: "
                                    f"train it with `python -m specdec_lib.train {method} --profile {models.profile}`")
        return path
    key = hashlib.sha256(json.dumps([method, sorted(options.items())], default=str).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / "specdec_checkpoints" / f"{method}-tiny-{key}.safetensors"
    if not path.exists():
        from .train import train_method
        # subtle: callers may sit under torch.inference_mode (the live bench builds its proposers there),
        # where training cannot take a gradient
        with torch.inference_mode(False), torch.enable_grad():
            train_method(method, models, out=path, progress=False, **options)
    return path
