"""N-gram prompt lookup: exact toy cases, index == naive scan, greedy output == baseline."""
import random

import pytest
import torch

from specdec_lib.decoding import Context, generate
from specdec_lib.methods import make_proposer
from specdec_lib.methods.ngram import NgramIndex, scan_frequent, scan_recent
from specdec_lib.models import EOS_IDS
from specdec_lib.replay import replay_greedy
from specdec_lib.sampling import SamplingParams

EOS = 99


def propose(tokens, g=4, **options):
    p = make_proposer("ngram", draft_len=g, eos_ids=(EOS,), **options)
    p.reset(tokens)
    ctx = Context(list(tokens), len(tokens), max_draft=64, params=SamplingParams(0.0), generator=None)
    return p.propose(ctx).tokens.tolist()


# ---------------------------------------------------------------- exact toy cases
@pytest.mark.parametrize("lookup", ["index", "scan"])
def test_a_match(lookup):
    # tail (5, 6) occurred at 0..1, followed by 7, 8, 5, 6
    assert propose([5, 6, 7, 8, 5, 6], g=3, max_n=2, lookup=lookup) == [7, 8, 5]


@pytest.mark.parametrize("lookup", ["index", "scan"])
def test_longest_n_wins_then_most_recent(lookup):
    # (3, 1) -> 4 at 1..2 ; 1 alone is most recently followed by 2 (at 5) -> the 2-gram wins
    assert propose([3, 1, 4, 0, 1, 2, 3, 1], g=1, max_n=2, lookup=lookup) == [4]
    assert propose([3, 1, 4, 0, 1, 2, 3, 1], g=1, max_n=1, lookup=lookup) == [2]


@pytest.mark.parametrize("lookup", ["index", "scan"])
def test_no_match_gives_an_empty_draft(lookup):
    assert propose([1, 2, 3, 4], max_n=3, lookup=lookup) == []
    assert propose([7], max_n=3, lookup=lookup) == []
    assert propose([1, 2, 3, 1, 5], max_n=3, min_n=2, lookup=lookup) == []   # only a 1-gram matches


@pytest.mark.parametrize("lookup", ["index", "scan"])
def test_overlapping_match_continues_the_loop(lookup):
    # tail (1, 2) last seen at 2..3; its continuation runs past the end into the draft itself
    assert propose([1, 2, 1, 2, 1, 2], g=5, max_n=2, lookup=lookup) == [1, 2, 1, 2, 1]
    assert propose([4, 4, 4], g=3, max_n=2, lookup=lookup) == [4, 4, 4]


@pytest.mark.parametrize("lookup", ["index", "scan"])
def test_draft_stops_after_eos(lookup):
    assert propose([5, 6, EOS, 7, 8, 5, 6], g=4, max_n=2, lookup=lookup) == [EOS]


@pytest.mark.parametrize("lookup", ["index", "scan"])
def test_most_frequent_continuation(lookup):
    seq = [1, 2, 9, 1, 2, 9, 1, 2, 7, 1, 2]
    assert propose(seq, g=1, max_n=2, lookup=lookup) == [7]                      # most recent
    assert propose(seq, g=1, max_n=2, policy="frequent", lookup=lookup) == [9]   # 9 twice, 7 once


def test_index_contents_match_the_docstring():
    idx = NgramIndex(max_n=2, min_n=1)
    idx.extend([1, 2, 1])
    assert idx.recent == {1: {(1,): 1, (2,): 2}, 2: {(1, 2): 2}}
    assert idx.counts[1][(1,)] == {2: [1, 1]}


def test_adaptive_draft_length_grows_and_shrinks():
    p = make_proposer("ngram", draft_len=2, max_n=1, adaptive=True, max_draft_len=4)
    tokens = [1, 2, 3, 4, 5, 6, 1]
    p.reset(tokens)
    ctx = lambda: Context(tokens, 7, 64, SamplingParams(0.0), None)
    assert p.propose(ctx()).tokens.tolist() == [2, 3]
    tokens += [2, 3, 4]                       # both accepted + bonus 4 -> g = 3
    assert p.propose(ctx()).tokens.tolist() == [5, 6, 1]
    tokens += [9]                             # nothing accepted -> g = 2
    assert p.propose(ctx()).tokens.tolist() == [] and p.g == 2


@pytest.mark.parametrize("bad", [dict(draft_len=0), dict(max_n=1, min_n=2), dict(min_n=0),
                                 dict(policy="longest"), dict(lookup="suffix"),
                                 dict(draft_len=4, max_draft_len=2)])
def test_bad_options(bad):
    with pytest.raises(ValueError):
        make_proposer("ngram", **bad)


