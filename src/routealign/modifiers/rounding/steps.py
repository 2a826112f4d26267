"""The arithmetic of one tuning step, as functions of tensors (no tuner state).

- :func:`signed_update`: ``p -= lr * sign(grad)`` for every tuned tensor at once, then each kept in its range;
- :func:`balanced_per_tensor`: the MSE and router gradients taken apart and joined per tensor (per expert in a
  stack), the router's rescaled to ``lam`` times the MSE's norm (``loss.balance: grad_norm``);
- :func:`balanced_at_output`: the two joined at the block's output, then one backward (``loss.balance: output``);
- :func:`sign_flips`: how many coordinates' step sign the weighted router gradient changes.

Each balancing function returns, when asked to ``record``, how the router term compares with the MSE (the
``router_scale`` of a block's report). Under torch.distributed every sum is over ranks (:mod:`routealign.distributed`),
so every rank takes the step one process takes on the whole calibration set.
"""

from __future__ import annotations

import torch

from ...distributed import Ranks
from ...schemes import row_pieces

__all__ = ["signed_update", "balanced_per_tensor", "balanced_at_output", "sign_flips"]


@torch.no_grad()
def signed_update(weights: list, lr: float) -> None:
    """``p -= lr * sign(p.grad)`` for the parameters of every trainable weight (frozen experts of a stack, their
    ``step_mask`` 0, do not move), offsets then clamped to ``[-0.5, 0.5]`` and clip factors to ``[0, 1]``: a few
    ``torch._foreach_*`` calls for all of them."""
    moved, grads, bounded = [], [], {(-0.5, 0.5): [], (0.0, 1.0): []}
    for w in weights:
        if not w.trainable:
            continue
        for p in w.parameters():
            if p.grad is not None:
                moved.append(p)
                grads.append(p.grad)
                if w.step_mask is not None:  # frozen experts of a stack: no step (sign 0)
                    p.grad.mul_(w.step_mask)
        bounded[(-0.5, 0.5)].append(w.offset)
        bounded[(0.0, 1.0)] += [w.clip_lo, w.clip_hi]
    if moved:
        torch._foreach_sign_(grads)
        torch._foreach_add_(moved, grads, alpha=-lr)
    for (low, high), tensors in bounded.items():
        if tensors:
            torch._foreach_clamp_min_(tensors, low)
            torch._foreach_clamp_max_(tensors, high)


def _loss_ratio(ranks: Ranks, lam: float, mse: torch.Tensor | None, router: torch.Tensor | None) -> float:
    """``lam * router / mse`` of the minibatch (over ranks)."""
    if ranks.alone:  # one read of the device
        return float(lam * router.detach() / mse.detach().clamp_min(1e-30))
    mse_value, router_value = ranks.sum([0.0 if mse is None else mse.detach(), 0.0 if router is None else router.detach()])
    return lam * router_value / max(mse_value, 1e-30)


