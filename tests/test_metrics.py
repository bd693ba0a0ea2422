"""The metrics schema: derived fields, summaries, JSON/JSONL round trips."""
import pytest

from specdec_lib.metrics import (StepRecord, check_summary, read_jsonl, request_record, summarize,
                                 write_jsonl, SUMMARY_FIELDS)


def steps():
    return [StepRecord(4, 4, 5, 0.1, 0.2, 0.3), StepRecord(4, 1, 2, 0.1, 0.2, 0.3), StepRecord(4, 0, 1, 0.1, 0.2, 0.3)]


def test_derived_fields():
    r = request_record("x", 0, 10, steps(), prefill_s=0.1, wall_s=1.0)
    assert (r.new_tokens, r.steps, r.proposed, r.accepted) == (8, 3, 12, 5)
    assert r.acceptance_rate == pytest.approx(5 / 12)
    assert r.mean_accepted_len == pytest.approx(8 / 3)
    assert r.tokens_per_s == pytest.approx(8.0)


def test_summary_schema_and_jsonl(tmp_path):
    recs = [request_record("x", i, 10, steps(), 0.1, 2.0) for i in range(3)]
    write_jsonl(tmp_path / "r.jsonl", recs)
    back = read_jsonl(tmp_path / "r.jsonl")
    assert back[0]["mean_accepted_len"] == pytest.approx(8 / 3) and len(back) == 3
    s = summarize(recs, method="x", profile="tiny", model="m", device="cpu", dtype="float32", prompt_set="p",
                  draft_len=4, temperature=0.0, baseline_tokens_per_s=2.0, speedup=2.0)
    check_summary(s)
    assert s["tokens_per_s"] == pytest.approx(24 / 6)
    with pytest.raises(ValueError, match="missing 'speedup'"):
        check_summary({k: v for k, v in s.items() if k != "speedup"})
    assert set(SUMMARY_FIELDS) <= set(s)
