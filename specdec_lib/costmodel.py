"""When does speculation pay? The speedup model with measured cost curves (chapter 1).

A cost curve is the time of one forward with k new tokens after a realistic prefix, divided by
the time with k = 1: c(k) = t(k) / t(1). On a memory-bound machine c(k) stays near 1 for small k
(the weights are read once whatever k is), then grows once arithmetic starts to dominate.

With per-token acceptance a (independent draws) and draft length g:
    E[tokens per step] = (1 - a^(g+1)) / (1 - a)            (= g + 1 when a = 1)
    speedup            = E / (g * c_draft + c_verify(g + 1))
where c_draft is the draft's cost per proposed token in units of one target 1-token step.
a is the per-position acceptance (metrics.position_acceptance: accepted / tried), not accepted /
proposed, which is biased low for g >= 2: it equals (E - 1) / g (see accepted_over_proposed).
Stored curves: chapters/results/01_cost/<name>.json with fields k, relative_time (+ provenance).
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path

CURVES_DIR = Path(__file__).resolve().parent.parent / "chapters" / "results" / "01_cost"


def expected_tokens_per_step(a: float, g: int) -> float:
    """(1 - a^(g+1)) / (1 - a). Example: a = 0.8, g = 4 -> 3.3616."""
    if a >= 1.0:
        return g + 1.0
    return (1 - a ** (g + 1)) / (1 - a)


def accepted_over_proposed(a: float, g: int) -> float:
    """What accepted / proposed comes out as for independent acceptance a: (E - 1) / g.
    Example: a = 0.83, g = 8 -> 0.47 (while E = 4.78)."""
    return (expected_tokens_per_step(a, g) - 1) / g if g else 0.0


def acceptance_from_tau(tau: float, g: int) -> float:
    """The independent per-position a whose E[tokens per step] equals a measured tau (bisection).
    Example: tau = 3.3616, g = 4 -> 0.8. Useful when only request-level records were stored."""
    if not 1.0 <= tau <= g + 1:
        raise ValueError(f"tau must lie in [1, g + 1] = [1, {g + 1}], got {tau}")
    lo, hi = 0.0, 1.0
    for _ in range(60):   # E is increasing in a
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens_per_step(mid, g) < tau else (lo, mid)
    return (lo + hi) / 2


def expected_tokens_from_positions(per_position) -> float:
    """E[tokens per step] without assuming independence: 1 + sum_i prod_{j<=i} a_j.

    per_position = [a_1, ..., a_g] as measured (metrics.position_acceptance(...)["per_position"]);
    equal entries a give (1 - a^(g+1)) / (1 - a). A None (never tried) ends the product.
    """
    total, reach = 1.0, 1.0
    for a in per_position:
        if a is None:
            break
        reach *= a
        total += reach
    return total


def expected_tokens_over_depths(a, depth_counts: dict) -> float:
    """E[tokens per step] when drafts differ in depth (n-gram drafts are empty without a match,
    suffix trees vary): the average over steps of E for each step's depth d.

    a: the per-position acceptance (a float: independent positions) or the measured per-position
    rates [a_1, a_2, ...] (product form, expected_tokens_from_positions). depth_counts:
    {depth: steps} (metrics.position_acceptance(...)["depth_counts"]; JSON string keys are fine).
    Example: a = 0.5, half the steps depth 0 and half depth 2 -> (1 + 1.75) / 2 = 1.375.
    """
    total = sum(depth_counts.values())
    if not total:
        return 1.0
    out = 0.0
    for d, n in depth_counts.items():
        d = int(d)
        e = expected_tokens_from_positions(a[:d]) if isinstance(a, (list, tuple)) else \
            expected_tokens_per_step(a, d)
        out += n * e
    return out / total


def load_cost_curve(name: str, folder: Path = CURVES_DIR) -> dict:
    """A stored curve, e.g. 'cpu_small_target' or 'h200_7b_shapes_target'."""
    path = Path(folder) / f"{name}.json"
    if not path.exists():
        have = sorted(p.stem for p in Path(folder).glob("*.json"))
        raise FileNotFoundError(f"no cost curve {name!r} in {folder}; stored: {', '.join(have) or 'none'}")
    return json.loads(path.read_text())


def relative_cost(curve: dict, k: int) -> float:
    """c(k), linearly interpolated between measured k (and extrapolated from the last two)."""
    ks, ts = curve["k"], curve["relative_time"]
    if k <= ks[0]:
        return ts[0]
    i = bisect.bisect_left(ks, k)
    if i < len(ks) and ks[i] == k:
        return ts[i]
    i = min(max(i, 1), len(ks) - 1)
    k0, k1, t0, t1 = ks[i - 1], ks[i], ts[i - 1], ts[i]
    return t0 + (t1 - t0) * (k - k0) / (k1 - k0)


def predicted_speedup(a: float, g: int, target_curve: dict, draft_cost: float = 0.0) -> float:
    """Speedup over one-token decoding for per-position acceptance a, draft length g (draft_cost per
    drafted token). Feed it metrics.position_acceptance(steps)["a"], not accepted / proposed."""
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a is a probability, got {a}")
    return expected_tokens_per_step(a, g) / (g * draft_cost + relative_cost(target_curve, g + 1))


def replay_speedup(steps, target_curve: dict, propose_cost: float = 0.0) -> float:
    """Speedup implied by a sequence of steps [(tokens fed to the target, tokens emitted), ...].

    Each step costs c(tokens fed) + propose_cost, in units of one 1-token target step; the
    baseline pays 1 per emitted token. Used to turn an exact acceptance replay into a speedup.
    """
    emitted = sum(e for _, e in steps)
    cost = sum(relative_cost(target_curve, fed) + propose_cost for fed, _ in steps)
    return emitted / cost if cost else 0.0


def measure_forward_time(model, k: int, prefix_len: int, repeats: int = 3, cache=None,
                         run: dict | None = None) -> tuple[float, object]:
    """Median seconds of one forward of k new tokens after prefix_len cached tokens, and the cache.

    The cache is prefilled once; every timed forward writes the same k slots after the prefix,
    so the state is identical each time (nothing is accepted). Synchronises on a GPU.
    run: generate()'s fast-path arguments (experiments.fast_path: forward, cache, kv_len) to time
    the forward the chapters' timed loop runs, as generate calls it (inputs on the host, the
    mask kv_len wide, the run's own cache; a GraphRunner replays its graph on a GPU); its cache
    must hold prefix_len + the largest bucket. None or {} (a CPU): the model's eager forward.
    """
    import time
    import torch
    from .decoding import prefill
    from .tree import chain_inputs
    run = run or {}
    device = model.device
    forward, kv_len = run.get("forward") or model.forward, run.get("kv_len")
    inputs_on = device if "forward" not in run else "cpu"    # a custom forward moves them itself
    ids = torch.randint(0, 150000, (1, prefix_len + k), generator=torch.Generator().manual_seed(0))
    ids = ids.to(inputs_on)
    if "cache" in run:
        cache = run["cache"]
        if prefix_len + k > cache.max_len:
            raise ValueError(f"the fast path's cache has {cache.max_len} slots, too few for "
                             f"{prefix_len} cached + {k} new tokens: build it with a larger max_len")
    if cache is None or cache.length != prefix_len:
        cache = cache if "cache" in run else model.new_cache(prefix_len + 64 + 8)
        cache.rollback(0)
        with torch.inference_mode():
            prefill(model, ids[:, :prefix_len], cache, kv_len=kv_len, forward=forward, logits=False)
    pos, slots, mask = chain_inputs(prefix_len, k, kv_len, device=inputs_on)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):          # the first run is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            forward(ids[:, prefix_len:prefix_len + k], pos, cache, mask, slots)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2], cache


def measure_prefill_time(model, n_tokens: int, repeats: int = 2) -> float:
    """Best of `repeats` seconds of one prefill of n_tokens into a fresh cache: what a draft model
    pays when it first catches up on a context (no warm-up run: on a CPU one can take seconds)."""
    import time
    import torch
    from .decoding import prefill
    ids = torch.randint(0, 150000, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = model.new_cache(n_tokens)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill(model, ids, cache, logits=False)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return min(times)


def measure_cost_curve(model, ks=(1, 2, 4, 8, 16, 32, 64), prefix_len: int = 1024, repeats: int = 3,
                       progress: bool = True, run: dict | None = None) -> dict:
    """c(k) = t(k) / t(1) for a forward of k new tokens after prefix_len cached tokens.

    run: the chapter's fast path (experiments.fast_path), so that on a GPU the curve is the one
    its timed loop runs (CUDA-graph replays; bench_live.runner_curve times the bare replays); None
    or {} (what fast_path gives on a CPU): the eager forward. With a run, `forward` names its
    forward (e.g. "GraphRunner"); an eager curve has no such key.
    """
    from tqdm.auto import tqdm
    cache, times = None, []
    for k in tqdm(ks, desc="cost curve", disable=not progress):
        t, cache = measure_forward_time(model, k, prefix_len, repeats, cache, run)
        times.append(t)
    curve = {"k": list(ks), "time_s": times, "relative_time": [t / times[0] for t in times],
             "prefix_len": prefix_len}
    if run:
        curve["forward"] = type(run["forward"]).__name__
    return curve


# ---------------------------------------------------------------- backing off: how much to propose this step
def cost_list(curve, max_k: int) -> list[float]:
    """[c(1), ..., c(max_k)] from a stored curve's name, a curve dict (load_cost_curve), or a list
    of c(k) for k = 1, 2, ... (relative to one 1-token step, so c(1) = 1).

    Example: cost_list([1, 1.4, 1.5, 1.6], 3) -> [1, 1.4, 1.5]; cost_list("h200_small_target", 2)
    -> [1.0, 1.446...].
    """
    if isinstance(curve, str):
        try:
            curve = load_cost_curve(curve)
        except FileNotFoundError as e:         # a bad option value, not a missing file of ours
            raise ValueError(f"cost_curve: {e}") from None
    if isinstance(curve, dict):
        return [relative_cost(curve, k) for k in range(1, max_k + 1)]
    try:
        costs = [float(c) for c in curve]
    except (TypeError, ValueError):
        raise ValueError(f"cost_curve must be a stored curve's name, a curve dict or a list of c(k) for "
                         f"k = 1, 2, ...; got {curve!r}") from None
    if len(costs) < max_k:
        raise ValueError(f"cost_curve has c(k) for k = 1..{len(costs)} but this draft length needs k up to "
                         f"{max_k}: give more values, a stored curve, or a smaller draft_len")
    if abs(costs[0] - 1.0) > 1e-6 or not all(0 < c < float("inf") for c in costs):
        raise ValueError(f"cost_curve must list relative costs c(k) = t(k) / t(1) (c(1) = 1, all > 0), "
                         f"got {costs[:4]}...: divide measured times by the 1-token time")
    return costs[:max_k]


def best_prefix(gains, costs) -> int:
    """How many draft nodes to send: the k maximising gains[k] / costs[k].

    gains[k] = expected tokens emitted when the first k nodes are sent (gains[0] = 1: an empty
    draft is one ordinary decode step); costs[k] = c(k + 1), the verify forward over root + k nodes.
    Ties go to the smaller k: a longer draft must strictly beat a shorter one (so with no
    evidence of a gain, the step stays an ordinary decode step).
    Example: gains [1, 1.5, 1.75], costs [1, 1.2, 1.3] -> ratios 1, 1.25, 1.35 -> 2.
    """
    best, best_rate = 0, gains[0] / costs[0]
    for k in range(1, min(len(gains), len(costs))):
        rate = gains[k] / costs[k]
        if rate > best_rate + 1e-12:          # subtle: float noise must not break an exact tie
            best, best_rate = k, rate
    return best


def choose_draft_len(a: float, max_len: int, costs) -> int:
    """The chain length g in 0..max_len maximising E[tokens](g) / c(g + 1) for per-position
    acceptance a (expected_tokens_per_step). costs = [c(1), c(2), ...].

    Examples: a steep curve c(k) = k and a = 0.3 -> 0 (nothing pays: 1.3 / 2 < 1);
    a flat curve and a = 0.9 -> max_len; the CPU curve with c(2) < 1 -> at least 1 even for a = 0.
    """
    return best_prefix([expected_tokens_per_step(a, g) for g in range(max_len + 1)], costs)


class AcceptanceTally:
    """A running estimate of the per-position acceptance a, kept per bucket (e.g. an n-gram's match
    length), for proposers that pick their draft length from evidence.

    a(bucket) = (accepted + prior * weight) / (tried + weight): the prior guess counts as `weight`
    trials, so a few steps of evidence outweigh it (prior 1/2, weight 2 is Laplace's rule of
    succession). `tried` counts positions the verifier reached (accepted / proposed would be
    biased low; see accepted_over_proposed).
    Example: nothing seen, prior 0.5 -> 0.5; add(3, accepted=3, tried=4) -> (3 + 1) / (4 + 2) = 0.667.
    """

    def __init__(self, weight: float = 2.0):
        if not weight > 0:
            raise ValueError(f"the prior's weight (pseudo-trials) must be > 0, got {weight}")
        self.weight = weight
        self.counts: dict = {}                 # bucket -> [accepted, tried]

    def add(self, key, accepted: float, tried: float) -> None:
        c = self.counts.setdefault(key, [0.0, 0.0])
        c[0] += accepted
        c[1] += tried

    def estimate(self, key, prior: float = 0.5) -> float:
        accepted, tried = self.counts.get(key, (0.0, 0.0))
        return min(1.0, (accepted + prior * self.weight) / (tried + self.weight))