def balanced_per_tensor(ranks: Ranks, params: list[torch.Tensor], owners: dict, mse: torch.Tensor | None,
                        router: torch.Tensor | None, lam: float, measure_only: bool, record: bool) -> dict | None:
    """Separate MSE and router gradients (each summed over ranks); unless ``measure_only``, sets ``p.grad`` to the
    MSE gradient plus the router gradient rescaled per tensor (per expert in a stack: ``owners[id(p)].stacked``) to
    ``lam`` times the MSE gradient's norm. With ``record``, returns how they compare (loss ratio, gradient-norm
    ratio, the fraction of coordinates whose step sign the weighted router gradient changes; experts of a stack
    counted by their ``step_mask``). ``mse`` and ``router`` are None on a rank that holds none of the minibatch.

    In one process the router gradient is taken first and kept, and each tensor's MSE gradient is combined with it
    as the backward reaches that tensor (a hook): one set of gradients is alive, not two."""
    order = {id(p): i for i, p in enumerate(params)}
    sums: list[tuple[int, torch.Tensor]] = []  # recorded once, per tensor, read together in the params' order

    def combine(p: torch.Tensor, gm: torch.Tensor | None, gr: torch.Tensor | None) -> torch.Tensor | None:
        w = owners[id(p)]
        gm = torch.zeros_like(p) if gm is None else gm
        gr = torch.zeros_like(p) if gr is None else gr
        if w.stacked:  # one norm per expert
            nm = torch.linalg.vector_norm(gm, dim=(-2, -1), keepdim=True)
            nr = torch.linalg.vector_norm(gr, dim=(-2, -1), keepdim=True)
        else:
            nm, nr = gm.norm(), gr.norm()
        if record:
            mask = w.step_mask if w.step_mask is not None else torch.ones((), device=gm.device)
            sums.append((order[id(p)], torch.stack([
                (nm.double().pow(2) * mask).sum(), (nr.double().pow(2) * mask).sum(),
                sign_flips(gm, gr, lam, mask), mask.expand_as(gm).sum().double()])))
        if measure_only:
            return None
        return gm.add_(gr.mul_(lam).mul_(nm / nr.clamp_min(1e-30)))

    if ranks.alone and mse is not None and not measure_only:
        g_rt = torch.autograd.grad(router, params, retain_graph=True, allow_unused=True) \
            if router.requires_grad else [None] * len(params)
        pending = {id(p): g for p, g in zip(params, g_rt)}
        del g_rt  # each router gradient is freed once combined

        # combined in the MSE gradient's own buffer, which the backward then stores as the gradient (returning
        # a new tensor from the hook would have it copied)
        def hook(gm: torch.Tensor, p: torch.Tensor) -> None:
            combine(p, gm, pending.pop(id(p)))

        handles = [p.register_hook(lambda gm, p=p: hook(gm, p)) for p in params]
        try:
            mse.backward()
        finally:
            for handle in handles:
                handle.remove()
        for p in params:  # not reached by the MSE: its gradient is zero, and so is the combination's
            if id(p) in pending:
                pending.pop(id(p))
                if record:
                    combine(p, None, None)
    else:
        if mse is None:
            g_mse = g_rt = [None] * len(params)
        else:
            g_mse = torch.autograd.grad(mse, params, retain_graph=True, allow_unused=True)
            g_rt = torch.autograd.grad(router, params, retain_graph=measure_only, allow_unused=True) \
                if router.requires_grad else [None] * len(params)
        g_mse = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_mse)]
        g_rt = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_rt)]
        reduced = ranks.tensors(g_mse + g_rt)
        g_mse, g_rt = reduced[: len(params)], reduced[len(params):]
        for p, gm, gr in zip(params, g_mse, g_rt):
            combined = combine(p, gm, gr)
            if combined is not None:
                p.grad = combined
    if not record:
        return None
    sums.sort(key=lambda item: item[0])
    norm_m, norm_r, flips, total = (torch.stack([t for _, t in sums]).sum(0).tolist() if sums
                                    else (0.0, 0.0, 0.0, 0.0))
    return {"loss_ratio": _loss_ratio(ranks, lam, mse, router),
            "grad_norm_ratio": lam * (norm_r ** 0.5) / max(norm_m ** 0.5, 1e-30),
            "sign_flip_fraction": flips / max(total, 1.0)}


def balanced_at_output(ranks: Ranks, params: list[torch.Tensor], y: torch.Tensor | None, mse: torch.Tensor | None,
                       router: torch.Tensor | None, lam: float, record: bool) -> dict | None:
    """``loss.balance: output``: the MSE's and the router term's gradients at the block's output ``y`` (the
    router's backward goes through the next layer only), the router's rescaled to ``lam`` times the MSE's norm over
    the minibatch (every rank's tokens), then one backward through the block; gradients summed over ranks. With
    ``record``, returns the loss and gradient-norm ratios measured at the output."""
    if mse is not None and y is not None:
        gm = torch.autograd.grad(mse, y, retain_graph=True)[0]
        gr = torch.autograd.grad(router, y, retain_graph=True, allow_unused=True)[0] if router.requires_grad else None
        gr = torch.zeros_like(gm) if gr is None else gr
        squares = [gm.double().pow(2).sum(), gr.double().pow(2).sum()]
    else:  # a rank that holds none of the minibatch: zero gradients, its share of the collectives
        gm = gr = None
        squares = [torch.zeros((), dtype=torch.float64)] * 2
    nm2, nr2 = ranks.sum(squares)
    nm, nr = torch.as_tensor(nm2).sqrt(), torch.as_tensor(nr2).sqrt()
    if gm is not None:
        scale = (lam * nm / nr.clamp_min(1e-30)).to(gm.dtype).to(gm.device)
        y.backward(gm.add_(gr.mul_(scale)))
    ranks.grads(params)
    if not record:
        return None
    return {"loss_ratio": _loss_ratio(ranks, lam, mse, router), "grad_norm_ratio": lam * float(nr) / max(float(nm), 1e-30),
            "measured_at": "block output"}


@torch.no_grad()
def sign_flips(gm: torch.Tensor, gr: torch.Tensor, lam: float, mask: torch.Tensor) -> torch.Tensor:
    """How many coordinates' step sign the weighted router gradient changes (``mask``: experts counted), in pieces
    (:func:`~routealign.schemes.row_pieces`: no temporary of the gradient's size)."""
    rows = gm.reshape(-1, gm.shape[-1])
    weights = mask.expand(*gm.shape[:-1], 1).reshape(-1, 1)
    total = torch.zeros((), dtype=torch.float64, device=gm.device)
    for a, b in row_pieces(*rows.shape, rows.device):
        g = rows[a:b]
        changed = g.sign() != (g + lam * gr.reshape(rows.shape)[a:b]).sign()
        total += (changed * weights[a:b]).sum().double()
    return total
