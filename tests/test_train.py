"""The training foundation: self-distilled data, the one training loop, checkpoints (tiny, CPU)."""
import json

import pytest
import torch

from specdec_lib import checkpoint as ckpt
from specdec_lib.models import load_profile, TINY_TARGET
from specdec_lib.qwen2 import random_model
from specdec_lib.selfdistill import (Sequence, SelfDistillData, check_disjoint, evaluation_texts, left_pad,
                                     overlapping, padded_mask, prompt_key, read_data, sample_batch, save_data,
                                     is_looping)
from specdec_lib.train import Batch, TrainConfig, chunked_cross_entropy, steps_that_fit, to_batch, train


@pytest.fixture(scope="module")
def tiny():
    return load_profile("tiny")


class NextNextHead:
    """A toy learner: one Medusa-style head predicting token t + 2 from the target's last hidden state
    (over the first 256 ids only, which is where the toy data lives: it keeps the test fast)."""
    name = "toy"

    def __init__(self, target, vocab=256):
        self.target = target
        self.hidden_layers = (target.config.num_hidden_layers,)
        self.module = torch.nn.Linear(target.config.hidden_size, vocab, bias=False)
        torch.nn.init.zeros_(self.module.weight)

    def loss(self, batch: Batch, teacher):
        h = teacher.hidden[self.hidden_layers[0]][:, :-2]           # [B, T-2, H]
        y = batch.ids[:, 2:]
        keep = batch.response_mask[:, 2:]
        loss, c1, c5 = chunked_cross_entropy(h[keep], self.module.weight, y[keep], chunk=7)
        n = max(int(keep.sum()), 1)
        return loss / n, {"acc": [float(c1) / n], "top5": [float(c5) / n]}

    def header(self):
        return {"kind": "toy"}


