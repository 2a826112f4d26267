"""Held-out calibration sequences choose the iteration kept and whether the router term is used in a block; the
next router downstream is found past layers without one (Nemotron-H)."""

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import AutoModelForCausalLM

import routealign  # noqa: F401
from routealign import RouterAlignedRoundingModifier
from routealign.streams import BlockInputs, StreamEngine
from routealign.tiny import save_tiny, tiny_model
from routealign.distributed import suspended_offloading
from routealign.modifiers.rounding.heldout import mean_of
from routealign.modifiers.rounding import BlockTuner, RouterDecision, TuningConfig

from .conftest import calibration_ids


def _setup(model_type="qwen3_moe", rows=8, seq_len=24, seed=4):
    model = tiny_model(model_type, seed=seed)
    linearize_moe(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    engine = StreamEngine(model, names)
    h, kwargs = engine.capture(calibration_ids(rows=rows, seq_len=seq_len, seed=seed))
    block, nxt = model.model.layers[0], model.model.layers[1]
    args = preset_name_to_scheme("W4A16", ["Linear"]).weights
    targets = {n: args for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n != "mlp.gate"}
    return block, nxt, targets, BlockInputs(h, kwargs[names[0]]), kwargs[names[1]]


def _tune(block, nxt, targets, q, next_kwargs, objective, holdout=0.125, **config):
    config = {"objective": objective, "iters": 12, "batch_size": 2, "holdout": {"fraction": holdout, "every": 3},
              **config, "rounding": {"min_expert_tokens": 0, **config.get("rounding", {})}}
    with suspended_offloading(block, nxt):
        tuner = BlockTuner(block, targets, TuningConfig(**config), [nxt], next_kwargs=[next_kwargs])
        result = tuner.tune(q, q)
    return tuner, result


def _downstream(tuner, q, held):
    """Mean held-out downstream error of the tuner's current (kept) rounding."""
    return mean_of(tuner.heldout(q, tuner.reference(q), held).downstream_errors())


def _state(tuner):
    """The kept rounding decisions: per tuned weight its codes and clip factors."""
    return [t.clone() for w in tuner.weights for snap in [w.snapshot()] for t in (snap.codes, snap.clip_lo,
                                                                                  snap.clip_hi)]


def test_split_is_seeded_disjoint_and_complete():
    block, nxt, targets, q, nkw = _setup()
    tuner = BlockTuner(block, targets,  TuningConfig(objective="none", holdout=0.25), [nxt])
    train, held = tuner.split(8)
    assert held.numel() == 2 and train.numel() == 6
    assert sorted(train.tolist() + held.tolist()) == list(range(8))
    again = BlockTuner(block, targets,  TuningConfig(objective="none", holdout=0.25), [nxt])
    assert torch.equal(again.split(8)[1], held)
    other = BlockTuner(block, targets,  TuningConfig(objective="none", holdout=0.25, seed=1), [nxt])
    assert [other.split(40)[1].tolist()] != [tuner.split(40)[1].tolist()]
    # fewer than one sequence to hold out, or none left to tune on: nothing held out
    assert tuner.split(3)[1].numel() == 0
    none = BlockTuner(block, targets,  TuningConfig(objective="none", holdout=0.0), [nxt])
    assert none.split(8)[1].numel() == 0


def test_kept_iteration_has_the_lowest_held_out_loss():
    block, nxt, targets, q, nkw = _setup()
    # small steps (lr 0.02): tuning improves the held-out loss mid-run, then it rises again
    tuner, result = _tune(block, nxt, targets, q, nkw, "none", holdout=0.25, lr=0.02)
    info = result.arms["plain"]
    curve = info["heldout_curve"]
    assert [it for it, _ in curve] == [0, 3, 6, 9, 12]
    best_it, best = min(curve, key=lambda c: c[1])
    assert info["best_iter"] == best_it and info["heldout_best"] == best
    _, held = tuner.split(q.hidden.shape[0])
    # the parameters kept reproduce that held-out loss exactly
    assert tuner.heldout(q, tuner.reference(q), held).loss(use_router=False) == best
    assert 0 < best_it < 12 and best < curve[0][1] and best < curve[-1][1]  # neither the start nor the end


def test_with_nothing_held_out_the_lowest_minibatch_loss_picks_the_parameters():
    """AutoRound's rule: the kept parameters are those the lowest training loss was measured with; recomputed
    on that iteration's minibatch (drawn again with the seed), they give that loss exactly."""
    from routealign.modifiers.rounding.weights import CyclicBatches

    block, nxt, targets, q, nkw = _setup()
    tuner, result = _tune(block, nxt, targets, q, nkw, "none", holdout=0.0, lr=0.02)
    info, history = result.arms["plain"], result.history
    assert info["heldout_curve"] == [] and len(history) == 12
    best_it = min(range(len(history)), key=history.__getitem__)
    assert info["best_iter"] == best_it > 0
    batches = CyclicBatches(torch.arange(8), 2, torch.Generator().manual_seed(0))
    for _ in range(best_it + 1):
        idx = batches.next()
    with torch.no_grad():
        mse, _ = tuner.step_losses(q, tuner.reference(q), idx, use_router=False)
    assert float(mse) == pytest.approx(history[best_it], rel=1e-6)
    # and the parameters are not the last iteration's: the last minibatch's loss with them differs from its own
    for _ in range(len(history) - best_it - 1):
        last = batches.next()
    with torch.no_grad():
        assert float(tuner.step_losses(q, tuner.reference(q), last, use_router=False)[0]) != pytest.approx(
            history[-1], rel=1e-6)


def _errors(tuner, q, forced=False):
    """Per held-out sequence, the downstream error of the tuner's kept rounding, measured anew (not recorded)."""
    _, held = tuner.split(q.hidden.shape[0])
    return tuner.heldout(q, tuner.reference(q), held).errors(forced=forced)


def _arms_alone(block, nxt, targets, q, nkw, seed, **config):
    """Each arm tuned on its own: objective none, and the router term ungated (the gated run's two arms start from
    the same place on the same minibatches)."""
    plain, _ = _tune(block, nxt, targets, q, nkw, "none", holdout=0.25, seed=seed, lr=0.02)
    router, _ = _tune(block, nxt, targets, q, nkw, "vsraq", holdout=0.25, seed=seed, lr=0.02, gate={"enabled": False},
                      **config)
    return plain, router


# (calibration rows, seed, z, what the gate must do): the router arm significantly better; better on average, not
# significantly (dropped at 1.645, kept at 0); worse
GATE_CASES = [(8, 4, 1.645, "kept"), (16, 1, 1.645, "dropped"), (16, 1, 0.0, "kept"), (16, 0, 1.645, "dropped")]


@pytest.mark.parametrize("rows,seed,z,outcome", GATE_CASES)
def test_router_gate_keeps_the_arm_with_the_smaller_held_out_downstream_error(rows, seed, z, outcome):
    """The gate's decision and kept rounding checked against each arm tuned on its own and measured anew: the
    router arm is kept exactly when its held-out downstream errors beat the plain arm's by z standard errors of the
    paired per-sequence difference, and the block is then that arm's rounding, else plain rounding."""
    from routealign.modifiers.rounding.heldout import paired_gate

    block, nxt, targets, q, nkw = _setup(seed=seed, rows=rows)
    gated, res = _tune(block, nxt, targets, q, nkw, "vsraq", holdout=0.25, router_weight=1.0, seed=seed, lr=0.02,
                       gate={"headroom": False, "z": z})
    plain, router = _arms_alone(block, nxt, targets, q, nkw, seed, router_weight=1.0)
    plain_errors, router_errors = _errors(plain, q), _errors(router, q)
    expected = paired_gate(router_errors - plain_errors, z)
    assert expected["keep"] == (outcome == "kept")  # the case is what its row says
    assert set(res.arms) == {"plain", "router"} and expected["n"] == rows // 4
    assert res.decision is (RouterDecision.KEPT if expected["keep"] else RouterDecision.DROPPED)
    assert res.gate["mean_diff"] == pytest.approx(expected["mean_diff"], rel=1e-6, abs=1e-12)
    winner = router if expected["keep"] else plain
    assert all(torch.equal(a, b) for a, b in zip(_state(gated), _state(winner)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_arm_runs_only_where_forcing_the_right_experts_helps(seed):
    """router_headroom: after the plain arm, the held-out downstream error with the next router's choices forced to
    the unquantized stream's is compared with its own (both measured anew here on plain rounding tuned alone); the
    router arm is tuned only on a significant gain, and the block is otherwise exactly plain rounding."""
    from routealign.modifiers.rounding.heldout import mean_of, paired_gate

    block, nxt, targets, q, nkw = _setup(seed=seed)
    gated, res = _tune(block, nxt, targets, q, nkw, "vsraq", holdout=0.25, router_weight=1.0, seed=seed,
                       gate={"z": 0.0})
    plain, _ = _tune(block, nxt, targets, q, nkw, "none", holdout=0.25, seed=seed)
    own, forced = _errors(plain, q), _errors(plain, q, forced=True)
    assert not torch.equal(own, forced)  # forcing changes the routing of some held-out token
    expected = paired_gate(forced - own, 0.0)
    room = res.headroom
    assert room["keep"] == expected["keep"]
    assert room["own"] == pytest.approx(mean_of(own), rel=1e-9) and room["forced"] == pytest.approx(
        mean_of(forced), rel=1e-9)
    assert set(res.arms) == ({"plain", "router"} if expected["keep"] else {"plain"})
    if not expected["keep"]:
        assert res.decision is RouterDecision.NOT_TRIED
        assert all(torch.equal(a, b) for a, b in zip(_state(gated), _state(plain)))


def test_forcing_the_next_routers_own_choices_changes_nothing():
    block, nxt, targets, q, nkw = _setup(seed=1)
    tuner, _ = _tune(block, nxt, targets, q, nkw, "vsraq", holdout=0.25, router_weight=1.0, seed=1)
    runner = tuner.runner
    kwargs = runner.kwargs32(q.kwargs)
    y = tuner.reference(q).outputs[:2]
    out, logits = runner.run_next(y, kwargs, stop_after=False)
    own = runner.next_choices(logits)
    assert set(own) == {l.name for l in runner.next_layers}
    forced, _ = runner.run_next(y, kwargs, stop_after=False, force=own)
    assert torch.equal(forced, out)
    rerouted, _ = runner.run_next(y, kwargs, stop_after=False, force={n: torch.flip(i, [0]) for n, i in own.items()})
    assert not torch.equal(rerouted, out)


def test_paired_gate_statistics():
    from routealign.modifiers.rounding.heldout import paired_gate

    d = torch.tensor([-3.0, -1.0, -2.0, -2.0])
    g = paired_gate(d, 1.645)
    se = float(d.std(unbiased=True)) / 2.0
    assert g["mean_diff"] == -2.0 and g["se"] == pytest.approx(se) and g["n"] == 4
    assert g["keep"] is True  # -2 + 1.645 * 0.408 < 0
    noisy = paired_gate(torch.tensor([-3.0, 2.5, -2.0, 1.0]), 1.645)
    assert noisy["mean_diff"] < 0 and noisy["keep"] is False  # better on average, not significantly
    assert paired_gate(torch.tensor([-3.0, 2.5, -2.0, 1.0]), 0.0)["keep"] is True
    assert paired_gate(torch.tensor([-1.0]), 1.645)["keep"] is False  # one sequence: no standard error
    assert paired_gate(torch.tensor([-1.0]), 0.0)["keep"] is True
    assert paired_gate(torch.tensor([0.5, 1.0]), 0.0)["keep"] is False


def test_router_gate_off_or_no_held_out_tunes_with_the_router_term_only():
    block, nxt, targets, q, nkw = _setup()
    for config in ({"gate": False, "holdout": 0.25}, {"holdout": 0.0}):
        _, res = _tune(block, nxt, targets, q, nkw, "vsraq", **config)
        assert set(res.arms) == {"router"} and res.decision is RouterDecision.UNGATED


@pytest.mark.parametrize("balance", ["grad_norm", "none", "output"])
def test_router_balance_combines_the_gradients_as_documented(balance):
    """The gradient the signed step takes, checked against the MSE and router gradients taken apart: with
    ``grad_norm`` each tensor's (each expert's, in a stack) router gradient rescaled to router_weight times its
    MSE gradient's norm, then added; with ``none`` the gradient of MSE + router_weight x router; with ``output`` the
    gradient of MSE + c x router, c = router_weight x |dMSE/dy| / |drouter/dy| at the block output y."""
    block, nxt, targets, q, nkw = _setup()
    lam = 0.1
    with suspended_offloading(block, nxt):
        tuner = BlockTuner(block, targets,
                           TuningConfig(objective="vsraq", iters=4, batch_size=2, holdout=0.0, router_weight=lam,
                                        rounding={"min_expert_tokens": 0}, loss={"balance": balance}), [nxt], next_kwargs=[nkw])
        reference = tuner.reference(q)
        idx = torch.tensor([1, 5])
        params = [p for w in tuner.weights for p in w.parameters()]
        with torch.enable_grad():
            mse, router = tuner.step_losses(q, reference, idx, use_router=True)
            if balance == "output":
                y = tuner._output
                assert y is not None and y.requires_grad
                c = lam * (torch.autograd.grad(mse, y, retain_graph=True)[0].norm()
                           / torch.autograd.grad(router, y, retain_graph=True)[0].norm())
                assert 0 < float(c) and float(c) != lam  # the rescaling does something here
            g_mse = torch.autograd.grad(mse, params, retain_graph=True, allow_unused=True)
            g_rt = torch.autograd.grad(router, params, allow_unused=True)
            expected = []
            for w, p, gm, gr in zip([w for w in tuner.weights for _ in w.parameters()], params, g_mse, g_rt):
                gm = torch.zeros_like(p) if gm is None else gm
                gr = torch.zeros_like(p) if gr is None else gr
                if balance in ("none", "output"):
                    expected.append(gm + (lam if balance == "none" else c) * gr)
                    continue
                dims = (-2, -1) if w.stacked else tuple(range(p.ndim))
                nm = torch.linalg.vector_norm(gm, dim=dims, keepdim=True)
                nr = torch.linalg.vector_norm(gr, dim=dims, keepdim=True)
                expected.append(gm + lam * gr * nm / nr.clamp_min(1e-30))
            assert any(bool(g.any()) for g in g_rt if g is not None)
            captured = []
            original = torch._foreach_sign_
            torch._foreach_sign_ = lambda grads: (captured.extend(g.clone() for g in grads), original(grads))[1]
            try:
                mse, router = tuner.step_losses(q, reference, idx, use_router=True)
                tuner.step(params, mse, router, mse + lam * router, 1, 4)
            finally:
                torch._foreach_sign_ = original
    nonzero = [e for e in expected if e is not None]
    assert len(captured) == len(nonzero)
    for got, want in zip(captured, nonzero):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_next_router_is_found_past_layers_without_one(tmp_path):
    """Nemotron-H: attention, MoE, attention, MoE. With router_scope next, the first MoE block's objective is the
    router of the next MoE block, two layers down, and the attention blocks' objective the next MoE router."""
    save_tiny("nemotron_h", tmp_path / "m", seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    ids = calibration_ids(rows=8, seq_len=24)
    mod = RouterAlignedRoundingModifier(objective="vsraq", iters=4, batch_size=2, scheme="W4A16", targets="Linear",
                                        ignore=["lm_head"], rounding={"min_expert_tokens": 0},
                                        gate={"headroom": False})
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), recipe=mod,
            num_calibration_samples=8, max_seq_length=24)
    rows = {r["layer"]: r for r in mod.report}
    assert rows["model.layers.0"]["routers"] == ["next:model.layers.1.mixer.gate"]
    assert rows["model.layers.1"]["routers"] == ["next:model.layers.3.mixer.gate"]
    assert rows["model.layers.2"]["routers"] == ["next:model.layers.3.mixer.gate"]
    assert rows["model.layers.3"]["routers"] == []
    for name in ("model.layers.0", "model.layers.1", "model.layers.2"):
        assert rows[name]["router"] in ("kept", "dropped")
        assert set(rows[name]["arms"]) == {"plain", "router"}
        assert rows[name]["router_unreachable"] == []
    assert rows["model.layers.3"]["router"] == "none"


def test_minibatches_cycle_through_every_tuning_sequence():
    from routealign.modifiers.rounding.weights import CyclicBatches

    train = torch.tensor([0, 2, 3, 5, 6, 7, 9])
    batches = CyclicBatches(train, 3, torch.Generator().manual_seed(0))
    first = [batches.next() for _ in range(2)]
    seen = torch.cat(first)
    assert seen.unique().numel() == 6 and set(seen.tolist()) <= set(train.tolist())  # no repeats within a pass
    third = batches.next()  # one sequence left over: a new shuffled pass starts
    assert third.numel() == 3 and set(third.tolist()) <= set(train.tolist())
    again = CyclicBatches(train, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(again.next(), b) for b in first)
    assert CyclicBatches(train, 10, torch.Generator()).next().numel() == 7  # batch larger than the set


@pytest.mark.parametrize("batched", [True, False])
def test_tuning_forwards_use_the_batched_experts(monkeypatch, batched):
    """The batched experts must survive plain_forwards (which strips instance forwards) inside the tuning loop."""
    import routealign.experts as experts

    calls = []
    original = experts.batched_forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(experts, "batched_forward", counted)
    block, nxt, targets, q, nkw = _setup()
    _tune(block, nxt, targets, q, nkw, "none", iters=2, holdout=0.0, memory={"batched_experts": batched})
    assert (len(calls) > 0) == batched


def test_mse_init_starts_every_tuned_weight_at_its_reconstruction_optimal_clip():
    """``init: mse``: the tuning loop starts from, per group, the clip factor minimising the weight reconstruction
    error (what the RTN fallback uses), offsets zero; ``minmax`` starts at clip 1 (AutoRound's start). With one
    iteration and nothing held out the parameters kept are the start (the only loss measured is iteration 0's)."""
    from routealign.modifiers.rounding.weights import CLIP_GRID, TunedWeight

    block, nxt, targets, q, nkw = _setup()
    starts = []
    for init in ("mse", "minmax"):
        tuner, result = _tune(block, nxt, targets, q, nkw, "none", iters=1, holdout=0.0, rounding={"init": init})
        assert result.arms["plain"]["best_iter"] == 0
        starts.append(_state(tuner))
    expected, rtn = [], []
    for w in tuner.weights:
        fresh = TunedWeight(w.name, w.modules if w.stacked else w.module, w.quantizer, w.global_scale, w.expert,
                            w.experts, w.projection)
        rtn.append(fresh.snapshot().codes)  # offsets zero, clip 1
        fresh.mse_clip(CLIP_GRID)
        snap = fresh.snapshot()
        expected += [snap.codes, snap.clip_lo, snap.clip_hi]
    assert len(starts[0]) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(starts[0], expected))
    clips = torch.cat([t.flatten() for t in starts[0][1::3]])
    assert float(clips.min()) < 1.0 and bool((clips <= 1).all())  # not a no-op
    assert all(bool((t == 1).all()) for t in starts[1][1::3])
    assert all(torch.equal(a, b) for a, b in zip(starts[1][0::3], rtn))  # minmax: the RTN decisions


def test_amp_runs_the_tuning_matmuls_in_bfloat16_and_keeps_losses_and_targets_float32():
    """``amp``: the tuning forward's matmuls see bfloat16 inputs (autocast); the unquantized targets, the losses and
    the rounding parameters stay float32; without it everything is float32."""
    block, nxt, targets, q, nkw = _setup()
    seen = {}

    def hook(module, args, output):
        seen.setdefault(torch.is_autocast_enabled(output.device.type), set()).add(output.dtype)

    handle = block.self_attn.q_proj.register_forward_hook(hook)
    try:
        amp_tuner, amp = _tune(block, nxt, targets, q, nkw, "none", iters=3, rounding={"amp": True})
        with_amp = dict(seen)
        seen.clear()
        _, plain = _tune(block, nxt, targets, q, nkw, "none", iters=3, rounding={"amp": False})
    finally:
        handle.remove()
    assert with_amp[True] == {torch.bfloat16}  # the tuning steps (and held-out losses)
    assert with_amp[False] == {torch.float32}  # targets, counts: not under autocast
    assert set(seen) == {False} and seen[False] == {torch.float32}
    assert amp_tuner.reference(q).outputs.dtype == torch.float32 and all(isinstance(v, float) for v in amp.history)
    assert all(p.dtype == torch.float32 for w in amp_tuner.weights for p in w.parameters())
    assert amp.history[0] != plain.history[0]  # bf16 matmuls change the loss values
    assert abs(amp.history[0] - plain.history[0]) < 0.05 * plain.history[0]


def test_lm_head_criterion_is_the_whole_model_kl_with_this_block_quantized():
    """decide_on lm_head: per held-out sequence, KL(p_fp || p_q) of the next-token distributions of the whole
    model with only this block quantized, against the unquantized model (computed here by running the model)."""
    from routealign.runner import LMTail

    model = tiny_model("qwen3_moe", seed=4)
    linearize_moe(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    ids = calibration_ids(rows=8, seq_len=24, seed=4)
    with torch.no_grad():
        fp_logits = model(input_ids=ids).logits.float()
    engine = StreamEngine(model, names)
    h, kwargs = engine.capture(ids)
    block, rest = model.model.layers[0], list(model.model.layers[1:])
    args = preset_name_to_scheme("W3A16", ["Linear"]).weights
    targets = {n: args for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n != "mlp.gate"}
    q = BlockInputs(h, kwargs[names[0]])
    tail = LMTail(rest, [kwargs[n] for n in names[1:]], model.model.norm, model.lm_head)
    with suspended_offloading(block, *rest):
        tuner = BlockTuner(block, targets,
                           TuningConfig(objective="vsraq", iters=6, batch_size=2, rounding={"min_expert_tokens": 0},
                                        holdout={"fraction": 0.25, "every": 3, "decide_on": "lm_head", "iteration_on": "lm_head"},
                                        gate={"headroom": False, "z": 0.0}),
                           [rest[0]], next_kwargs=[kwargs[names[1]]], lm_tail=tail)
        res = tuner.tune(q, q)
        _, held = tuner.split(8)
        errors = tuner.heldout(q, tuner.reference(q), held).lm_head_errors()
        res.write()
    with torch.no_grad():
        q_logits = model(input_ids=ids).logits.float()
    ref = torch.log_softmax(fp_logits[held], -1)
    kl = (ref.exp() * (ref - torch.log_softmax(q_logits[held], -1))).sum(-1).mean(1)
    assert errors.shape == (held.numel(),) and bool((errors > 0).all())
    assert torch.allclose(errors.float(), kl, rtol=1e-3, atol=1e-7)
    # both arms were compared on it, and the iteration kept has the lowest held-out KL of its arm
    assert set(res.arms) == {"plain", "router"}
    kept = "router" if res.decision.router_used else "plain"
    curve = res.arms[kept]["heldout_curve"]
    assert min(v for _, v in curve) == pytest.approx(float(errors.mean()), rel=1e-6)
    assert res.gate["mean_diff"] == pytest.approx(res.arms["router"]["downstream_heldout"]
                                                  - res.arms["plain"]["downstream_heldout"], rel=1e-6, abs=1e-12)


def test_refined_router_arm_continues_the_plain_arm_for_a_fraction_of_the_steps():
    """router_arm refine: the router arm starts from the plain arm's last iteration (not from the start) and runs
    refine_fraction of the iterations; the gate compares it with the plain arm's kept iteration as before."""
    block, nxt, targets, q, nkw = _setup(seed=1)
    steps = []
    original = BlockTuner.minibatch_losses

    def counted(self, q, reference, batch, use_router, offset):
        mse, router = original(self, q, reference, batch, use_router, offset)
        steps.append((use_router, float(mse)))
        return mse, router

    BlockTuner.minibatch_losses = counted
    try:
        _, res = _tune(block, nxt, targets, q, nkw, "vsraq", holdout=0.25, router_weight=1.0, seed=1,
                       gate={"z": 0.0, "headroom": False, "arm": "refine", "refine_fraction": 0.25}, lr=0.05)
    finally:
        BlockTuner.minibatch_losses = original
    assert [router for router, _ in steps] == [False] * 12 + [True] * 3
    assert len(res.arms["router"]["heldout_curve"]) == 2  # iterations 0 and 3 of the refinement
    assert res.gate is not None and res.decision in (RouterDecision.KEPT, RouterDecision.DROPPED)
    # both arms' first minibatch is the same (the seed's); the refinement measures it at the plain arm's last
    # parameters, which fit it better than the start
    assert steps[12][1] < steps[0][1]


def test_target_stream_quantized_fits_the_block_on_its_own_input_and_keeps_the_unquantized_stream():
    block, nxt, targets, q, nkw = _setup()
    fp = q.with_hidden(q.hidden + 0.05 * torch.randn(q.hidden.shape, generator=torch.Generator().manual_seed(0)))
    results, tuners = {}, {}
    for stream in ("unquantized", "quantized"):
        with suspended_offloading(block, nxt):
            tuner = BlockTuner(block, targets,
                               TuningConfig(objective="none", iters=6, batch_size=2, holdout=0.0,
                                            rounding={"min_expert_tokens": 0, "target_stream": stream}), [nxt], next_kwargs=[nkw])
            results[stream], tuners[stream] = tuner.tune(q, fp), tuner
    # the next block's unquantized stream is the unquantized block on the unquantized stream either way
    assert torch.equal(results["unquantized"].outputs, results["quantized"].outputs)
    assert torch.equal(results["quantized"].outputs, tuners["quantized"].reference(fp).outputs.to(q.hidden.dtype))
    # the first iteration (RTN, the same minibatch) against the unquantized block on the quantized stream sees the
    # quantization error only; against the unquantized stream also the streams' difference
    assert results["quantized"].history[0] < results["unquantized"].history[0]
    assert results["quantized"].history != results["unquantized"].history
