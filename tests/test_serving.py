"""The serving view (specdec_lib/serving.py): its timing loop on a tiny model, its analysis on exact curves."""
import pytest
import torch

from specdec_lib.models import TINY_TARGET
from specdec_lib.qwen2 import random_model
from specdec_lib.serving import (batch_inputs, best_draft_len, cost_curve_at, measure_batch_costs, main,
                                 speedup_at, tokens_per_s)


def synthetic(batches=(1, 64), ks=(1, 2, 3, 4, 5, 8)):
    """B = 1 memory-bound (t = 1 for every k); B = 64 compute-bound (t = k)."""
    return {"batch": list(batches), "k": list(ks),
            "time_s": [[1.0 for k in ks], [float(k) for k in ks]], "prefix_len": 16}


def test_analysis_exact():
    c = synthetic()
    assert speedup_at(c, 1, 0.8, 4) == pytest.approx(3.3616)          # E(0.8, 4) / c(5) = 3.3616 / 1
    assert speedup_at(c, 64, 0.8, 4) == pytest.approx(3.3616 / 5)     # compute-bound: speculation loses
    assert best_draft_len(c, 64, 0.8) == (0, 1.0)                     # ... so the best draft is none
    g, s = best_draft_len(c, 1, 0.8)
    assert g == 7 and s == pytest.approx((1 - 0.8 ** 8) / 0.2)        # longest g the curve covers
    assert cost_curve_at(c, 64)["relative_time"] == [1, 2, 3, 4, 5, 8]
    assert tokens_per_s(c)[1] == [64.0] * 6
    with pytest.raises(ValueError, match="not measured"):
        cost_curve_at(c, 8)
    with pytest.raises(ValueError, match="past the largest"):
        speedup_at(c, 1, 0.8, 8)


def test_batched_rows_match_single_rows():
    model = random_model(TINY_TARGET, seed=0)
    ids, pos, slots, mask = batch_inputs(6, 2, 3, TINY_TARGET.vocab_size)
    assert ids.shape == pos.shape == (2, 3) and mask.shape == (3, 9) and pos[1].tolist() == [6, 7, 8]
    prefix = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    from specdec_lib.tree import chain_inputs
    p0, s0, m0 = chain_inputs(0, 6)
    cache = model.new_cache(9, batch=2)
    model(prefix, p0.expand(2, 6), cache, m0, s0, logits=False)
    both, _ = model(ids, pos, cache, mask, slots)
    for b in range(2):
        one = model.new_cache(9)
        model(prefix[b:b + 1], p0, one, m0, s0, logits=False)
        alone, _ = model(ids[b:b + 1], pos[b:b + 1], one, mask, slots)
        torch.testing.assert_close(both[b], alone[0], atol=1e-4, rtol=1e-4)


def test_measure_and_cli(tmp_path):
    model = random_model(TINY_TARGET, seed=0)
    c = measure_batch_costs(model, (1, 2), (1, 2), prefix_len=8, reps=1, progress=False)
    assert c["batch"] == [1, 2] and c["k"] == [1, 2] and len(c["time_s"]) == 2 and len(c["time_s"][0]) == 2
    assert all(t > 0 for row in c["time_s"] for t in row)
    with pytest.raises(ValueError, match="positive"):
        measure_batch_costs(model, (), (1,), prefix_len=8)
    main(["--device", "cpu", "--shapes", "tiny", "--batches", "1,2", "--ks", "1,2,3", "--prefix", "8",
          "--reps", "1", "--out", str(tmp_path)])
    from specdec_lib.metrics import read_json
    out = read_json(tmp_path / "batch_costs_cpu_tiny.json")
    assert {"machine", "dtype", "model", "date", "torch", "timer", "prefix_len"} <= set(out)
    assert out["device"] == "cpu" and out["prefix_len"] == 8
