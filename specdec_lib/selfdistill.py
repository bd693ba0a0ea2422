"""Training data for learned proposers, by self-distillation: the target writes its own answers.

A proposer is judged by how often it guesses what *this* target would say next, so it learns from
the target's own outputs, not from a data set written by people or another model.

1. Prompts, disjoint from every evaluation set (`check_disjoint` raises on an overlap):
   - the 300 UltraChat prompts of data/qwen25_7b_greedy/ultrachat_train300_greedy16.jsonl;
   - prompts the target writes itself (Magpie, arXiv 2406.08464): feed the chat template up to
     the user header, `<|im_start|>system ... <|im_start|>user\\n`, and sample: an instruct model
     writes a plausible user turn. We drop empty, duplicated, looping and unfinished ones.
2. Responses: the target's continuation of every prompt, greedy and sampled (T = 0.7 and 1.0),
   generated in large left-padded batches with our own forward (`sample_batch`).
3. Storage: token ids (uint32) with offsets, plus a manifest (sources, counts, seed, sha256).

    python -m specdec_lib.selfdistill --profile small          # on an H200: 2M response tokens, ~7 min
    python -m specdec_lib.selfdistill --profile tiny           # seconds, for tests

Under `tiny`, `load_data` builds a small set on the fly (cached in the temp folder).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import SYSTEM, chat_ids, grounded, qwen7b_greedy, spec_bench_turns
from .models import EOS_IDS, load_profile, machine_name, sha256
from .sampling import SamplingParams, probs_from_logits

IM_END = 151645
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "data" / "selfdistill"
# (source of responses, temperature): greedy and two sampling temperatures per prompt
RESPONSE_TEMPERATURES = (0.0, 0.7, 1.0)


@dataclass
class Sequence:
    prompt_ids: list[int]
    response_ids: list[int]
    source: str            # "ultrachat_train300" or "magpie"
    temperature: float     # 0.0 = greedy
    prompt_key: str        # sha256 of the prompt ids: the held-out split is by prompt


# ---------------------------------------------------------------- batched generation
def left_pad(prompts: list[list[int]], pad_id: int = 0):
    """Right-align prompts of different lengths. Returns ids [B, P], pos [B, P], pad [B].

    [[5, 6, 7], [8]] -> ids [[5, 6, 7], [0, 0, 8]], pos [[0, 1, 2], [0, 0, 0]], pad [0, 2]
    (a padding slot's position does not matter: nobody attends to it).
    """
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    pad = torch.tensor([P - len(p) for p in prompts])
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
    pos = (torch.arange(P)[None] - pad[:, None]).clamp_min(0)
    return ids, pos, pad


def padded_mask(pad: torch.Tensor, T: int, start: int, S: int) -> torch.Tensor:
    """[B, T, S] bool for T new tokens at slots start..start+T-1 of a left-padded batch.

    Row b's new token i sees slots pad[b] <= j <= start + i (causal, no padding). subtle: a padding
    query (start + i < pad[b]) would see nothing, and softmax over nothing is NaN; it sees itself.
    """
    q = start + torch.arange(T, device=pad.device)[:, None]      # [T, 1] slot of each new token
    j = torch.arange(S, device=pad.device)[None]                 # [1, S]
    causal = (j <= q)[None] & (j >= pad[:, None, None])          # [B, T, S]
    return causal | (j == q)[None]


@torch.no_grad()
def sample_batch(model, prompts: list[list[int]], max_new: int, temperature: float, generator: torch.Generator,
                 top_p: float = 1.0, stop_ids=EOS_IDS) -> list[list[int]]:
    """Continue every prompt with `model` (greedy at T = 0), one batch, stopping rows at a stop id.

    Returns the new tokens of each row, the stop token included when one was drawn.
    """
    dev = model.device
    ids, pos, pad = left_pad(prompts)
    B, P = ids.shape
    n = model.config.num_hidden_layers
    cache = model.new_cache(P + max_new, batch=B)
    params = SamplingParams(temperature, top_p)
    # prefill: only the last row's logits are needed, so ask for the final hidden state, not [B, P, V]
    _, h = model(ids.to(dev), pos.to(dev), cache, padded_mask(pad, P, 0, P).to(dev), torch.arange(P, device=dev),
                 hidden_layers=(n,), logits=False)
    logits = model.lm_head(h[n][:, -1])                          # [B, V]
    cache.length = P
    out = torch.zeros(B, max_new, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    stops = torch.tensor(list(stop_ids), device=dev)
    lengths = torch.full((B,), max_new, dtype=torch.long, device=dev)
    next_pos = pos[:, -1].to(dev) + 1                            # [B]
    pad_dev = pad.to(dev)
    for t in range(max_new):
        if params.greedy:
            nxt = logits.argmax(-1)
        else:
            probs = probs_from_logits(logits.float(), params)    # [B, V]
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        out[:, t] = nxt
        hit = torch.isin(nxt, stops) & ~done
        lengths = torch.where(hit, t + 1, lengths)
        done |= hit
        if t + 1 == max_new or (t % 16 == 15 and bool(done.all())):   # one host sync every 16 steps
            break
        S = cache.length + 1
        mask = padded_mask(pad_dev, 1, cache.length, S)
        logits, _ = model(nxt[:, None], next_pos[:, None], cache, mask, torch.tensor([cache.length], device=dev))
        logits = logits[:, 0]
        cache.length += 1
        next_pos += 1
    out, lengths = out.cpu(), lengths.cpu()
    return [out[b, :int(lengths[b])].tolist() for b in range(B)]


def length_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of similar length (sorted by length: little padding in a batch).

    [[1, 2, 3], [4], [5, 6]], batch_size 2 -> [[1, 2], [0]]
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def generate_all(model, prompts: list[list[int]], max_new: int, temperature: float, seed: int,
                 batch_size: int, desc: str = "", progress: bool = True, budget_s: float | None = None) -> list[list[int]]:
    """sample_batch over many prompts, sorted by length (less padding), results in input order.
    With `budget_s`, no new batch starts after that many seconds: the prompts left get no answer ([])."""
    from tqdm.auto import tqdm
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in prompts]
    t0 = time.time()
    for idx in tqdm(length_batches(prompts, batch_size), desc=desc, disable=not progress):
        if budget_s is not None and time.time() - t0 > budget_s:
            break
        for i, r in zip(idx, sample_batch(model, [prompts[i] for i in idx], max_new, temperature, gen)):
            out[i] = r
    return out


# ---------------------------------------------------------------- prompts, filters, overlap check
def magpie_prefix(tokenizer, system: str = SYSTEM) -> list[int]:
    """The chat template up to where the user's text starts."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    return tokenizer.encode(text, add_special_tokens=False)


def normalize(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def is_looping(text: str, n: int = 3, max_repeats: int = 4) -> bool:
    """True when some word n-gram occurs more than max_repeats times ("a b c a b c a b c ..." loops)."""
    words = normalize(text).split()
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        counts[g] = counts.get(g, 0) + 1
        if counts[g] > max_repeats:
            return True
    return False


def filter_magpie(raw: list[list[int]], tokenizer) -> tuple[list[str], dict]:
    """Keep finished (ended with <|im_end|>), non-empty, non-looping, new user turns. Returns texts, counts."""
    kept, seen = [], set()
    counts = dict(generated=len(raw), unfinished=0, empty=0, looping=0, duplicate=0)
    for r in raw:
        if not r or r[-1] != IM_END:
            counts["unfinished"] += 1
            continue
        text = tokenizer.decode(r[:-1], skip_special_tokens=True).strip()
        key = normalize(text)
        if len(key.split()) < 3:
            counts["empty"] += 1
        elif is_looping(text):
            counts["looping"] += 1
        elif key in seen:
            counts["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(text)
    counts["kept"] = len(kept)
    return kept, counts


def shingles(text: str, n: int = 8) -> set[tuple]:
    w = normalize(text).split()
    return {tuple(w[i:i + n]) for i in range(max(len(w) - n + 1, 1))} if w else set()


def evaluation_texts(tokenizer) -> list[str]:
    """Every prompt a chapter evaluates on: Spec-Bench (all turns), the 7B eval60 set, the grounded set."""
    texts = spec_bench_turns()
    texts += [p.text for p in qwen7b_greedy("eval60")]
    texts += [p.text for p in grounded(tokenizer)]
    return texts


def overlapping(train_texts: list[str], eval_texts: list[str], threshold: float = 0.5) -> list[int]:
    """Indices of training texts that overlap an evaluation text: the same normalized text, or at least
    `threshold` of the training text's word 8-grams found in the evaluation set's.

    overlapping(["Write a poem about the sea today please now"], ["write a poem about the sea today please now"]) -> [0]
    """
    exact = {normalize(t) for t in eval_texts}
    pool: set[tuple] = set()
    for t in eval_texts:
        pool |= shingles(t)
    bad = []
    for i, t in enumerate(train_texts):
        sh = shingles(t)
        if normalize(t) in exact or (sh and len(sh & pool) / len(sh) >= threshold):
            bad.append(i)
    return bad


def check_disjoint(train_texts: list[str], eval_texts: list[str]) -> None:
    """Raise ValueError if any training prompt overlaps an evaluation prompt."""
    bad = overlapping(train_texts, eval_texts)
    if bad:
        raise ValueError(f"{len(bad)} training prompts overlap an evaluation set (first: "
                         f"{train_texts[bad[0]][:80]!r}): remove them before training")


# ---------------------------------------------------------------- the data set
@dataclass
class SelfDistillData:
    sequences: list[Sequence]
    manifest: dict

    def split(self, name: str) -> list[Sequence]:
        """'train' or 'heldout': by prompt (every response to one prompt lands on the same side), the
        manifest's heldout_fraction of prompts held out, chosen by the prompt's hash."""
        if name not in ("train", "heldout"):
            raise ValueError(f"unknown split {name!r}: use 'train' or 'heldout'")
        cut = int(self.manifest.get("heldout_fraction", 0.05) * 2**32)
        held = [int(s.prompt_key[:8], 16) < cut for s in self.sequences]
        return [s for s, h in zip(self.sequences, held) if h == (name == "heldout")]

    def only(self, temperatures) -> "SelfDistillData":
        """The answers sampled at these temperatures (0.0 = greedy), e.g. to train a proposer for greedy
        decoding on the target's greedy answers alone. The split stays by prompt, as before."""
        t3 = lambda t: round(float(t), 3)      # noqa: E731 (stored as float32: 0.7 reads 0.699999988)
        keep = {t3(t) for t in temperatures}
        have = {t3(s.temperature) for s in self.sequences}
        if not keep & have:
            raise ValueError(f"no answers at temperatures {sorted(keep)}: the data has {sorted(have)}")
        return SelfDistillData([s for s in self.sequences if t3(s.temperature) in keep],
                               dict(self.manifest, only_temperatures=sorted(keep)))

    @property
    def response_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.sequences)


def prompt_key(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.uint32).tobytes()).hexdigest()


def save_data(folder, data: SelfDistillData) -> Path:
    """tokens.npz (all ids concatenated as uint32 + offsets) and manifest.json (with the npz's sha256)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seqs = data.sequences
    parts = [x for s in seqs for x in (s.prompt_ids, s.response_ids)]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    flat = np.concatenate([np.asarray(p, dtype=np.uint32) for p in parts]) if parts else np.zeros(0, np.uint32)
    sources = sorted({s.source for s in seqs})
    np.savez_compressed(folder / "tokens.npz", ids=flat, lengths=lengths,
                        source=np.array([sources.index(s.source) for s in seqs], dtype=np.int8),
                        temperature=np.array([s.temperature for s in seqs], dtype=np.float32))
    manifest = dict(data.manifest, sources=sources, sha256=sha256(folder / "tokens.npz"),
                    sequences=len(seqs), response_tokens=data.response_tokens)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return folder


def read_data(folder) -> SelfDistillData:
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if sha256(folder / "tokens.npz") != manifest["sha256"]:
        raise ValueError(f"{folder}/tokens.npz does not match its manifest's sha256: regenerate it "
                         f"(python -m specdec_lib.selfdistill --profile {manifest.get('profile', 'small')})")
    # Read each array out of the npz ONCE: every z["ids"] decompresses the whole array again, which for
    # 2M tokens and ~25k slices turned a one-second read into many minutes.
    with np.load(folder / "tokens.npz") as z:
        ids, lengths, source, temperature = (z[k] for k in ("ids", "lengths", "source", "temperature"))
    ends = np.cumsum(lengths)
    parts = [x.tolist() for x in np.split(ids.astype(np.int64), ends[:-1])] if len(lengths) else []
    seqs = []
    for i in range(len(parts) // 2):
        p, r = parts[2 * i], parts[2 * i + 1]
        seqs.append(Sequence(p, r, manifest["sources"][int(source[i])], float(temperature[i]), prompt_key(p)))
    return SelfDistillData(seqs, manifest)


def responses(model, prompts, sources, max_new, temperatures, seed, batch_size, budget_s=None,
              target_tokens=None, progress=True) -> tuple[list[Sequence], float]:
    """The target's response to every prompt at every temperature, batch by batch.

    Prompts are sorted by length (little padding inside a batch) and the batches visited in a shuffled
    order, every temperature of one batch before the next: stopped early by `budget_s` (seconds) or
    `target_tokens` (response tokens), the data still spans all lengths and temperatures.
    Returns (sequences, start time).
    """
    from tqdm.auto import tqdm
    batches = length_batches(prompts, batch_size)
    rng = np.random.default_rng(seed)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    gens = [torch.Generator(device=model.device).manual_seed(seed + 1 + j) for j in range(len(temperatures))]
    seqs, n_tok, t1 = [], 0, time.time()
    bar = tqdm(batches, desc="responses", disable=not progress)
    for idx in bar:
        if (budget_s is not None and time.time() - t1 > budget_s) or (target_tokens and n_tok >= target_tokens):
            break
        for temp, gen in zip(temperatures, gens):
            outs = sample_batch(model, [prompts[i] for i in idx], max_new, temp, gen)
            seqs += [Sequence(prompts[i], r, sources[i], float(temp), prompt_key(prompts[i]))
                     for i, r in zip(idx, outs) if r]
            n_tok += sum(len(r) for r in outs)
        bar.set_postfix(tokens=n_tok, tok_s=round(n_tok / (time.time() - t1)))
    return seqs, t1


def build_data(models, n_magpie: int = 4096, max_new: int = 384, max_prompt: int = 512, batch_size: int = 256,
               seed: int = 0, n_ultrachat: int | None = None, temperatures=RESPONSE_TEMPERATURES,
               heldout_fraction: float = 0.05, budget_s: float | None = None, target_tokens: int | None = None,
               magpie_budget_s: float | None = None, progress: bool = True) -> SelfDistillData:
    """Prompts (UltraChat train300 + Magpie), then the target's responses at every temperature
    (until `budget_s` seconds or `target_tokens` response tokens, when given: see `responses`; Magpie
    sampling stops starting new batches after `magpie_budget_s`)."""
    target, tok = models.target, models.tokenizer
    t0 = time.time()
    ultra = qwen7b_greedy("train300", n_ultrachat)
    ultra_prompts = [p.prompt_ids[-max_prompt:] for p in ultra]
    evals = evaluation_texts(tok)
    check_disjoint([p.text for p in ultra], evals)      # a fixed set: it must be clean as shipped

    magpie_texts, counts = [], dict(generated=0, kept=0)
    if n_magpie:
        prefix = magpie_prefix(tok)
        raw = generate_all(target, [prefix] * n_magpie, 160, 1.0, seed, batch_size, "magpie prompts", progress,
                           magpie_budget_s)
        raw = [r for r in raw if r]                                  # only the batches that ran
        magpie_texts, counts = filter_magpie(raw, tok)
        bad = set(overlapping(magpie_texts, evals))
        counts["overlap_eval"] = len(bad)
        magpie_texts = [t for i, t in enumerate(magpie_texts) if i not in bad]
        counts["kept"] = len(magpie_texts)
    magpie_prompts = [chat_ids(tok, t)[-max_prompt:] for t in magpie_texts]
    t_prompts = time.time() - t0

    prompts = ultra_prompts + magpie_prompts
    sources = ["ultrachat_train300"] * len(ultra_prompts) + ["magpie"] * len(magpie_prompts)
    seqs, t1 = responses(target, prompts, sources, max_new, temperatures, seed, batch_size, budget_s,
                         target_tokens, progress)
    gen_s = time.time() - t1
    data = SelfDistillData(seqs, {})
    data.manifest = dict(
        profile=models.profile, target=models.target_name, machine=machine_name(models.device),
        heldout_fraction=heldout_fraction,
        dtype=models.dtype, seed=seed, max_new=max_new, max_prompt=max_prompt, temperatures=list(temperatures),
        prompts={"ultrachat_train300": len(ultra_prompts), "magpie": len(magpie_prompts)}, magpie=counts,
        prompts_answered=len({s.prompt_key for s in seqs}), budget_s=budget_s, target_tokens=target_tokens,
        magpie_budget_s=magpie_budget_s,
        magpie_examples=magpie_texts[:5], response_tokens_by_source={
            s: sum(len(x.response_ids) for x in seqs if x.source == s) for s in set(sources)},
        prompt_seconds=round(t_prompts, 1), response_seconds=round(gen_s, 1),
        response_tokens_per_s=round(data.response_tokens / gen_s, 1) if gen_s else None,
        date=time.strftime("%Y-%m-%d"))
    return data


def data_dir(profile: str) -> Path:
    """Where load_data looks: data/selfdistill/<profile>/ (tiny: a cache in the temp folder)."""
    if profile == "tiny":
        return Path(tempfile.gettempdir()) / "specdec_selfdistill_tiny"
    return DEFAULT_DIR / profile


TINY_BUILD = dict(n_magpie=16, max_new=24, max_prompt=48, batch_size=16, n_ultrachat=24, temperatures=(0.0, 1.0),
                  heldout_fraction=0.25)


def load_data(models, path=None) -> SelfDistillData:
    """The self-distilled data for models.profile; under `tiny` it is built in seconds when missing."""
    folder = Path(path) if path else data_dir(models.profile)
    if not (folder / "manifest.json").exists():
        if models.profile != "tiny":
            raise FileNotFoundError(
                f"no self-distilled data in {folder}: generate it with `python -m specdec_lib.selfdistill "
                f"--profile {models.profile}` (a GPU: ~7 minutes on an H200), or pass path=")
        save_data(folder, build_data(models, progress=False, **TINY_BUILD))
    return read_data(folder)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--out", default=None, help="folder (default data/selfdistill/<profile>)")
    ap.add_argument("--magpie", type=int, default=9000, help="Magpie prompts to sample (before filtering)")
    ap.add_argument("--max-new", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop answering prompts after this many seconds (a cut that depends on the machine)")
    ap.add_argument("--target-tokens", type=int, default=2_000_000,
                    help="stop at this many response tokens (a deterministic cut; 0: answer every prompt)")
    ap.add_argument("--magpie-budget-s", type=float, default=None, help="stop sampling Magpie prompts after this")
    a = ap.parse_args(argv)
    models = load_profile(a.profile)
    kw = TINY_BUILD if models.profile == "tiny" else dict(n_magpie=a.magpie, max_new=a.max_new, batch_size=a.batch_size,
                                                            budget_s=a.budget_s, target_tokens=a.target_tokens,
                                                            magpie_budget_s=a.magpie_budget_s)
    data = build_data(models, seed=a.seed, **kw)
    folder = save_data(a.out or data_dir(models.profile), data)
    m = json.loads((folder / "manifest.json").read_text())
    print(json.dumps({k: m[k] for k in ("prompts", "magpie", "prompts_answered", "sequences", "response_tokens", "response_tokens_by_source",
                                        "response_seconds", "response_tokens_per_s", "machine")}, indent=1))
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
