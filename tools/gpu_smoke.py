"""Quick GPU check before timing: graph-replayed loop == eager loop (tiny random model, float32 and bf16)."""
import torch

from specdec_lib.cuda_graphs import GraphRunner, GreedyChain
from specdec_lib.decoding import generate
from specdec_lib.methods import make_proposer
from specdec_lib.models import TINY_TARGET
from specdec_lib.qwen2 import random_model

for dtype in (torch.float32, torch.bfloat16):
    model = random_model(TINY_TARGET, seed=0, dtype=dtype, device="cuda")
    prompt = list(range(1000, 1100))
    ref = generate(model, make_proposer("baseline"), prompt, 40).tokens
    runner = GraphRunner(model, 256).capture()
    run = dict(forward=runner, kv_len=256, cache=runner.cache)
    same = generate(model, make_proposer("baseline"), prompt, 40, **run).tokens == ref
    cont = {tuple(prompt): ref}
    tree = make_proposer("oracle", continuations=cont, draft_len=4, error_rate=0.3, branches=3, seed=1)
    same_tree = generate(model, tree, prompt, 40, **run).tokens == ref
    print(dtype, "graph == eager:", same, "| noisy tree oracle through graphs == eager baseline:", same_tree)

# torch.compile'd blocks inside the graphs: same tokens
model = random_model(TINY_TARGET, seed=0, dtype=torch.float32, device="cuda")
prompt = list(range(1000, 1100))
ref = generate(model, make_proposer("baseline"), prompt, 40).tokens
runner = GraphRunner(model, 256, compile=True).capture()
run = dict(forward=runner, kv_len=256, cache=runner.cache)
tree = make_proposer("oracle", continuations={tuple(prompt): ref}, draft_len=4, error_rate=0.3, branches=3, seed=1)
print("compiled graphs == eager:", generate(model, make_proposer("baseline"), prompt, 40, **run).tokens == ref,
      "| tree:", generate(model, tree, prompt, 40, **run).tokens == ref)

# fused Triton kernels (float32: exact-path comparison) and the device-fed chain: same tokens
runner = GraphRunner(model, 256, compile=True, fused=True).capture()
run = dict(forward=runner, kv_len=256, cache=runner.cache)
chain = GreedyChain(runner.step_forward(1), runner.cache, "cuda").capture()
print("fused graphs == eager:", generate(model, make_proposer("baseline"), prompt, 40, **run).tokens == ref,
      "| tree:", generate(model, tree, prompt, 40, **run).tokens == ref,
      "| device-fed chain:", chain.generate(model, prompt, 40).tokens == ref, "| variants:", runner.variant)
