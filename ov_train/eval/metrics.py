"""Answer metrics of ov-eval: each scores one prediction against its reference in [0, 1].

- `exact_match`: equal after normalisation (lower case, no punctuation, no articles, single spaces), as SQuAD.
- `multiple_choice`: the same option, named by its letter ("B", "(B)", "B. text") or by its text.
- `anls`: Average Normalized Levenshtein Similarity (DocVQA, OCR): 1 - normalised edit distance, 0 past 0.5.
- `relaxed_accuracy`: numbers within 5% of the reference (ChartQA), exact match otherwise.
"""
from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

from rapidfuzz.distance import Levenshtein

DEFAULT_METRIC = "exact_match"
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# An option letter as models write it: "B", "B.", "(B)", "B)", "B: text", "B. text".
_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)]\s*|\s*$)")


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str, options: Sequence[str] = ()) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _choice(text: str, options: Sequence[str]) -> int | str | None:
    """The option `text` names: its index (by option text, then by letter); without options, the letter."""
    normalized = normalize_answer(text)
    for i, option in enumerate(options):
        if normalized == normalize_answer(option):
            return i
    match = _LETTER.match(text.strip())
    if match is None:
        return None
    letter = match.group(1)
    if not options:
        return letter
    index = ord(letter) - ord("A")
    return index if index < len(options) else None


def multiple_choice(prediction: str, reference: str, options: Sequence[str] = ()) -> float:
    expected = _choice(reference, options)
    if expected is None:  # a reference that is neither an option nor a letter: compare the texts
        return exact_match(prediction, reference)
    return float(_choice(prediction, options) == expected)


def anls(prediction: str, reference: str, options: Sequence[str] = ()) -> float:
    a, b = " ".join(prediction.lower().split()), " ".join(reference.lower().split())
    distance = Levenshtein.normalized_distance(a, b)
    return 1.0 - distance if distance < ANLS_THRESHOLD else 0.0


def _number(text: str) -> float | None:
    text = text.strip().replace(",", "").lstrip("$")
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, reference: str, options: Sequence[str] = ()) -> float:
    predicted, expected = _number(prediction), _number(reference)
    if predicted is None or expected is None:
        return exact_match(prediction, reference)
    if expected == 0:
        return float(predicted == 0)
    return float(abs(predicted - expected) / abs(expected) <= RELAXED_TOLERANCE)


METRICS: dict[str, Callable[[str, str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
}


def check_metric(name: str, where: str) -> str:
    if name not in METRICS:
        raise ValueError(f"{where}: metric={name!r}; allowed: {sorted(METRICS)}")
    return name


def score(metric: str, prediction: str, reference: str, options: Sequence[str] = ()) -> float:
    return METRICS[metric](prediction, reference, options or ())


def summarize(rows: list[dict], key: str) -> dict[str, dict]:
    """Per value of `key` (source, modality): samples, the metric (when one), its mean score, and exact match."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    out = {}
    for name, members in sorted(groups.items()):
        metrics = sorted({r["metric"] for r in members})
        out[name] = {
            "samples": len(members),
            "metric": metrics[0] if len(metrics) == 1 else metrics,
            "score": sum(r["score"] for r in members) / len(members),
            "exact_match": sum(r["exact_match"] for r in members) / len(members),
        }
    return out
