"""DD-Ranking-style scores for distilled sets, computed on accuracies given as FRACTIONS in [0, 1].

DD-Ranking (Li et al. 2025, ``dd_ranking/metrics``) defines, per evaluation run:

- IOR, improvement over random = acc(distilled) - acc(random real subset, same IPC, same recipe);
- HLR, hard-label recovery = acc(full real data, hard labels) - acc(distilled, hard labels);
- LRS, label-robust score = (e^a - e^-1) / (e - e^-1) with a = lambda * IOR - (1 - lambda) * HLR;
- ARS, augmentation-robust score = (e^b - e^-1) / (e - e^-1) with
  b = gamma * (acc_syn_aug - acc_rand_aug) + (1 - gamma) * (acc_syn_noaug - acc_rand_noaug).

With fractions every gap lies in [-1, 1], so a and b lie in [-1, 1] and both scores in [0, 1]; a
random subset scores (1 - e^-1)/(e - e^-1) ~= 0.2689 when HLR is 0. Feeding percentages (as some
published tables do) breaks the normalisation; :func:`check_fraction` rejects them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ddkit.config import short_repr
from ddkit.errors import DDKitError

__all__ = ["accuracy_problem", "ars", "cell_problem", "check_fraction", "check_report", "drop_diverged_scores", "hlr",
           "ior", "lrs", "mean_std", "normalized_exp", "report_problem", "summary_problem"]


def check_fraction(value: float, name: str = "accuracy") -> float:
    """Return ``value`` if it is a fraction in [0, 1]; raise with a hint if it looks like a percentage."""
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        hint = " (it looks like a percentage; divide by 100)" if 1.0 < value <= 100.0 else ""
        raise DDKitError(f"{name} must be a fraction in [0, 1], got {value!r}{hint}")
    return float(value)


def ior(acc: float, acc_random: float) -> float:
    """Improvement over random: ``acc - acc_random`` (fractions), in [-1, 1]. Higher is better."""
    return check_fraction(acc, "acc") - check_fraction(acc_random, "acc_random")


def hlr(acc_full_hard: float, acc_hard: float) -> float:
    """Hard-label recovery: ``acc_full_hard - acc_hard`` (fractions), in [-1, 1]. Lower is better."""
    return check_fraction(acc_full_hard, "acc_full_hard") - check_fraction(acc_hard, "acc_hard")


def normalized_exp(x: float) -> float:
    """Map x in [-1, 1] to [0, 1] monotonically: ``(e^x - e^-1) / (e - e^-1)``."""
    if not -1.0 - 1e-12 <= x <= 1.0 + 1e-12:
        raise DDKitError(f"score argument must be in [-1, 1] (gaps of fractions), got {x!r}")
    x = min(1.0, max(-1.0, x))
    return (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def lrs(ior_value: float, hlr_value: float, lam: float = 0.5) -> float:
    """Label-robust score from IOR and HLR (fractions): alpha = lam*IOR - (1-lam)*HLR, then
    :func:`normalized_exp`. In [0, 1]: 1 only at IOR = 1 and HLR = -1 (unreachable while the full
    data scores above 0); a random subset (IOR 0) whose hard-label accuracy equals the full data's
    (HLR 0) scores (1 - e^-1) / (e - e^-1) = 0.2689."""
    if not 0.0 <= lam <= 1.0:
        raise DDKitError(f"lambda must be in [0, 1], got {lam}")
    return normalized_exp(lam * ior_value - (1.0 - lam) * hlr_value)


def ars(gap_aug: float, gap_noaug: float, gamma: float = 0.5) -> float:
    """Augmentation-robust score from the gaps to random with and without augmentation
    (``acc_syn_aug - acc_rand_aug`` and ``acc_syn_noaug - acc_rand_noaug``, fractions):
    beta = gamma*gap_aug + (1-gamma)*gap_noaug, then :func:`normalized_exp`. In [0, 1]."""
    if not 0.0 <= gamma <= 1.0:
        raise DDKitError(f"gamma must be in [0, 1], got {gamma}")
    return normalized_exp(gamma * gap_aug + (1.0 - gamma) * gap_noaug)


def mean_std(values: Sequence[float]) -> dict[str, float | list[float] | int]:
    """``{"per_seed", "mean", "std", "n"}`` with the population std (as ``evaluate`` reports)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"per_seed": [], "mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(vals) / n
    return {"per_seed": vals, "mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in vals) / n), "n": n}


# the accuracies of a bench cell each of its scores is computed from
SCORE_INPUTS = {"ior": ("acc", "random"), "hlr": ("full_hard", "hard_acc"),
                "lrs": ("acc", "random", "full_hard", "hard_acc"), "aug_gap": ("aug_acc", "aug_random"),
                "noaug_gap": ("noaug_acc", "noaug_random"),
                "ars": ("aug_acc", "aug_random", "noaug_acc", "noaug_random")}


def drop_diverged_scores(row: dict) -> list[str]:
    """Leave out (set to None, printed ``–``) each score of a bench cell computed from an accuracy with students
    that diverged (its summary's ``diverged`` count): their NaN/inf outputs count as wrong, so such a score is not
    one of the set. Returns the names of the scores left out; a row without diverged students is left as it is."""
    dropped = [score for score, inputs in SCORE_INPUTS.items()
               if row.get(score) is not None and any(isinstance(row.get(k), dict) and row[k].get("diverged")
                                                     for k in inputs)]
    for score in dropped:
        row[score] = None
    return dropped


# --- checking summaries read back from files ------------------------------------------------------

# a bench cell's summaries of accuracies (fractions in [0, 1]) and of scores (gaps: negative too)
CELL_ACCURACIES = ("acc", "random", "full_hard", "hard_acc", "aug_acc", "aug_random", "noaug_acc", "noaug_random")
CELL_SCORES = ("ior", "hlr", "lrs", "ars", "aug_gap", "noaug_gap")


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def accuracy_problem(v: object) -> str | None:
    """What is wrong with one accuracy read back from a file (a random-baseline cache entry's), or None: a
    finite number in [0, 1]."""
    if not (_number(v) and math.isfinite(v) and 0 <= v <= 1):
        return f"{short_repr(v)}, not an accuracy in [0, 1]"
    return None


def summary_problem(s: object, accuracy: bool = True) -> str | None:
    """What is wrong with a ``{"per_seed", "mean", "std", "n"}`` summary read back from a file (a report, a
    bench cell, a cache entry) that :func:`mean_std` would not have written, or None: ``per_seed`` finite
    numbers (``accuracy``: in [0, 1]), ``n`` their count, ``mean`` and ``std`` their mean and population std
    to rounding (an edited mean next to the seeds' own numbers is a damaged record, not a result)."""
    if not isinstance(s, dict):
        return f"{short_repr(s)}, not a summary (per_seed, mean, std, n)"
    vals = s.get("per_seed")
    if not (isinstance(vals, list) and all(_number(v) and math.isfinite(v) for v in vals)):
        return f"per_seed {short_repr(vals)}, not a list of finite numbers"
    if accuracy and not all(0 <= v <= 1 for v in vals):
        return f"per_seed {short_repr(vals)}, not accuracies in [0, 1]"
    if not (_number(s.get("n")) and s.get("n") == len(vals)):
        return f"n {short_repr(s.get('n'))} for {len(vals)} per_seed values"
    want = mean_std(vals)
    for key, what in (("mean", "mean"), ("std", "population std")):
        got = s.get(key)
        ok = _number(got) and (math.isclose(got, want[key], rel_tol=1e-9, abs_tol=1e-12)
                               or (not vals and math.isnan(got)))
        if not ok:
            return f"{key} {short_repr(got)}, not the {what} of its per_seed {short_repr(vals)} ({want[key]!r})"
    return None


def report_problem(report: dict) -> str | None:
    """What is wrong with the ``results`` of an evaluation report (see :func:`summary_problem`), or None."""
    results = report.get("results")
    if not (isinstance(results, dict) and "distilled" in results):
        return f"results {short_repr(results)}, not a mapping with the distilled set's accuracy"
    for name, s in results.items():
        if s is not None and (problem := summary_problem(s)):
            return f"results.{name} {problem}"
    return None


def cell_problem(row: dict) -> str | None:
    """What is wrong with the summaries of a bench cell or a bench table's row, or None."""
    for keys, accuracy in ((CELL_ACCURACIES, True), (CELL_SCORES, False)):
        for key in keys:
            if row.get(key) is not None and (problem := summary_problem(row[key], accuracy)):
                return f"{key} {problem}"
    return None


def check_report(report: dict, where: object, fix: str = "delete it and evaluate again") -> dict:
    """``report`` (read from the file ``where``), unless its results are damaged: then a one-line error."""
    if isinstance(report, dict) and (problem := report_problem(report)):
        raise DDKitError(f"evaluation report {str(where)!r} holds {problem}; the report is damaged: {fix}")
    return report
