"""Issue 5.3: under torch.distributed (llm-compressor's distributed mode splits calibration samples across ranks)
the rounding parameters' gradients are all-reduced, so every rank writes identical parameters. CPU, gloo, 2
processes."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _setup(samples_seed: int):
    """A linearized tiny Qwen3-MoE (the same weights on every rank), its first block, the next block, W4A16
    targets and this rank's calibration inputs."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modeling.moe.linearize import linearize_moe

    from routealign.tiny import tiny_model
    from routealign.streams import BlockInputs

    model = tiny_model("qwen3_moe", seed=2)
    linearize_moe(model)
    block, nxt = model.model.layers[0], model.model.layers[1]
    args = preset_name_to_scheme("W4A16", ["Linear"]).weights
    targets = {n: args for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(samples_seed))
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        q = BlockInputs(h, {"position_embeddings": model.model.rotary_emb(h, torch.arange(16)[None]),
                            "attention_mask": None})
    return block, nxt, targets, q


def _on_two_ranks(tmp_path, target, *args) -> None:
    """``target(rank, 2, init, tmp_path/rank{r}.pt, *args)`` in two spawned processes (gloo), both exiting 0."""
    init = f"file://{tmp_path / 'rendezvous'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, 2, init, str(tmp_path / f"rank{r}.pt"), *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]


def _save(block, result, out: str) -> None:
    """Write the tuned block and save its state and training losses to ``out``."""
    result.write()
    torch.save({"state": {k: v.clone() for k, v in block.state_dict().items()}, "history": result.history}, out)


def _tune(rank: int, world: int, init: str, out: str, balance: str = "grad_norm") -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from routealign.distributed import suspended_offloading
    from routealign.modifiers.rounding import BlockTuner, TuningConfig

    block, nxt, targets, q = _setup(100 + rank)  # this rank's samples
    # as the modifier does it: tune with offloading suspended, write through compressed-tensors' offload caches
    # (linearized experts are offloaded; under torch.distributed their storage is shared by the ranks)
    with suspended_offloading(block, nxt):
        tuner = BlockTuner(block, targets,
                           TuningConfig(objective="vsraq", iters=6, lr=0.02, batch_size=2, router_scope="next", rounding={"min_expert_tokens": 0},
                                        loss={"balance": balance}),
                           nxt)
        result = tuner.tune(q, q)
    _save(block, result, out)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("balance", ["grad_norm", "output"])
def test_ranks_write_identical_parameters(tmp_path, balance):
    _on_two_ranks(tmp_path, _tune, balance)
    _tune(0, 1, "", str(tmp_path / "alone.pt"), balance)  # rank 0's samples without the reduction
    r0, r1, alone = (torch.load(tmp_path / f, weights_only=False) for f in ("rank0.pt", "rank1.pt", "alone.pt"))
    assert r0["history"] == r1["history"]  # the same global loss, so the same best iteration
    for run in (r0, alone):  # tuning moved away from RTN, so the last assertion tests the reduction
        assert min(range(6), key=run["history"].__getitem__) > 0, run["history"]
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    changed = [k for k in r0["state"] if not torch.equal(r0["state"][k], alone["state"][k])]
    assert any(k.endswith(".weight") for k in changed)  # the other rank's gradients did count