# ---------------------------------------------------------------- index == naive scan
@pytest.mark.parametrize("policy", ["recent", "frequent"])
@pytest.mark.parametrize("max_n,min_n", [(1, 1), (3, 1), (4, 2)])
def test_index_equals_naive_scan_on_random_sequences(policy, max_n, min_n):
    rng = random.Random(max_n * 10 + min_n)
    scan = scan_recent if policy == "recent" else scan_frequent
    for trial in range(30):
        vocab = rng.choice([3, 5, 20])           # small vocabularies: many (overlapping) matches
        seq = [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
        idx = NgramIndex(max_n, min_n, eos=(0,))
        done = 0
        while done < len(seq):                   # grow the index in uneven chunks, as decoding does
            done = min(len(seq), done + rng.randrange(1, 6))
            idx.extend(seq[len(idx.tokens):done])
            g = rng.randrange(1, 8)
            assert idx.propose(g, policy) == scan(seq[:done], g, max_n, min_n, eos=(0,)), (seq[:done], g)


# ---------------------------------------------------------------- through the decode loop
class PlusOne:
    """A toy target whose greedy next token is always (x + 1) mod V: exact answers by hand."""
    V = 16
    device = torch.device("cpu")

    class Cache:            # what the loop needs of a KV cache: a length, rollback, keep
        def __init__(self, max_len):
            self.length, self.max_len = 0, max_len

        def rollback(self, length):
            self.length = length

        def keep(self, start, rows):
            self.length = start + len(rows)

    def new_cache(self, max_len):
        return self.Cache(max_len)

    def forward(self, ids, pos, cache, mask, slots, hidden_layers=(), **kw):
        logits = torch.nn.functional.one_hot((ids + 1) % self.V, self.V).float()
        return logits, {}


def test_plus_one_target_exact_steps_and_eos_inside_a_draft():
    # prompt 0..5 then 0, 1, 2: the lookup proposes 3, 4, 5, 0; the target wants 3, 4, 5, 6
    prompt = [0, 1, 2, 3, 4, 5, 0, 1, 2]
    ng = make_proposer("ngram", draft_len=4, max_n=3)
    out = generate(PlusOne(), ng, prompt, 6)
    assert out.tokens == [3, 4, 5, 6, 7, 8]
    assert [(s.proposed, s.accepted, s.emitted) for s in out.steps][0] == (4, 3, 4)
    # declare 4 to be EOS: it is accepted inside the draft and the output stops right after it
    out = generate(PlusOne(), make_proposer("ngram", draft_len=4, max_n=3), prompt, 6, eos_ids=[4])
    assert out.tokens == [3, 4] and out.stop_reason == "eos" and out.record.steps == 1


def test_replay_matches_the_decode_loop():
    prompt = [0, 1, 2, 3, 4, 5, 0, 1, 2, 9, 10, 11, 12, 3, 4]
    out = generate(PlusOne(), make_proposer("ngram", draft_len=3, max_n=2), prompt, 12)
    steps = replay_greedy(make_proposer("ngram", draft_len=3, max_n=2), prompt, out.tokens, EOS_IDS)
    assert steps == [(s.proposed, s.accepted, s.emitted) for s in out.steps]


@pytest.fixture(scope="module")
def quoting_prompts(tiny_target, tiny_prompts):
    """Prompts that quote the tiny model's own output (so lookups hit), with their greedy continuations."""
    base = make_proposer("baseline")
    out = []
    for p in tiny_prompts[1:] + [tiny_prompts[1] * 3]:
        first = generate(tiny_target, base, p, 12).tokens
        prompt = p + first[:10] + p + first[:3]
        out.append((prompt, generate(tiny_target, base, prompt, 16).tokens))
    return out


@pytest.mark.parametrize("options", [dict(draft_len=3), dict(draft_len=5, max_n=4, policy="frequent"),
                                     dict(draft_len=2, adaptive=True)])
def test_greedy_equals_baseline_on_tiny_target(tiny_target, quoting_prompts, options):
    proposed = accepted = 0
    for prompt, ref in quoting_prompts:
        out = generate(tiny_target, make_proposer("ngram", **options), prompt, 16)
        assert out.tokens == ref
        proposed += out.record.proposed
        accepted += out.record.accepted
    assert proposed > 0


def test_index_memory_is_bounded_by_the_request():
    """The index holds one entry per (n, position) of the current request, at most, and is rebuilt
    at every reset: nothing accumulates over requests."""
    rng = random.Random(0)
    prop = make_proposer("ngram", draft_len=4, max_n=3, min_n=1)
    for _ in range(100):
        tokens = [rng.randrange(8) for _ in range(rng.randrange(2, 200))]
        prop.reset(tokens[:1])
        prop.propose(Context(tokens, 1, 64, SamplingParams(0.0), None))
        idx, n_sizes = prop.index, prop.max_n - prop.min_n + 1
        assert idx.tokens == tokens
        assert sum(len(t) for t in idx.recent.values()) <= n_sizes * len(tokens)
        assert sum(len(c) for t in idx.counts.values() for c in t.values()) <= n_sizes * len(tokens)
    prop.reset([1])
    assert prop.index.tokens == [] and not any(prop.index.recent.values())
