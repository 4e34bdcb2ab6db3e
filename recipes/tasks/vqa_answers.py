"""VQA answers: the official normalisation, the vocabulary rule, soft scores and the VQA score.

The normalisation is the VQA evaluation script's (``vqaEval.py``: ``processPunctuation`` then
``processDigitArticle``), which bottom-up-attention's ``preprocess_answer`` reuses and follows by
dropping commas. It is copied rule for rule, quirks included, because the 3,129-answer vocabulary
and the soft scores of every VQAv2 checkpoint were built with it:
- a punctuation mark is deleted when the text has it next to a space or has a digit-comma-digit
  run anywhere, else it becomes a space;
- ``periodStrip`` is ``(?!<=\\d)(\\.)(?!\\d)`` (a typo for a look-behind: it drops every period not
  followed by a digit, so "2.5" stays) and the script passes ``re.UNICODE`` as ``count``: at most 32
  periods are removed;
- number words zero to ten become digits ("none" becomes "0"), articles go, contraction spellings
  without apostrophes get them back ("dont" -> "don't").
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "normalize_answer",
    "answer_vocabulary",
    "soft_score",
    "soft_scores",
    "vqa_score",
    "MIN_QUESTIONS",
]

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


def soft_scores(raw_answers: Sequence[str], vocabulary: Mapping[str, int] | set[str]) -> dict[str, float]:
    """``{answer: score}`` over the vocabulary answers among the (normalised) raw human answers."""
    counts: dict[str, int] = defaultdict(int)
    for a in raw_answers:
        counts[normalize_answer(a)] += 1
    return {a: soft_score(n) for a, n in sorted(counts.items()) if a in vocabulary}


def vqa_score(predictions: Sequence[str], labels: Sequence[Mapping[str, float]]) -> float:
    """Mean over questions of the target score of the predicted answer (0 when it has none)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} questions")
    if not labels:
        raise ValueError("no questions to score")
    return sum(label.get(p, 0.0) for p, label in zip(predictions, labels)) / len(labels)