def _tune_split(rank: int, world: int, init: str, out: str, balance: str) -> None:
    """Tuning on 8 calibration sequences: with ``world`` 2 each rank holds 4 of them (``offset``, ``total``), with
    ``world`` 1 one process holds all 8."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from routealign.distributed import suspended_offloading
    from routealign.modifiers.rounding import BlockTuner, TuningConfig
    from routealign.streams import BlockInputs

    block, nxt, targets, q0 = _setup(100)
    _, _, _, q1 = _setup(101)
    if world == 1:
        q = BlockInputs(torch.cat([q0.hidden, q1.hidden]), q0.kwargs)
    else:
        q = (q0, q1)[rank]
    with suspended_offloading(block, nxt):
        tuner = BlockTuner(block, targets,
                           TuningConfig(objective="vsraq", iters=6, lr=0.02, batch_size=4, router_scope="next", holdout=0.25,
                                        rounding={"min_expert_tokens": 0}, gate={"enabled": False},
                                        loss={"balance": balance}), nxt)
        result = tuner.tune(q, q, offset=4 * rank if world > 1 else 0, total=8)
    _save(block, result, out)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("balance", ["grad_norm", "output"])
def test_two_ranks_take_the_steps_of_one_process_holding_both_halves(tmp_path, balance):
    """What the ranks sum (losses, gradients, the norms the router term is balanced with) is what one process
    computes on the whole set: the same losses, and the same written weights up to float summation order."""
    _on_two_ranks(tmp_path, _tune_split, balance)
    _tune_split(0, 1, "", str(tmp_path / "one.pt"), balance)
    r0, one = (torch.load(tmp_path / f, weights_only=False) for f in ("rank0.pt", "one.pt"))
    assert r0["history"] == pytest.approx(one["history"], rel=1e-5)
    weights = [k for k in one["state"] if k.endswith(".weight") and not k.endswith("norm.weight")]
    same = sum(int((r0["state"][k] == one["state"][k]).sum()) for k in weights)
    total = sum(one["state"][k].numel() for k in weights)
    assert same / total > 0.999, same / total


def test_written_result_does_not_reread_the_module():
    """Under torch.distributed another rank may write its (identical) result into storage the ranks share before
    this rank computes its own; the written weights must come from the weights as tuning found them."""
    from routealign.distributed import suspended_offloading
    from routealign.modifiers.rounding import BlockTuner, TuningConfig
    from routealign.modifiers.rounding.weights import quantized_writes

    torch.manual_seed(0)
    block, nxt, targets, q = _setup(100)
    with suspended_offloading(block, nxt):
        tuner = BlockTuner(block, targets,
                           TuningConfig(objective="vsraq", iters=3, lr=0.02, batch_size=2, rounding={"min_expert_tokens": 0}), nxt)
        result = tuner.tune(q, q)
        with torch.no_grad():  # what another rank's earlier write looks like from here: every module, every expert
            clobbered = [m for w in tuner.weights for m in w.modules]
            for m in clobbered:
                m.weight.mul_(0.5)
        assert sum(".experts." in n for n, m in block.named_modules() if m in set(clobbered)) == 8 * 3
        again = [item for w in tuner.weights for item in quantized_writes(w, w.name)]
    assert len(again) == len(result.writes) > 10
    for (m0, n0, v0), (m1, n1, v1) in zip(result.writes, again):
        assert m0 is m1 and n0 == n1
        assert torch.equal(v0, v1), n0
    written = [(m, v) for m, n, v in again if n == "weight"]
    assert all(not torch.equal(v, m.weight) for m, v in written)  # the clobber is visible in every module


def _counts_and_maxima(rank: int, world: int, init: str, out: str) -> None:
    """This rank's routed-token counts, the starved-expert fallback tuning decides on, and the largest expert inputs
    the runner measures, with (world 2) or without (world 1) the reductions."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from routealign.modifiers.rounding import BlockTuner, TuningConfig

    block, nxt, targets, q = _setup(100 + rank)
    tuner = BlockTuner(block, targets,
                       TuningConfig(objective="none", iters=0, rounding={"min_expert_tokens": 24}), nxt)
    experts = [n for n in targets if ".experts." in n and n.endswith("gate_proj")]
    result = tuner.tune(q, q)
    torch.save({"counts": tuner.expert_token_counts(q), "fallback": result.fallback,
                "amax": tuner.runner.routed_input_amax(q, experts)}, out)
    if world > 1:
        dist.destroy_process_group()


def _expert(weight: str) -> int:
    return int(weight.split(".experts.")[1].split(".")[0])


def test_routed_token_counts_and_expert_input_maxima_are_reduced_over_ranks(tmp_path):
    """The starved-expert fallback is decided on the routed-token counts summed over ranks, and the expert input
    maxima (NVFP4 input global scales) are the maxima over ranks: every rank decides and writes the same."""
    _on_two_ranks(tmp_path, _counts_and_maxima)
    for r in range(2):
        _counts_and_maxima(r, 1, "", str(tmp_path / f"alone{r}.pt"))
    r0, r1, a0, a1 = (torch.load(tmp_path / f"{f}.pt", weights_only=False)
                      for f in ("rank0", "rank1", "alone0", "alone1"))
    (layer,) = a0["counts"]
    total = a0["counts"][layer] + a1["counts"][layer]
    starved = {e for e in range(total.numel()) if int(total[e]) < 24}
    for run in (r0, r1):
        assert {_expert(name) for name in run["fallback"]} == starved
        assert all(count == int(total[_expert(name)]) for name, count in run["fallback"].items())
    alone_fallen = {_expert(name) for name in a0["fallback"]}
    assert alone_fallen != starved  # rank 0's samples alone would decide otherwise: the test sees the reduction
    assert r0["amax"].keys() == r1["amax"].keys() == a0["amax"].keys() | a1["amax"].keys()
    for name in r0["amax"]:
        expected = max(float(a[name]) for a in (a0["amax"], a1["amax"]) if name in a)
        assert float(r0["amax"][name]) == float(r1["amax"][name]) == expected, name
    assert any(float(a0["amax"].get(n, 0)) != float(r0["amax"][n]) for n in r0["amax"])
