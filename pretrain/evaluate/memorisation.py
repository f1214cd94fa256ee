"""Memorisation: each generated network's distance to its nearest corpus checkpoint after aligning
hidden units (Hungarian matching for one hidden layer, weight matching for more).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from learned_opt.errors import ConfigError
from learned_opt.symmetry import Slot
from learned_opt.tasks import Task

from ..store import Store
from .config import SCREEN_ELEMENTS, EvalConfig
from .metrics import summary


def hungarian(cost: torch.Tensor) -> torch.Tensor:
    """Exact minimum-cost assignment of a square ``[H, H]`` cost matrix: ``col[i]`` for row ``i``.

    The O(H³) Hungarian algorithm with potentials (Kuhn-Munkres); for the few units of a hidden
    layer plain Python is fast enough (scipy is not a dependency).
    """
    a = cost.double().tolist()
    n = len(a)
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match, way = [0] * (n + 1), [0] * (n + 1)  # match[j]: row (1-based) assigned to column j
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = [inf] * (n + 1), [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = a[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, n + 1):
        col[match[j] - 1] = j - 1
    return torch.tensor(col, dtype=torch.long)


def _groups(task: Task) -> int:
    """The number of the task's unit groups (hidden layers, convolutions); at least one."""
    depth = len(task.hidden_sizes())
    if depth < 1:
        raise ConfigError(f"the memorisation check aligns hidden units; task {task.name!r} has no hidden layer")
    return depth


def _units(task: Task, p: dict[str, torch.Tensor], group: int, outgoing: bool) -> torch.Tensor:
    """What is attached to each unit of ``group`` (0-based), ``[B, H, D]``: its incoming weights and
    bias and, with ``outgoing``, what the next layer reads from it (``p``: parameters ``[B, *shape]``)."""
    return task.unit_symmetry.unit_values(p, group, outgoing)


def _residual_indices(task: Task) -> torch.Tensor:
    """Flat indices of the values no unit holds (the output layer's bias)."""
    layout = task.layout(scheme="neuron")
    groups = len(task.hidden_sizes())
    rest = [i for idx, g in zip(layout.token_indices, layout.token_groups) if g >= groups for i in idx]
    return torch.tensor(rest, dtype=torch.long)


def align_hidden_units(task: Task, a: torch.Tensor, b: torch.Tensor, sweeps: int = 20) -> list[torch.Tensor]:
    """Permutations of ``b``'s hidden units, one ``[H_l]`` per layer, that bring flat ``b`` [P] near ``a`` [P].

    Layer by layer from the input, each layer's units are matched by the exact assignment
    (:func:`hungarian`) minimising the squared distance of their incoming weights and biases (the
    earlier layers already aligned) and, in the last hidden layer, their outgoing weights too. With
    one hidden layer that is the exact optimum. With more, sweeps of weight matching (Ainsworth et
    al., 2023) follow: each layer re-matched on everything attached to its units with the other
    layers fixed, which never increases the distance, until a sweep changes nothing (at most
    ``sweeps``): a local optimum.
    """
    depth, layout = _groups(task), task.layout()
    pa = layout.unflatten(a[None].double())
    perms = [torch.arange(h) for h in task.hidden_sizes()]

    def match(layer: int, outgoing: bool) -> torch.Tensor:  # that layer as stored, the others aligned
        others = [torch.arange(len(p)) if i == layer else p for i, p in enumerate(perms, start=1)]
        pb = layout.unflatten(task.permute(b[None].double(), [p[None] for p in others]))
        g = layer - 1
        return hungarian(torch.cdist(_units(task, pa, g, outgoing)[0], _units(task, pb, g, outgoing)[0]) ** 2)

    for layer in range(1, depth + 1):
        perms[layer - 1] = match(layer, layer == depth)
    for _ in range(sweeps if depth > 1 else 0):
        changed = False
        for layer in range(1, depth + 1):
            new = match(layer, True)
            changed |= not torch.equal(new, perms[layer - 1])
            perms[layer - 1] = new
        if not changed:
            break
    return perms


