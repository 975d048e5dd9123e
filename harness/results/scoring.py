"""Scoring, after inference and never on workers: normalise, WER/CER, token divergence, per utterance.

Each utterance is scored by the rules of its language (`scoring_language`): English text with
openai-whisper's `EnglishTextNormalizer`, every other language with whisper's
`BasicTextNormalizer` (punctuation and symbols to spaces, lower case, diacritics kept: whisper's
default, and open_asr_leaderboard's multilingual normaliser). Languages written without spaces
between words (`CER_LANGUAGES`) are normalised with `split_letters=True`, each grapheme cluster a
"word", as whisper-based evaluations of Chinese and Japanese do: their word counts are then
character counts, their CER is that error rate (spaces never count), and it is their headline
figure — so ΔWER and the gate compare them in characters. Corpus WER is Σ(S + D + I) / Σ reference
words (never a mean of per-utterance rates), computed by jiwer, and the per-utterance counts are
kept so anyone can recompute it from `utterances.parquet`.
"""

from __future__ import annotations

from functools import cache

import jiwer
import numpy as np
import pandas as pd
from rapidfuzz.distance import Levenshtein

from harness.core.status import Status
from harness.core.target import REFERENCE
from harness.core.window import FULL_AUDIO_CTX
from harness.results.schema import UTTERANCE_COLUMNS

# Languages written without spaces between words: CER is their headline figure. Chinese (and
# Cantonese), Japanese, Thai, Lao, Burmese, Khmer, Tibetan; Korean separates its words, so WER.
CER_LANGUAGES = frozenset({"zh", "yue", "ja", "th", "lo", "my", "km", "bo"})
ENGLISH = "en"


def headline(language: str) -> str:
    """The error rate that leads for `language`: "cer" where words are not space-separated."""
    return "cer" if language in CER_LANGUAGES else "wer"


@cache
def normalizer(language: str = ENGLISH):  # -> a whisper.normalizers normaliser
    """The one place that picks a language's text normaliser (see the module's rules)."""
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

    if language == ENGLISH:
        return EnglishTextNormalizer()
    return BasicTextNormalizer(split_letters=language in CER_LANGUAGES)


def normalize(text: str, language: str = ENGLISH) -> str:
    out = normalizer(language)(text or "")
    return out if language == ENGLISH else out.strip()  # Basic leaves the space of a final "."


def scoring_language(task: object, ref_language: object, reference_language: object, own: object) -> str:
    """Whose rules score an utterance: English for a translation (its output is English), else the
    dataset's language, else the language the size's reference decoded it in (so every model of a
    size normalises the same reference text), else its own, else English."""
    if isinstance(task, str) and task == "translate":  # rows a failed worker left have none
        return ENGLISH
    for language in (ref_language, reference_language, own):
        if isinstance(language, str) and language:
            return language
    return ENGLISH


def _edit_counts(ref: str, hyp: str) -> tuple[int, int, int, int]:
    """(substitutions, deletions, insertions, reference words) between two normalised texts."""
    if not ref.split():  # jiwer refuses an empty reference: every hypothesis word is inserted
        return 0, 0, len(hyp.split()), 0
    out = jiwer.process_words(ref, hyp)
    return out.substitutions, out.deletions, out.insertions, len(ref.split())


def _char_errors(ref: str, hyp: str) -> tuple[int, int]:
    if not ref:
        return len(hyp), 0
    out = jiwer.process_characters(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, len(ref)


def first_divergence(hyp: list[int], ref: list[int]) -> int | None:
    """Index of the first token where hyp and ref differ; None when they are identical."""
    for i, (a, b) in enumerate(zip(hyp, ref, strict=False)):
        if a != b:
            return i
    return None if len(hyp) == len(ref) else min(len(hyp), len(ref))


def score_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw worker rows (all models) → the utterances table with every per-utterance metric."""
    df = raw.copy()
    ok = df["status"] == Status.OK
    is_reference = (df["target"] == REFERENCE) & (df["audio_ctx"] == FULL_AUDIO_CTX) & ok
    reference = df[is_reference].set_index(["size", "utt_id"])
    keys = list(zip(df["size"], df["utt_id"], strict=True))
    df["reference_tokens"] = [reference["hyp_tokens"].get(k) for k in keys]
    languages = [reference["language"].get(k) for k in keys]
    df["scoring_language"] = [
        scoring_language(*facts)
        for facts in zip(df["task"], df["ref_language"], languages, df["language"], strict=True)
    ]
    detected = [reference["detected_language"].get(k) for k in keys]
    df["language_match"] = pd.array(
        [
            a == b if isinstance(a, str) and isinstance(b, str) else None
            for a, b in zip(df["detected_language"], detected, strict=True)
        ],
        dtype="boolean",
    )
    df["ref_norm"] = [normalize(t, lang) for t, lang in zip(df["ref_text"], df["scoring_language"], strict=True)]
    df["hyp_norm"] = [
        normalize(t, lang) if isinstance(t, str) and good else None
        for t, lang, good in zip(df["hyp_text"], df["scoring_language"], ok, strict=True)
    ]
    counts = [
        _edit_counts(r, h) if isinstance(h, str) else (None, None, None, len(r.split()))
        for r, h in zip(df["ref_norm"], df["hyp_norm"], strict=True)
    ]
    df[["substitutions", "deletions", "insertions", "ref_words"]] = pd.DataFrame(counts, index=df.index, dtype="Int64")
    df["wer_errors"] = df["substitutions"] + df["deletions"] + df["insertions"]
    # CER languages' words are already characters (split_letters): their counts are the CER's
    chars = [
        (e, w) if headline(lang) == "cer" else _char_errors(r, h) if isinstance(h, str) else (None, len(r))
        for r, h, lang, e, w in zip(
            df["ref_norm"], df["hyp_norm"], df["scoring_language"], df["wer_errors"], df["ref_words"], strict=True
        )
    ]
    df[["cer_errors", "ref_chars"]] = pd.DataFrame(chars, index=df.index, dtype="Int64")

    def divergence(hyp, ref):
        if not isinstance(hyp, (list, np.ndarray)) or not isinstance(ref, (list, np.ndarray)):
            return None, None, None
        hyp, ref = list(hyp), list(ref)
        return hyp == ref, first_divergence(hyp, ref), Levenshtein.distance(hyp, ref) / max(len(ref), 1)

    div = [divergence(h, r) for h, r in zip(df["hyp_tokens"], df["reference_tokens"], strict=True)]
    df["exact_match"] = pd.array([d[0] for d in div], dtype="boolean")
    df["first_divergence"] = pd.array([d[1] for d in div], dtype="Int64")
    df["token_edit_rate"] = pd.array([d[2] for d in div], dtype="Float64")
    df["n_tokens"] = pd.array(
        [len(t) if isinstance(t, (list, np.ndarray)) else None for t in df["hyp_tokens"]], dtype="Int64"
    )
    df["n_windows"] = pd.array(df["n_windows"], dtype="Int64")
    df["total_ms"] = df["frontend_ms"] + df["encode_ms"] + df["decode_ms"]
    return df[UTTERANCE_COLUMNS]
