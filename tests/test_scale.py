"""Issue 29: experts tuned as one tensor. The learned-rounding fake quantization is one autograd node with the values
and gradients of the elementwise composition it replaces; a tuning iteration runs the same operations whatever the
number of experts and reads nothing back from the device; frozen experts of a stack do not move; llm-compressor's
pipeline passes skip the layers when only routealign's modifiers are in the recipe."""

import contextlib
import itertools

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_range
from llmcompressor.modeling.moe.linearize import linearize_moe
from torch.utils._python_dispatch import TorchDispatchMode

from routealign.distributed import suspended_offloading
from routealign.modifiers.rounding import BlockTuner, TuningConfig
from routealign.schemes import WeightQuantizer, _RoundSTE
from routealign.streams import BlockInputs, StreamEngine
from routealign.tiny import tiny_model

from .conftest import calibration_ids

HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "is_nonzero", "equal")


class Dispatches(TorchDispatchMode):
    """Counts the aten operations dispatched inside, and the reads of tensor values back to the host (operations
    that need one, and ``Tensor.tolist``, which reads without dispatching)."""

    def __init__(self):
        super().__init__()
        self.ops, self.reads = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func.__name__.split(".")[0] in HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(t, original=self._tolist):
            self.reads.append("tolist")
            return original(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _composed(quant, w, qp, offset):
    """The learned-rounding fake quantization as separate autograd operations (the code before issue 29)."""
    q_min, q_max = calculate_range(quant.args, w.device)
    x = quant._grouped(w)
    scale = qp.scale.unsqueeze(-1)
    zp = qp.zero_point.unsqueeze(-1) if qp.zero_point is not None else None
    if qp.global_scale is not None:
        gs = qp.global_scale if qp.global_scale.ndim <= 1 else qp.global_scale.unsqueeze(-1)
        scale = scale / gs
    scaled = x / scale
    if zp is not None:
        scaled = scaled + zp.to(x.dtype)
    scaled = scaled + quant._grouped(offset).to(scaled.dtype)
    q = _RoundSTE.apply(scaled, quant.args, q_min, q_max)
    dq = q.to(scale.dtype)
    if zp is not None:
        dq = dq - zp.to(scale.dtype)
    return (dq * scale).flatten(start_dim=-2)


@pytest.mark.parametrize("name,full_range,shape,chunk", list(itertools.product(
    ["W4A16", "W4A16_ASYM", "W3A16", "NVFP4"], [False, True], [(48, 256), (3, 16, 256)], [1 << 26, 37])))
def test_offset_fake_quant_equals_the_composition_bit_for_bit(name, full_range, shape, chunk, monkeypatch):
    monkeypatch.setenv("ROUTEALIGN_PIECE_ELEMENTS", str(chunk))  # 37: many row chunks, one not full
    quant = WeightQuantizer(preset_name_to_scheme(name, ["Linear"]).weights, full_range=full_range)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w[..., 3] = 0.9
    gs = quant.global_scale(w) if quant.uses_global_scale else None
    results = []
    for composed in (True, False):
        wmin, wmax = quant.group_minmax(w)
        lo = (torch.rand(wmin.shape, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5).requires_grad_()
        hi = (torch.rand(wmin.shape, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.5).requires_grad_()
        offset = (torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) - 0.5).requires_grad_()
        qp = quant.qparams(wmin * lo, wmax * hi, gs)
        out = _composed(quant, w, qp, offset) if composed else quant.fake_quant(w, qp, offset)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
        results.append((out.detach(), offset.grad, lo.grad, hi.grad))
        # the codes it rounds to give the same values back
        if not composed:
            codes = quant.codes(w, qp, offset)
            assert codes.dtype == torch.int8
            assert torch.equal(quant.dequantize(codes, qp), out.detach())
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
    assert bool((results[1][1] != 0).any()) and bool((results[1][2] != 0).any())


def _block(num_experts: int, seed: int = 4, rows: int = 8, seq_len: int = 24, dtype=torch.float32, **config):
    model = tiny_model("qwen3_moe", seed=seed, num_experts=num_experts, dtype=dtype, **config)
    linearize_moe(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    h, kwargs = StreamEngine(model, names).capture(calibration_ids(rows=rows, seq_len=seq_len, seed=seed))
    block, nxt = model.model.layers[0], model.model.layers[1]
    args = preset_name_to_scheme("W4A16", ["Linear"]).weights
    targets = {n: args for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n != "mlp.gate"}
    return block, nxt, targets, BlockInputs(h, kwargs[names[0]]), kwargs[names[1]]


def _iteration_dispatches(num_experts: int, objective: str, holdout: float, **tuning):
    """(operations, host reads) of the tuning iterations of one block (minibatch losses and signed steps)."""
    block, nxt, targets, q, nkw = _block(num_experts)
    counts = []
    with suspended_offloading(block, nxt):
        tuner = BlockTuner(block, targets,
                           TuningConfig(**{"objective": objective, "iters": 3, "batch_size": 2, "holdout": holdout,
                                           "rounding": {"min_expert_tokens": 0}, "gate": False, **tuning}),
                           [nxt], next_kwargs=[nkw])
        losses, step = tuner.minibatch_losses, tuner.step

        def counted(fn):
            def run(*args, **kwargs):
                with Dispatches() as mode:
                    out = fn(*args, **kwargs)
                counts.append((mode.ops, mode.reads))
                return out
            return run

        tuner.minibatch_losses, tuner.step = counted(losses), counted(step)
        tuner.tune(q, q)
    per_iteration = [a[0] + b[0] for a, b in zip(counts[0::2], counts[1::2])]
    reads = [a[1] + b[1] for a, b in zip(counts[0::2], counts[1::2])]
    stacks = [w for w in tuner.weights if w.stacked]
    return per_iteration, reads, stacks


@pytest.mark.parametrize("objective,holdout", [("none", 0.25), ("vsraq", 0.25), ("none", 0.0)])
def test_an_iteration_runs_the_same_operations_whatever_the_number_of_experts(objective, holdout, monkeypatch):
    # an accelerator's chunking of the elementwise passes (the CPU's is cache-sized: more pieces for more experts)
    monkeypatch.setenv("ROUTEALIGN_PIECE_ELEMENTS", str(1 << 26))
    few, reads_few, stacks = _iteration_dispatches(4, objective, holdout)
    many, reads_many, _ = _iteration_dispatches(32, objective, holdout)
    assert len(stacks) == 3 and all(len(w.modules) == 4 for w in stacks)  # gate, up, down: one tensor each
    assert few[1:] == many[1:]  # the first iteration may differ (the router term's scale is recorded once)
    # nothing waits for the device inside an iteration (losses are read at held-out evaluations only); the first
    # iteration of a router objective reads its recorded scale once
    assert all(r == [] for r in reads_few[1:] + reads_many[1:]), (reads_few, reads_many)
    assert len(reads_few[0]) <= (2 if objective != "none" else 0)


@pytest.mark.parametrize("layout,chunk,offload,expected", [
    ("grouped", 0, False, []), ("grouped", 0, True, []), ("padded", 0, False, ["_local_scalar_dense.default"]),
    ("padded", 0, True, ["_local_scalar_dense.default"]), ("grouped", 2, False, ["tolist"]),
    ("padded", 2, False, ["_local_scalar_dense.default"])])
def test_host_reads_per_iteration_in_an_accelerators_layouts(layout, chunk, offload, expected, monkeypatch):
    """On a simulated Hopper GPU, each layout and scale option a GPU run takes: the grouped layout reads nothing back
    in an iteration; the padded one reads its capacity once per MoE forward; experts in chunks read their token
    boundaries once per forward (not once per product: three before); offloaded streams add no read."""
    import routealign.accelerator as accelerator

    monkeypatch.setenv("ROUTEALIGN_PIECE_ELEMENTS", str(1 << 26))
    monkeypatch.setattr(accelerator, "LAYOUT", layout)
    with accelerator.simulated((9, 0)):
        _, reads, _ = _iteration_dispatches(8, "vsraq", 0.25, memory={"expert_chunk": chunk, "offload_activations": offload})
        staged = (accelerator.STAGED.copies, accelerator.STAGED.pinned)
    assert all(r == expected for r in reads[1:]), reads
    if offload:  # every minibatch reached the device from a pinned staging buffer
        assert staged[0] >= 3 * 2 and staged[0] == staged[1]
    else:
        assert staged == (0, 0)


def test_the_layout_by_device():
    """What the code picks on each accelerator (simulated): grouped GEMMs for bf16 on Hopper only; padded in
    float32 on CUDA and on compute capability 10 (zero-size groups' weight gradients, PyTorch issue 172439)."""
    import routealign.accelerator as accelerator

    assert accelerator.expert_layout("cpu", torch.float32) == "grouped"
    for capability, dtype, layout in (((9, 0), torch.bfloat16, "grouped"), ((9, 0), torch.float32, "padded"),
                                      ((10, 0), torch.bfloat16, "padded"), ((8, 0), torch.bfloat16, "padded")):
        with accelerator.simulated(capability):
            assert accelerator.expert_layout("cpu", dtype) == layout, (capability, dtype)
            assert accelerator.piece_elements("cpu") == accelerator.PIECE_ELEMENTS["accelerator"]
    assert accelerator.piece_elements("cpu") == accelerator.PIECE_ELEMENTS["cpu"]


def test_frozen_experts_of_a_stack_keep_their_mse_clipped_rtn(monkeypatch):
    """An expert routed too few tokens is frozen inside its stack: its rounding never moves while the others do."""
    from routealign.modifiers.rounding.weights import CLIP_GRID, TunedWeight

    monkeypatch.setattr(TunedWeight, "drop_offsets", lambda self: None)  # keep the last step's offsets to look at
    block, nxt, targets, q, nkw = _block(8)
    with suspended_offloading(block, nxt):
        tuner = BlockTuner(block, targets,
                           TuningConfig(objective="none", iters=4, batch_size=2, lr=0.05, holdout=0.0), [nxt], next_kwargs=[nkw])
        counts = tuner.expert_token_counts(q)
        # expert 2 starves (no routed token), every other one has enough
        starved = {n: torch.where(torch.arange(8) == 2, 0, v + 100) for n, v in counts.items()}
        tuner.expert_token_counts = lambda inputs: starved
        result = tuner.tune(q, q)
    assert list(counts) == ["mlp"]
    assert set(result.fallback) == {f"mlp.experts.2.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    written = {id(m): v for m, n, v in result.writes if n == "weight"}
    for w in tuner.weights:
        if not w.stacked:
            continue
        lone = TunedWeight("x", w.modules[2], w.quantizer, None, expert=2)
        lone.mse_clip_fallback(CLIP_GRID)
        expected, _ = lone.final()
        assert torch.equal(written[id(w.modules[2])], expected), w.name
        # the live parameters after the last step: expert 2's never moved, the others' did
        assert not bool(w.offset[2].any()) and torch.equal(w.clip_lo[2], lone.clip_lo)
        assert all(bool(w.offset[e].any()) for e in range(8) if e != 2)


def test_pipeline_passes_skip_the_layers_only_when_every_modifier_streams_its_own(tmp_path):
    """With only routealign's modifiers the decoder layers never run inside llm-compressor's calibration and
    propagation passes (routealign's own forwards run them); with GPTQ in the recipe they do, as before."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    import routealign.streams as streams
    from routealign import RouterAlignedRoundingModifier
    from routealign.tiny import save_tiny

    save_tiny("qwen3_moe", tmp_path / "m", seed=3)
    ids = calibration_ids(rows=4, seq_len=16)
    outside = []

    def run(recipe):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
        layer_cls = type(model.model.layers[0])
        original_forward, original_plain = layer_cls.forward, streams.plain_forwards
        inside = [0]

        def forward(self, *args, **kwargs):
            if not inside[0] and not torch.fx._symbolic_trace.is_fx_tracing():  # tracing computes nothing
                outside.append(1)
            return original_forward(self, *args, **kwargs)

        @contextlib.contextmanager
        def plain_forwards(*args, **kwargs):  # every forward of routealign's own runs the layer inside this
            inside[0] += 1
            try:
                with original_plain(*args, **kwargs):
                    yield
            finally:
                inside[0] -= 1

        layer_cls.forward, streams.plain_forwards = forward, plain_forwards
        try:
            oneshot(model=model, dataset=Dataset.from_dict({"input_ids": ids.tolist()}), recipe=recipe,
                    num_calibration_samples=4, max_seq_length=16)
        finally:
            layer_cls.forward, streams.plain_forwards = original_forward, original_plain
        assert all("_routealign_pipeline_forward" not in l.__dict__ for l in model.model.layers)  # undone
        return model

    ours = dict(iters=2, batch_size=2, scheme="W4A16", targets="Linear", ignore=["lm_head"], objective="none")
    run(RouterAlignedRoundingModifier(**ours))
    assert outside == []
    run([GPTQModifier(scheme="W4A16", targets="re:.*self_attn.*_proj$"),
         RouterAlignedRoundingModifier(**{**ours, "targets": "re:.*mlp.experts.*"})])
    assert len(outside) > 0


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", ["W4A16", "NVFP4"])
def test_fake_quant_matmul_equals_fake_quant_then_matmul(name, padded):
    """Experts' fake quantization fused with their grouped matmul (nothing of the weight's size kept between forward
    and backward): the values and gradients of the two operations in a row (grouped: bit for bit, the same GEMM
    calls; padded: the weight gradient's product is taken the other way round, equal to float rounding)."""
    quant = WeightQuantizer(preset_name_to_scheme(name, ["Linear"]).weights)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 32, 256, generator=gen) * 0.05
    gs = quant.global_scale(w) if quant.uses_global_scale else None
    counts = torch.tensor([3, 0, 7, 1, 4])
    tokens = torch.randn(int(counts.sum()), 256, generator=gen)
    if padded:
        tokens = torch.stack([torch.cat([tokens[:c], tokens.new_zeros(7 - c, 256)]) for c in counts])
    offsets = None if padded else torch.cumsum(counts, 0).to(torch.int32)
    results = []
    for fused in (False, True):
        wmin, wmax = quant.group_minmax(w)
        lo = torch.full_like(wmin, 0.9).requires_grad_()
        offset = ((torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.6).requires_grad_()
        x = tokens.clone().requires_grad_()
        qp = quant.qparams(wmin * lo, wmax * lo, gs)
        if fused:
            y = quant.fake_quant_matmul(w, qp, offset, x, offsets, torch.float32)
        else:
            fw = quant.fake_quant(w, qp, offset)
            y = torch.bmm(x, fw.transpose(1, 2)) if padded else torch._grouped_mm(x, fw.transpose(1, 2), offs=offsets)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
        results.append((y.detach(), x.grad, offset.grad, lo.grad))
    for ours, theirs in zip(results[1], results[0]):
        if padded:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(ours, theirs)
    assert bool(results[1][2].any()) and bool(results[1][3].any())


def _chunked(chunk: int, iters: int = 9, num_experts: int = 8):
    """(tuner, result, block-output MSE of the written block on the calibration stream) of one block's tuning."""
    from routealign.runner import float_params

    block, nxt, targets, q, nkw = _block(num_experts, rows=16, seq_len=32)
    with suspended_offloading(block, nxt):
        tuner = BlockTuner(block, targets,
                           TuningConfig(objective="none", iters=iters, batch_size=4, lr=0.02, holdout={"fraction": 0.25, "every": 3},
                                        memory={"expert_chunk": chunk}), [nxt], next_kwargs=[nkw])
        reference = tuner.reference(q).outputs
        result = tuner.tune(q, q)
        result.write()
        with torch.no_grad():
            y, _ = tuner.runner.run(block, float_params(block), q.hidden.float(), tuner.runner.kwargs32(q.kwargs), [])
    return tuner, result, float((y - reference).pow(2).mean())


def _written(result) -> dict[tuple[int, str], torch.Tensor]:
    out = {}
    for module, name, value in result.writes:
        assert (id(module), name) not in out, "a parameter written twice"
        out[(id(module), name)] = value
    return out


@pytest.mark.parametrize("chunk", [3, 1])
def test_iters_zero_in_chunks_writes_every_expert_as_the_unchunked_rtn(chunk):
    """iters 0 with expert_chunk goes over every chunk: each expert's weight and scales written once, equal to the
    unchunked RTN's, tensor for tensor (before, only the first chunk was written: 9 of 24 expert weights)."""
    whole, whole_result, _ = _chunked(0, iters=0)
    chunked, result, _ = _chunked(chunk, iters=0)
    assert chunked.experts.count == -(-8 // chunk)
    a, b = _written(whole_result), _written(result)
    names = {id(m): n for n, m in chunked.block.named_modules()}
    whole_names = {id(m): n for n, m in whole.block.named_modules()}
    a = {(whole_names[k[0]], k[1]): v for k, v in a.items()}
    b = {(names[k[0]], k[1]): v for k, v in b.items()}
    assert set(a) == set(b)
    assert sum(n == "weight" and ".experts." in m for m, n in b) == 8 * 3
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_experts_tuned_in_chunks_cover_every_expert_once():
    """expert_chunk: the experts of a layer are tuned a chunk at a time, each against the chunks before it
    quantized; every expert's weight is written once, tuned (not left at RTN), and the result beats RTN."""
    whole, whole_result, whole_error = _chunked(0)
    same, same_result, _ = _chunked(8)
    assert same.experts.count == 1 and same_result.chunks is None  # a chunk as large as the layer: no chunks
    chunked, result, error = _chunked(3)
    rtn, rtn_result, rtn_error = _chunked(3, iters=0)
    assert chunked.experts.count == 3 and [c["experts"] for c in result.chunks] == [[0, 3], [3, 6], [6, 8]]
    assert all(c["arms"]["plain"]["best_iter"] > 0 for c in result.chunks)  # each chunk kept a tuned iteration
    written, rtn_written = _written(result), _written(rtn_result)
    assert len(written) == len(_written(whole_result)) == len(rtn_written)
    experts = {m for m in chunked.block.mlp.experts.modules() if isinstance(m, torch.nn.Linear)}
    assert sum(1 for m, n, _ in result.writes if n == "weight" and m in experts) == 8 * 3
    # every expert of every chunk moved away from RTN (its weight differs from the RTN run's)
    names = {id(m): n for n, m in chunked.block.named_modules()}
    rtn_names = {id(m): n for n, m in rtn.block.named_modules()}
    tuned = {names[k[0]]: v for k, v in written.items() if k[1] == "weight"}
    base = {rtn_names[k[0]]: v for k, v in rtn_written.items() if k[1] == "weight"}
    for e in range(8):
        assert any(not torch.equal(tuned[f"mlp.experts.{e}.{p}"], base[f"mlp.experts.{e}.{p}"])
                   for p in ("gate_proj", "up_proj", "down_proj")), e
    assert error < rtn_error and error < 2 * whole_error


@pytest.mark.parametrize("capability", [(9, 0), (10, 0)])
def test_activations_kept_on_the_host_give_the_same_rounding(capability):
    """offload_activations on a simulated GPU: the calibration streams, the unquantized outputs the loss compares
    with and the outputs returned for the next layer are placed in pinned host memory (what the code chose, not
    where a CPU tensor happens to be), every minibatch reaches the device through a pinned staging buffer, and the
    decisions are the ones of the run that keeps everything on the device."""
    import routealign.accelerator as accelerator

    results, placed = [], []
    for offload in (False, True):
        block, nxt, targets, q, nkw = _block(8)
        with accelerator.simulated(capability), suspended_offloading(block, nxt):
            tuner = BlockTuner(block, targets,
                               TuningConfig(objective="vsraq", iters=4, batch_size=2, holdout={"fraction": 0.25, "every": 2},
                                            memory={"offload_activations": offload}), [nxt], next_kwargs=[nkw])
            reference = []
            original = tuner.reference
            tuner.reference = lambda fp, **kw: reference.append(original(fp, **kw)) or reference[-1]
            results.append(tuner.tune(q, q))
            placed.append((accelerator.is_pinned(results[-1].outputs), accelerator.is_pinned(reference[0].outputs),
                           accelerator.STAGED.copies, accelerator.STAGED.pinned))
    assert placed[0] == (False, False, 0, 0)
    pinned_outputs, pinned_reference, copies, from_pinned = placed[1]
    assert pinned_outputs and pinned_reference and copies >= 4 * 2 and copies == from_pinned
    assert all(torch.equal(a[2], b[2]) for a, b in zip(results[0].writes, results[1].writes))
    assert results[0].history == results[1].history


def test_the_rest_of_the_model_is_onloaded_one_module_at_a_time():
    """decide_on lm_head: the layers after the block, the final norm and the LM head run inside the tail's onload
    context one at a time (an offloaded model is never on the accelerator whole), and no float32 copy of their
    experts is made."""
    from routealign.runner import LMTail

    model = tiny_model("qwen3_moe", seed=4, num_hidden_layers=4)
    linearize_moe(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = [f"model.layers.{i}" for i in range(4)]
    h, kwargs = StreamEngine(model, names).capture(calibration_ids(rows=8, seq_len=16, seed=4))
    block, rest = model.model.layers[0], list(model.model.layers[1:])
    args = preset_name_to_scheme("W4A16", ["Linear"]).weights
    targets = {n: args for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n != "mlp.gate"}
    open_now, seen = [], []

    @contextlib.contextmanager
    def onload(module):
        assert not open_now, "two tail modules onloaded at once"
        open_now.append(module)
        seen.append(module)
        try:
            yield
        finally:
            open_now.pop()

    tail = LMTail(rest, [kwargs[n] for n in names[1:]], model.model.norm, model.lm_head, onload=onload)
    with suspended_offloading(block, rest[0]):
        tuner = BlockTuner(block, targets,
                           TuningConfig(objective="vsraq", iters=2, batch_size=2, holdout={"fraction": 0.25, "decide_on": "lm_head"},
                                        gate={"z": 0.0, "headroom": False}), [rest[0]], next_kwargs=[kwargs[names[1]]],
                           lm_tail=tail)
        assert not any(".experts." in n for n in tuner.runner._next32[0])  # the experts' own weights are used
        tuner.tune(BlockInputs(h, kwargs[names[0]]), BlockInputs(h, kwargs[names[0]]))
    # three passes (the unquantized side once, each arm's kept decision once), each module once per pass
    per_pass = rest + [model.model.norm, model.lm_head]
    assert seen == per_pass * 3