def _greedy_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A greedy assignment of each ``[..., H, H]`` matrix: its total cost (an upper bound of the
    optimum) and the column of each row, ``[..., H]``."""
    c = cost.clone()
    h = c.shape[-1]
    total = torch.zeros(c.shape[:-2], dtype=c.dtype, device=c.device)
    flat = c.reshape(-1, h * h)
    cols = torch.empty(flat.shape[0], h, dtype=torch.long, device=c.device)
    for _ in range(h):
        best, idx = flat.min(-1)
        total += best.reshape(total.shape)
        row, col = idx // h, idx % h
        view = flat.view(-1, h, h)
        cols[torch.arange(view.shape[0]), row] = col
        view[torch.arange(view.shape[0]), row, :] = math.inf
        view[torch.arange(view.shape[0]), :, col] = math.inf
    return total, cols.view(c.shape[:-1])


def aligned_distance(task: Task, a: torch.Tensor, b: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """``(‖a - perm(b)‖, perms)``: L2 distance of flat ``a`` [P] to ``b`` [P] after permuting ``b``'s
    hidden units to match ``a``'s (:func:`align_hidden_units`; exact for one hidden layer)."""
    perms = align_hidden_units(task, a, b)
    aligned = task.permute(b[None], [p[None] for p in perms])[0]
    return float((a.double() - aligned.double()).norm()), perms


