"""One generative update of a :class:`~learned_opt.optimizer.GptOptimizer`, all or nothing.

:func:`attempt` samples θ′ candidates, validates them, lets the property head or the closure
choose, guards the choice, and either commits θ′ or leaves θ exactly as it was; every exit path
counts one outcome (``accepted``, ``rejected``, ``failed`` or ``kept``) and returns a
:class:`~learned_opt.proposal.GenerationReport`.
"""

from __future__ import annotations

import time
import warnings

from .collectives import agree, all_ranks_each, broadcast_flag
from .proposal import GenerationReport, line_points, load_sample, meets, restore, sample_candidates
from .selection import choose_by_closure, rank_by_prediction


def attempt(opt, closure, before: float, target: float, start: float) -> GenerationReport:
    """One attempted generative update of ``opt`` (a :class:`~learned_opt.optimizer.GptOptimizer`),
    from the current metric and the prompt: sample, validate, choose, guard, then commit θ′ or
    restore θ. Counts exactly one outcome unless an exception escapes (which the caller counts as
    failed); θ is restored on every exit."""
    points = opt.candidates * len(opt.step_sizes)  # θ′ candidates, each at every step size
    params = opt.params

    predicted = None  # the property head's prediction per candidate, with rank="self"

    def finish(accepted: bool, reason: str | None, after=None, ratio=None, failed=False, scores=None,
               kept=False, chosen=None) -> GenerationReport:
        key = "accepted" if accepted else "failed" if failed else "kept" if kept else "rejected"
        opt.counters[key] += 1
        report = GenerationReport(
            accepted, reason, before, after, target, ratio, time.perf_counter() - start,
            opt.counters["steps"], failed, opt.candidates, scores, predicted, kept,
            None if chosen is None else opt.step_sizes[chosen % len(opt.step_sizes)],
        )
        if failed:
            warnings.warn(f"generative update failed and was skipped: {reason}", RuntimeWarning, stacklevel=6)
        return report

    layout = opt.generator.layout
    theta = layout.flatten([p.detach() for p in params])  # [P]
    if opt.keep_if_met and broadcast_flag(meets(before, target, opt.generator.metric_direction), theta.device):
        return finish(False, f"{opt.generator.metric_name} {before:g} already meets the prompt {target:g}; θ kept",
                      kept=True)
    samples, error = sample_candidates(opt, theta, before, target)  # [C, P] or None
    samples, error = agree(samples, error, theta)
    if error is not None:
        return finish(False, error, failed=True)
    assert samples is not None  # sample_candidates and agree give a sample or an error, never neither
    samples, checks = line_points(opt, theta, samples)  # [C·S, P] (each candidate at each step size), checked
    # every rank must measure the same candidates (the closure may hold collectives)
    ok = all_ranks_each([reason is None for _, reason in checks], theta.device)
    valid = [i for i, good in enumerate(ok) if good]
    if not valid:
        ratio, error = checks[0]
        error = error or "the sample failed validation on another rank"
        if len(checks) > 1:
            error = f"all {len(checks)} {'candidates' if points == opt.candidates else 'points'} failed validation (the first: {error})"
        return finish(False, error, ratio=ratio, failed=True)
    pool = valid  # the candidates the closure may measure
    if opt.rank == "self":  # the generator's own prediction chooses; the guard measures that one only
        chosen, predicted, error = rank_by_prediction(opt, samples, valid)
        if error is not None:
            return finish(False, error, failed=True)
        assert chosen is not None  # rank_by_prediction gives a choice or an error, never neither
        pool = [chosen]

    backup = [p.detach().clone() for p in params]
    settled = False  # True once θ′ is committed, or θ restored and the update counted
    try:
        after, scores, reason, accept, chosen = None, None, None, True, pool[0]
        many = opt.rank == "closure" and points > 1  # the closure chooses among the points
        if closure is not None and (opt.guard or many):
            choice = choose_by_closure(opt, closure, samples, pool, before, theta.dtype, many)
            after, scores, reason, accept, chosen = choice.after, choice.scores, choice.reason, choice.accept, choice.chosen
        if not accept:
            restore(params, backup)
            settled = True
            return finish(False, reason or "rank 0 rejected the update", after=after, ratio=checks[chosen][0],
                          scores=scores, chosen=chosen)
        load_sample(layout, samples[chosen].to(theta.dtype), params)
        settled = True
        return finish(True, None, after=after, ratio=checks[chosen][0], scores=scores, chosen=chosen)
    finally:
        if not settled:  # KeyboardInterrupt, SystemExit, ... while θ′ was in: put θ back, count, re-raise
            restore(params, backup)
            opt.counters["rejected"] += 1