def toy_data(n=48, length=24, vocab=40, seed=0):
    """Responses that count up: x, x+1, x+2, ... (mod vocab), so token t + 2 = token t + 2."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        x = int(torch.randint(0, vocab, (1,), generator=g))
        seq = [(x + j) % vocab + 100 for j in range(length)]
        seqs.append(Sequence(seq[:4], seq[4:], "toy", 0.0, prompt_key([i])))
    return SelfDistillData(seqs, {"heldout_fraction": 0.2, "sha256": "toy"})


def test_training_loop_learns_a_toy_task(tiny):
    learner = NextNextHead(tiny.target)
    cfg = TrainConfig(steps=80, batch_size=8, max_len=24, lr=0.05, warmup=5, eval_every=40, eval_batches=2)
    log = train(learner, tiny.target, toy_data(), cfg, progress=False)
    first, last = log["evals"][0], log["final"]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["acc"][0] > 0.9, last
    assert log["steps"][-1]["tokens"] > 0 and log["trainable_parameters"] == learner.module.weight.numel()


def test_steps_that_fit_a_budget_by_hand():
    # at step 20 after 30 s of a 100 s budget: 1 s a step, 2 s an evaluation every 10 steps -> 66 s
    # after the two closing evaluations, 1.2 s per step with its share of evaluations -> 55 more steps
    assert steps_that_fit(20, 30.0, 100.0, 1.0, 2.0, 10) == 75
    assert steps_that_fit(20, 99.0, 100.0, 1.0, 2.0, 10) == 21      # over budget: stop after this step


def test_time_budget_cuts_the_planned_steps(tiny):
    learner = NextNextHead(tiny.target)
    cfg = TrainConfig(steps=100000, batch_size=2, max_len=24, lr=0.05, warmup=5, eval_every=20, eval_batches=1,
                      time_budget_s=3.0)
    log = train(learner, tiny.target, toy_data(), cfg, progress=False)
    # (no timing asserted: the cut itself is the evidence; 100,000 steps would run for hours)
    assert log["steps_planned"] == 100000 and 14 <= log["config"]["steps"] < 100000


def test_chunked_cross_entropy_matches_plain():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(10, 6, generator=g, requires_grad=True), torch.randn(30, 6, generator=g)
    y = torch.randint(0, 30, (10,), generator=g)
    loss, c1, c5 = chunked_cross_entropy(h, w, y, chunk=3)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum")
    assert torch.allclose(loss, ref, atol=1e-5)
    loss.backward()
    g1 = h.grad.clone()
    h.grad = None
    ref.backward()
    assert torch.allclose(g1, h.grad, atol=1e-5)
    logits = h @ w.t()
    assert int(c1) == int((logits.argmax(-1) == y).sum())
    assert int(c5) == int((logits.topk(5, -1).indices == y[:, None]).any(-1).sum())


def test_to_batch_right_pads_and_marks_responses():
    b = to_batch([Sequence([1, 2, 3], [4, 5], "x", 0.0, "0" * 64), Sequence([7], [8], "x", 0.0, "1" * 64)], max_len=4)
    assert b.ids.tolist() == [[2, 3, 4, 5], [7, 8, 0, 0]]
    assert b.response_mask.tolist() == [[False, False, True, True], [False, True, False, False]]


def test_checkpoint_round_trip_is_exact_and_refuses_another_target(tiny, tmp_path):
    learner = NextNextHead(tiny.target)
    torch.nn.init.normal_(learner.module.weight)
    path = ckpt.save_checkpoint(tmp_path / "toy.safetensors", learner.module, method="toy", base_model=tiny.target,
                                config={"kind": "toy"}, data_sha256="abc", steps=3)
    other = NextNextHead(tiny.target)
    header = ckpt.load_checkpoint(path, other.module, method="toy", base_model=tiny.target)
    assert torch.equal(other.module.weight, learner.module.weight)
    assert header["steps"] == 3 and header["data_sha256"] == "abc" and header["config"] == {"kind": "toy"}
    another_target = random_model(TINY_TARGET, seed=5)
    with pytest.raises(ckpt.CheckpointMismatch, match="another base model"):
        ckpt.load_checkpoint(path, other.module, method="toy", base_model=another_target)
    with pytest.raises(ckpt.CheckpointMismatch, match="not medusa"):
        ckpt.load_checkpoint(path, other.module, method="medusa", base_model=tiny.target)


def test_int8_checkpoint_is_close_and_small(tiny, tmp_path):
    learner = NextNextHead(tiny.target)
    torch.nn.init.normal_(learner.module.weight)
    p32 = ckpt.save_checkpoint(tmp_path / "a.safetensors", learner.module, method="toy", base_model=tiny.target,
                               config={}, data_sha256=None, steps=1)
    p8 = ckpt.save_checkpoint(tmp_path / "b.safetensors", learner.module, method="toy", base_model=tiny.target,
                              config={}, data_sha256=None, steps=1, bits=8)
    assert p8.stat().st_size < 0.3 * p32.stat().st_size
    other = NextNextHead(tiny.target)
    ckpt.load_checkpoint(p8, other.module, method="toy", base_model=tiny.target)
    w, q = learner.module.weight, other.module.weight
    assert ((w - q).abs().amax(1) <= w.abs().amax(1) / 127 / 2 + 1e-6).all()   # half a step per row


def test_int4_packing_on_a_hand_made_row():
    # one row of 64: columns 0 and 1 share a byte (low nibble = column 0); the group's max |w| is 7 -> scale 1
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([-7.0, 3.0, 0.4, 7.0])
    packed, scale = ckpt.quantize_int4(w)
    assert packed.shape == (1, 32) and packed.dtype == torch.uint8 and scale.tolist() == [[1.0]]
    assert packed[0, 0] == (-7 + 8) | ((3 + 8) << 4) and packed[0, 1] == (0 + 8) | ((7 + 8) << 4)
    assert torch.equal(ckpt.dequantize_int4(packed, scale)[0, :4], torch.tensor([-7.0, 3.0, 0.0, 7.0]))


def test_int4_checkpoint_is_close_and_small(tiny, tmp_path):
    learner = NextNextHead(tiny.target)
    torch.nn.init.normal_(learner.module.weight)
    kw = dict(method="toy", base_model=tiny.target, config={}, data_sha256=None, steps=1)
    p8 = ckpt.save_checkpoint(tmp_path / "b.safetensors", learner.module, bits=8, **kw)
    p4 = ckpt.save_checkpoint(tmp_path / "c.safetensors", learner.module, bits=4, **kw)
    assert p4.stat().st_size < 0.6 * p8.stat().st_size
    assert ckpt.read_header(p4)["bits"] == 4
    other = NextNextHead(tiny.target)
    ckpt.load_checkpoint(p4, other.module, method="toy", base_model=tiny.target)
    w, q = learner.module.weight, other.module.weight
    R, C = w.shape
    step = w.view(R, C // 64, 64).abs().amax(2, keepdim=True) / 7          # one step per group of 64
    assert ((w - q).view(R, C // 64, 64).abs() <= step / 2 * 1.002 + 1e-6).all()   # half a step (+ fp16 scale)
    ckpt.update_header(p4, note="x")
    again = NextNextHead(tiny.target)
    ckpt.load_checkpoint(p4, again.module, method="toy", base_model=tiny.target)
    assert torch.equal(again.module.weight, q) and ckpt.read_header(p4)["note"] == "x"


def test_fingerprint_ignores_dtype(tiny):
    a = ckpt.target_fingerprint(tiny.target)
    b = ckpt.target_fingerprint(random_model(TINY_TARGET, seed=0, dtype=torch.bfloat16))
    assert a == b


def test_batched_generation_equals_generate_and_is_deterministic(tiny):
    from specdec_lib.decoding import generate
    from specdec_lib.methods import make_proposer
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 5000, (n,), generator=g).tolist() for n in (1, 9, 4)]
    greedy = sample_batch(tiny.target, prompts, 12, 0.0, torch.Generator().manual_seed(0))
    for p, out in zip(prompts, greedy):
        assert out == generate(tiny.target, make_proposer("baseline"), p, 12).tokens
    a = sample_batch(tiny.target, prompts, 12, 1.0, torch.Generator().manual_seed(7))
    b = sample_batch(tiny.target, prompts, 12, 1.0, torch.Generator().manual_seed(7))
    assert a == b


def test_padded_mask_and_left_pad():
    ids, pos, pad = left_pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and pad.tolist() == [0, 2] and pos[1, 2] == 0
    m = padded_mask(pad, 3, 0, 3)
    assert m[1].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert m[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_prompts_overlapping_an_evaluation_set_are_rejected(tiny):
    evals = evaluation_texts(tiny.tokenizer)
    assert overlapping([evals[3], "a brand new question about llamas and their wool"], evals) == [0]
    with pytest.raises(ValueError, match="overlap an evaluation set"):
        check_disjoint(["something else entirely here", evals[10] + " please"], evals)
    from specdec_lib.data import qwen7b_greedy
    check_disjoint([p.text for p in qwen7b_greedy("train300")], evals)   # the shipped training prompts are clean


def test_looping_filter():
    assert is_looping("go on and on and on and on and on and on and on and on and on")
    assert not is_looping("Write a function that returns the sum of a list.")


def test_data_round_trip(tmp_path):
    data = toy_data(n=5)
    data.manifest = {"profile": "tiny"}
    save_data(tmp_path, data)
    back = read_data(tmp_path)
    assert [(s.prompt_ids, s.response_ids) for s in back.sequences] == [(s.prompt_ids, s.response_ids)
                                                                         for s in data.sequences]
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["response_tokens"] == data.response_tokens and len(m["sha256"]) == 64
    (tmp_path / "tokens.npz").write_bytes((tmp_path / "tokens.npz").read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match="sha256"):
        read_data(tmp_path)


def test_only_some_temperatures():
    import numpy as np
    temps = [float(np.float32(t)) for t in (0.0, 0.7, 1.0, 0.0)]      # as read_data gives them back
    seqs = [Sequence([1, 2], [3, 4], "magpie", t, prompt_key([1, 2])) for t in temps]
    data = SelfDistillData(seqs, {"heldout_fraction": 0.0})
    greedy = data.only([0])
    assert [s.temperature for s in greedy.sequences] == [0.0, 0.0]
    assert len(data.only([0.7]).sequences) == 1
    assert greedy.manifest["only_temperatures"] == [0.0] and "only_temperatures" not in data.manifest
    with pytest.raises(ValueError, match="no answers at temperatures"):
        data.only([0.3])


def test_warm_start_continues_a_checkpoint(tiny, tmp_path):
    """train_method(init=...) starts from the stored weights: its first evaluation is the stored run's
    result, the log names what it continued, the checkpoint counts both runs' steps; other options refuse."""
    from specdec_lib.train import train_method
    cfg = dict(steps=6, eval_every=3)
    first = tmp_path / "m.safetensors"
    _, log1 = train_method("medusa", tiny, out=first, log_path=None, progress=False, config=cfg, bits=32)
    _, log2 = train_method("medusa", tiny, out=tmp_path / "m2.safetensors", log_path=None, progress=False,
                           config=cfg, bits=32, init=first)
    assert log2["init"]["checkpoint"] == "m.safetensors" and log2["init"]["steps"] == 6
    assert log2["evals"][0]["loss"] == pytest.approx(log1["evals"][-1]["loss"], rel=1e-4)
    assert ckpt.read_header(tmp_path / "m2.safetensors")["steps"] == 12
    with pytest.raises(ValueError, match="same --option"):                # same shapes, other options
        train_method("medusa", tiny, progress=False, config=cfg, init=first, loss_decay=0.5)
    with pytest.raises(ValueError, match="does not fit"):                  # other shapes
        train_method("medusa", tiny, progress=False, config=cfg, init=first, heads=2)