def _screen(task: Task, queries: torch.Tensor, candidates: torch.Tensor, chunk: int) -> torch.Tensor:
    """Squared distances ``[Q, M]`` after a greedy alignment of every (query, candidate) pair, batched.

    Layer by layer as in :func:`align_hidden_units`, each layer assigned greedily, the candidates'
    incoming weights reordered by each pair's assignment of the layer before: an upper bound of the
    aligned squared distance.
    """
    depth, layout, sym = _groups(task), task.layout(), task.unit_symmetry
    residual = _residual_indices(task)
    pq = layout.unflatten(queries.double())
    nq = queries.shape[0]
    chunk = max(1, min(chunk, SCREEN_ELEMENTS // (nq * sum(h * h for h in task.hidden_sizes()))))
    scores = []
    for start in range(0, candidates.shape[0], chunk):
        pc = layout.unflatten(candidates[start : start + chunk].double())
        total, prev = 0, None  # prev [Q, m, H]: each pair's assignment in the layer before
        for g in range(depth):
            last = g == depth - 1
            uq, uc = _units(task, pq, g, last), _units(task, pc, g, last)  # [Q, H, D], [m, H, D]
            if prev is None:
                cross = torch.einsum("qid,mjd->qmij", uq, uc)
            else:  # the candidates' incoming weights, input units in each pair's order: [Q, m, H, k]
                slot = sym.groups[g - 1].outgoing[0]  # this group's weight, read along its input axis
                if slot != Slot(sym.groups[g].incoming[0].name, 1, slot.inner):
                    raise ConfigError(f"the memorisation screening needs a chain of layers; task {task.name!r} "
                                      "declares another symmetry")
                m, h, h_prev = uc.shape[0], uc.shape[1], prev.shape[-1]
                w = pc[slot.name].reshape(m, h, h_prev, -1)  # [m, H, H_prev, inner * kernel]
                k = w.shape[2] * w.shape[3]
                index = prev[:, :, None, :, None].expand(-1, -1, h, -1, w.shape[3])
                w = w[None].expand(nq, -1, -1, -1, -1).gather(3, index).reshape(nq, m, h, k)
                cross = torch.einsum("qik,qmjk->qmij", uq[..., :k], w) + torch.einsum("qid,mjd->qmij", uq[..., k:], uc[..., k:])
            # squared distances between every query unit and every candidate unit: [Q, m, H, H]
            sq = (uq * uq).sum(-1)[:, None, :, None] + (uc * uc).sum(-1)[None, :, None, :] - 2 * cross
            cost, prev = _greedy_assignment(sq.clamp_min(0))
            total = total + cost
        flat_q, flat_c = queries.double()[:, residual], candidates[start : start + chunk].double()[:, residual]
        rest = torch.cdist(flat_q, flat_c) ** 2 if len(residual) else 0  # [Q, m]: what no unit holds
        scores.append(total + rest)
    return torch.cat(scores, 1)


def nearest_aligned(
    task: Task, queries: torch.Tensor, candidates: torch.Tensor, exclude: torch.Tensor | None = None,
    refine: int = 8, chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest candidate of each query after hidden-unit alignment: ``[Q, P]``, ``[M, P]`` -> ``[Q]``, ``[Q]``.

    Screening: a greedy assignment for every (query, candidate) pair, batched (:func:`_screen`);
    then :func:`aligned_distance` for the ``refine`` best candidates of each query, whose smallest
    distance is returned with the candidate's index. ``exclude`` ``[Q, M]`` bool masks pairs (e.g.
    checkpoints of the query's own run). Distances are L2 in raw parameter units.
    """
    screened = _screen(task, queries, candidates, chunk)  # [Q, M] greedy squared distances
    if exclude is not None:
        screened = screened.masked_fill(exclude, math.inf)
    k = min(refine, screened.shape[1])
    top = screened.topk(k, dim=1, largest=False).indices  # [Q, k]
    dist = torch.full((queries.shape[0],), math.inf, dtype=torch.float64)
    index = torch.full((queries.shape[0],), -1, dtype=torch.long)
    for q in range(queries.shape[0]):
        for m in top[q].tolist():
            if not math.isfinite(float(screened[q, m])):
                continue
            d, _ = aligned_distance(task, queries[q], candidates[m])
            if d < dist[q]:
                dist[q], index[q] = d, m
    return dist.float(), index


def corpus_seeds(store: Store) -> set[int]:
    settings = store.settings or {}
    base = settings.get("seed")
    ids = store.run_ids() + store.dropped_ids()
    if base is not None:
        return {int(base) + r for r in ids}
    return {int(store.read_info(r)[0]) for r in store.run_ids()}


def measure_memorisation(task, store: Store, generated: torch.Tensor, achieved: torch.Tensor, config: EvalConfig,
                  metric: str = "test_loss") -> dict:
    """Nearest corpus checkpoints of the generated networks (with their ``metric``), and the corpus's
    own NN distances."""
    ids = store.run_ids()
    if len(ids) > config.memo_runs:  # evenly spaced run ids: deterministic
        ids = [ids[round(i * (len(ids) - 1) / (config.memo_runs - 1))] for i in range(config.memo_runs)] \
            if config.memo_runs > 1 else ids[:1]
    cand, cand_run, cand_step, cand_metric = [], [], [], []
    for r in tqdm(ids, desc="memorisation: reading corpus", unit="run", disable=not config.progress):
        steps, metrics = store.read_metrics(r)
        k = len(steps)
        rows = sorted({k - 1, *(round(j * (k - 1) / config.memo_checkpoints) for j in range(1, config.memo_checkpoints))})
        cand.append(store.read_checkpoints(r, rows))
        cand_run += [r] * len(rows)
        cand_step += steps[rows].tolist()
        cand_metric += metrics[metric][rows].tolist() if metric in metrics else [math.nan] * len(rows)
    cands = torch.cat(cand)  # [M, P]
    runs = torch.tensor(cand_run)
    dist, idx = nearest_aligned(task, generated, cands)
    # the corpus's own scale: nearest checkpoint of another run, for a sample of its checkpoints
    q = torch.linspace(0, len(cands) - 1, min(config.memo_queries, len(cands))).round().long().unique()
    exclude = runs[q][:, None] == runs[None, :]  # [Q, M]: same run
    corpus_dist, _ = nearest_aligned(task, cands[q], cands, exclude=exclude)
    unaligned = (generated[:, None, :] - cands[None, :, :]).norm(dim=-1).min(1).values  # [N]
    typical = summary(corpus_dist.tolist())["median"]
    nearest = [float(cand_metric[i]) for i in idx.tolist()]
    return {
        "runs_searched": len(ids),
        "checkpoints_searched": len(cands),
        "nearest_distance": dist.tolist(),
        "nearest_distance_unaligned": unaligned.tolist(),
        "nearest_run": [cand_run[i] for i in idx.tolist()],
        "nearest_step": [int(cand_step[i]) for i in idx.tolist()],
        f"nearest_{metric}": nearest,
        f"generated_{metric}": achieved.tolist(),
        "corpus_nn_distance": corpus_dist.tolist(),
        "summary": {
            "nearest_distance": summary(dist.tolist()),
            "corpus_nn_distance": summary(corpus_dist.tolist()),
            "ratio_to_corpus_nn_median": [d / typical if typical else None for d in dist.tolist()],
            f"nearest_{metric}": summary(nearest),
        },
        "method": "hidden units aligned by the exact assignment (Hungarian) minimising the squared L2 distance; "
                  "candidates screened with a greedy assignment, the 8 best per query solved exactly"
                  if len(task.hidden_sizes()) == 1 else
                  "hidden units aligned layer by layer by the exact assignment (Hungarian), then by weight matching "
                  "(each layer re-assigned with the others fixed) until nothing changes; candidates screened with a "
                  "greedy layer-by-layer assignment, the 8 best per query aligned as above",
    }
