"""plait_code_choice's scores: lm-eval's single 4-way draw, and the exact expectation over every draw of
3 distractors from each function's pool of same-length bodies (variance reduction of the same quantity).

A row's ``choices`` are the single draw first (``single_draw`` bodies, the true one at ``label``), then the
rest of its pool. lm-eval scores every choice once, conditionally and (for acc_mutual_info) after an empty
context; ``process_results`` gets both lists and returns one value per function, so a metric's standard
error is over functions, the independent units.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np


def expected_accuracy(true_score: float, distractors: Sequence[float], *, num_drawn: int) -> float:
    """Chance that ``true_score`` wins lm-eval's argmax among ``num_drawn`` distractors drawn without
    replacement from ``distractors``, the draw's choices in a uniformly random order.

    A draw with a distractor above loses; one whose top holds the true choice and t tied distractors wins
    1/(t+1): lm-eval's np.argmax takes the first of tied maxima, and in a random order the true choice is
    first among the t+1 with chance 1/(t+1). With b distractors below and e equal, out of K:
    sum_t C(b, m-t) C(e, t) / (t+1) / C(K, m), m = num_drawn."""
    pool = len(distractors)
    if not 1 <= num_drawn <= pool:
        raise ValueError(f"draw {num_drawn} distractors from a pool of {pool}: need 1 <= draw <= pool")
    below = sum(score < true_score for score in distractors)
    equal = sum(score == true_score for score in distractors)
    wins = sum(comb(below, num_drawn - t) * comb(equal, t) / (t + 1) for t in range(min(num_drawn, equal) + 1))
    return wins / comb(pool, num_drawn)


def pairwise_accuracy(true_score: float, distractors: Sequence[float]) -> float:
    """Share of the pool the true choice beats one to one (a tie counts 1/2, as a random order would); chance 0.5."""
    below = sum(score < true_score for score in distractors)
    equal = sum(score == true_score for score in distractors)
    return (below + equal / 2) / len(distractors)


def process_results(doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's acc / acc_norm / acc_mutual_info of the single draw, and the pool's expected 4-way and
    pairwise accuracies for both scores (log p(body | header); minus log p(body) for mutual information)."""
    choices, label, draw = doc["choices"], doc["label"], doc["single_draw"]
    if len(results) != 2 * len(choices):
        raise ValueError(
            f"plait_code_choice got {len(results)} scores for {len(choices)} choices: its metric_list must keep "
            "acc_mutual_info, which makes lm-eval score each choice after an empty context too"
        )
    lls = np.array([ll for ll, _ in results[: len(choices)]])
    mutual = lls - np.array([ll for ll, _ in results[len(choices) :]])
    lengths = np.array([float(len(choice)) for choice in choices])  # lm-eval's acc_norm: characters
    metrics = {
        "acc": float(np.argmax(lls[:draw]) == label),
        "acc_norm": float(np.argmax(lls[:draw] / lengths[:draw]) == label),
        "acc_mutual_info": float(np.argmax(mutual[:draw]) == label),
    }
    for name, scores in (("acc", lls), ("acc_mutual_info", mutual)):
        others = [float(s) for i, s in enumerate(scores) if i != label]
        metrics[f"{name}_pool4"] = expected_accuracy(float(scores[label]), others, num_drawn=draw - 1)
        metrics[f"{name}_pair"] = pairwise_accuracy(float(scores[label]), others)
    return metrics
