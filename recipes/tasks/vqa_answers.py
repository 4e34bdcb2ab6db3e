"""VQA answers: the evaluation script's normalisation, the vocabulary rule, soft scores and both metrics.

The normalisation is the VQA evaluation script's (``vqaEval.py``: ``processPunctuation`` then
``processDigitArticle``), which bottom-up-attention's ``preprocess_answer`` reuses and follows by
dropping commas. It is copied rule for rule, quirks included, because the 3,129-answer vocabulary
and the soft scores of every VQAv2 checkpoint were built with it:
- a punctuation mark is deleted when the text has it next to a space or has a digit-comma-digit
  run anywhere, else it becomes a space;
- ``periodStrip`` is ``(?!<=\\d)(\\.)(?!\\d)`` (a typo for a look-behind: it drops every period not
  followed by a digit, so "2.5" stays) and the script passes ``re.UNICODE`` as ``count``: at most 32
  periods are removed;
- number words zero to ten become digits ("none" becomes "0"), words are lower-cased, articles go,
  contraction spellings without apostrophes get them back ("dont" -> "don't").

Two metrics, never confused:
- ``vqa_accuracy``, the official one, as the script computes it: the prediction gets the
  punctuation and the digit/article rules (lower-cased with them); the ten human answers get the
  punctuation rule only, and only when they disagree (no digits, no articles, no lower-casing);
  a question's accuracy is ``min(1, matches among the other nine / 3)`` averaged over the ten
  ways to leave one human answer out.
- ``vqa_soft_score``, ViLT's: the training target's soft score of the predicted answer.

Soft-score targets come in two readings (``TargetReading``): ``"raw"`` counts the raw human answer
strings that equal a vocabulary answer, as the PuMer (and ViLT) research code does; ``"normalised"``
normalises each human answer first, so "Two" and "two" count for "2".
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

__all__ = [
    "normalize_answer",
    "answer_vocabulary",
    "soft_score",
    "soft_scores",
    "vqa_soft_score",
    "official_accuracy",
    "vqa_accuracy",
    "TargetReading",
    "TARGET_READINGS",
    "MIN_QUESTIONS",
]

TargetReading = Literal["raw", "normalised"]
TARGET_READINGS: tuple[TargetReading, ...] = ("raw", "normalised")

MIN_QUESTIONS = 9  # an answer enters the vocabulary when it is the consensus answer of >= 9 questions

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # count=32: the script's argument slip, kept


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """bottom-up-attention's ``preprocess_answer``: VQA punctuation and digit/article rules, then no commas."""
    return _process_digit_article(_process_punctuation(answer)).replace(",", "")


def answer_vocabulary(pairs: Iterable[tuple[int, str]], min_questions: int = MIN_QUESTIONS) -> list[str]:
    """Sorted normalised answers that are the ``multiple_choice_answer`` of >= ``min_questions`` questions.

    pairs: ``(question_id, multiple_choice_answer)`` over train + val.
    """
    questions: dict[str, set[int]] = defaultdict(set)
    for qid, answer in pairs:
        questions[normalize_answer(answer)].add(qid)
    return sorted(a for a, qids in questions.items() if len(qids) >= min_questions)


def soft_score(matches: int) -> float:
    """Target score of an answer that ``matches`` of the 10 annotators gave: 0, 0.3, 0.6, 0.9, then 1."""
    return (0.0, 0.3, 0.6, 0.9)[matches] if matches < 4 else 1.0


def soft_scores(raw_answers: Sequence[str], vocabulary: Mapping[str, int] | set[str],
                reading: TargetReading = "raw") -> dict[str, float]:
    """``{answer: score}`` over the vocabulary answers among the human answers, counted as ``reading`` says.

    raw: a human answer counts for a vocabulary answer when the strings are equal (the research
    code's targets); normalised: when its ``normalize_answer`` is.
    """
    if reading not in TARGET_READINGS:
        raise ValueError(f"reading must be one of {TARGET_READINGS}, got {reading!r}")
    counts: dict[str, int] = defaultdict(int)
    for a in raw_answers:
        counts[a if reading == "raw" else normalize_answer(a)] += 1
    return {a: soft_score(n) for a, n in sorted(counts.items()) if a in vocabulary}


def vqa_soft_score(predictions: Sequence[str], labels: Sequence[Mapping[str, float]]) -> float:
    """ViLT's VQA score: mean over questions of the target soft score of the predicted answer (0 when it has none)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} questions")
    if not labels:
        raise ValueError("no questions to score")
    return sum(label.get(p, 0.0) for p, label in zip(predictions, labels)) / len(labels)


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def official_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The VQA evaluation script's accuracy of one answer to one question (0 to 1).

    prediction: the answer as predicted (normalised here); human_answers: the question's raw human
    answers (ten in VQAv2), compared as the script compares them.
    """
    if len(human_answers) < 2:
        raise ValueError(f"the official accuracy leaves one of >= 2 human answers out, got {len(human_answers)}")
    predicted = _process_digit_article(_process_punctuation(_strip_whitespace(prediction)))
    humans = list(human_answers)
    if len(set(humans)) > 1:  # the script compares unanimous answers unprocessed
        humans = [_process_punctuation(h) for h in humans]
    matches = sum(h == predicted for h in humans)
    # leaving human answer j out: the others hold matches - [answer j matched] of the prediction
    return sum(min(1.0, (matches - (h == predicted)) / 3) for h in humans) / len(humans)


def vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """The official VQA accuracy: mean over questions of ``official_accuracy`` (0 to 1, not in percent)."""
    if len(predictions) != len(human_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(human_answers)} questions")
    if not human_answers:
        raise ValueError("no questions to score")
    return sum(official_accuracy(p, h) for p, h in zip(predictions, human_answers)) / len(human_answers)
