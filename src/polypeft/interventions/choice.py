"""The layer search's choice rules: when a cell's validation gain over no LRP2 is more than noise.

Kept apart from the search so the rules' statistics (split, Bonferroni and max-t thresholds) read in one place.
"""
from __future__ import annotations

from fractions import Fraction
from statistics import NormalDist

import torch

from .capture import InterventionError

# A cell is kept only if its mean paired gain over the baseline exceeds a threshold in standard errors:
# "split": the cell is chosen on a selection part of the validation examples (SELECTION_SHARE of them,
#   interleaved: see `split_examples`) and only that one cell is tested against the baseline on the held-back rest,
#   one-sided at DEFAULT_ALPHA. The choice never sees the test's examples, so one test needs no correction.
# "bonferroni": the best cell on all examples, one-sided at DEFAULT_ALPHA / cells (the best of many noisy cells
#   looks better than it is), so its bar rises with the grid: z = 2.64 for 12 cells, 3.2 for 78.
# "maxt" (default): every cell on all examples against the largest studentised gain over the cells when each example's
#   differences are sign-flipped together (Westfall and Young's max-t): the bar of Bonferroni's family-wise level,
#   but read off the cells' own correlation (neighbouring layers move the same examples), so it is lower; the
#   largest gain among the cells that clear it is kept. Over 100-1,000 validation verses it keeps a real gain most
#   often of the three, and a loss in at most 0.7 % of decisions (Bonferroni 0.5 %, split 1.2 %; bench/RESULTS.md
#   section 5, "LRP2's layer choice"), so it is the default.
# Below MIN_VALIDATION_EXAMPLES paired examples in the test the standard error itself is too rough to trust, and
# LRP2 is not free (a wrong layer costs points, RESULTS section 5), so the default there is no LRP2.
RULES = ("split", "bonferroni", "maxt")
DEFAULT_RULE = "maxt"
DEFAULT_ALPHA = 0.05
SELECTION_SHARE = 0.5
MIN_VALIDATION_EXAMPLES = 50
MAX_T_FLIPS = 2000  # sign flips of the max-t null; fixed seed, so a search decides the same on every run
MAX_T_SEED = 0


def bonferroni_z(cells: int, alpha: float = DEFAULT_ALPHA) -> float:
    """One-sided z at level alpha / cells: 1.64 for one cell, 2.64 for 12, 3.2 for 78."""
    if cells < 1 or not 0.0 < alpha < 1.0:
        raise InterventionError(f"bonferroni_z: cells={cells} must be >= 1 and alpha={alpha} in (0, 1)")
    return NormalDist().inv_cdf(1.0 - alpha / cells)


def check_rule(rule: str, alpha: float, selection_share: float, min_examples: int, where: str) -> None:
    """Refuse a choice rule's settings up front (before any cell is scored), naming the value and what is allowed."""
    if rule not in RULES:
        raise InterventionError(f"{where}: rule={rule!r} is not a choice rule; allowed: 'split' (choose on one part "
                                f"of the validation examples, test that cell on the rest), 'bonferroni' or 'maxt'")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise InterventionError(f"{where}: alpha={alpha!r} must be a level in (0, 1), e.g. 0.05")
    if not (isinstance(selection_share, (int, float)) and 0.0 < selection_share < 1.0):
        raise InterventionError(f"{where}: selection_share={selection_share!r} must be in (0, 1): the share of "
                                f"validation examples that choose the cell (the rest test it)")
    if isinstance(min_examples, bool) or not isinstance(min_examples, int) or min_examples < 2:
        raise InterventionError(f"{where}: min_examples={min_examples!r} must be an integer >= 2 (a standard "
                                f"error needs two examples)")


def split_examples(count: int, selection_share: float = SELECTION_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the selection part and of the held-back test part of `count` validation examples, interleaved.

    Position k selects when ceil((k+1)s) > ceil(ks), s = `selection_share` as a fraction: at 1/2 the even positions
    select and the odd ones test, so a validation set spread over books splits into two spread halves, the same on
    every run (no seed)."""
    check_rule("split", DEFAULT_ALPHA, selection_share, MIN_VALIDATION_EXAMPLES, "split_examples")
    share = Fraction(selection_share).limit_denominator(1000)
    ceil = -((-torch.arange(count + 1) * share.numerator) // share.denominator)  # ceil(k s), exact in integers
    selects = ceil[1:] > ceil[:-1]
    return selects.nonzero().flatten(), (~selects).nonzero().flatten()


def studentised(means: torch.Tensor, squares: torch.Tensor, count: int) -> torch.Tensor:
    """Mean / standard error from the means and the sums of squares; a cell whose differences never vary scores
    0 where its mean is 0 and +-inf otherwise (every example moved the same way)."""
    variance = ((squares - count * means ** 2) / (count - 1)).clamp_min(0.0)
    scale = (variance / count).sqrt()
    steady = torch.where(means == 0, torch.zeros_like(means), means.sign() * torch.inf)  # never 0 * inf = nan
    return torch.where(scale > 1e-12, means / scale.clamp_min(1e-12), steady)


def max_t_threshold(differences: torch.Tensor, alpha: float = DEFAULT_ALPHA, flips: int = MAX_T_FLIPS,
                    seed: int = MAX_T_SEED) -> float:
    """The (1 - alpha) quantile of the largest studentised mean over the cells of `differences` (examples x cells,
    oriented so that larger is better) when each example's row is multiplied by a random sign.

    Every cell's differences share one sign per example, so the cells' correlation (neighbouring layers move the same
    examples) is kept in the null: for independent cells the bar is Sidak's (about Bonferroni's), for identical cells
    the one-test z. `seed` fixes the flips, so the same differences always give the same bar."""
    if differences.dim() != 2 or differences.shape[0] < 2 or differences.shape[1] < 1:
        raise InterventionError(f"max_t_threshold: differences of shape {tuple(differences.shape)} must be "
                                f"examples x cells, with at least 2 examples and 1 cell")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise InterventionError(f"max_t_threshold: alpha={alpha!r} must be a level in (0, 1), e.g. 0.05")
    if isinstance(flips, bool) or not isinstance(flips, int) or flips < 1 / alpha:
        raise InterventionError(f"max_t_threshold: flips={flips!r} must be an integer >= 1/alpha = {1 / alpha:g} "
                                f"(fewer cannot place the (1 - alpha) quantile); {MAX_T_FLIPS} by default")
    differences = differences.to(torch.float64)
    count = differences.shape[0]
    squares = (differences ** 2).sum(0)  # unchanged by sign flips
    generator = torch.Generator().manual_seed(seed)
    largest = []
    for start in range(0, flips, 500):  # bounded memory for long validation sets
        signs = torch.randint(0, 2, (min(500, flips - start), count), generator=generator, dtype=torch.float64) * 2 - 1
        largest.append(studentised(signs @ differences / count, squares, count).max(1).values)
    return float(torch.cat(largest).quantile(1.0 - alpha))
