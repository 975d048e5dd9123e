"""Scoring: normalise, WER/CER, token divergence, per utterance — where rows are decoded.

Each worker scores its own rows as it makes them (`score_row`: the text metrics need only the row),
so the driver never normalises or aligns a million texts after the cluster is done. What needs the
reference's row of the same utterance — its tokens (exact match, first divergent token, token edit
rate), its detected language, and the language whose rules score a row when the dataset gives none
— is added afterwards, shard by shard (`compare_with_reference`), by the driver, without holding
every row (`harness.results.aggregate`). `score_rows` is both steps on a frame.

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


# what `score_row` adds to a raw row: computed from the row alone, on the worker
TEXT_SCORES = (
    "ref_norm", "hyp_norm", "substitutions", "deletions", "insertions", "ref_words", "wer_errors",
    "cer_errors", "ref_chars",
)  # fmt: skip


def text_scores(ref_text: str, hyp_text: object, language: str) -> dict[str, object]:
    """A transcript's error counts against its reference text under `language`'s rules; a row
    without a transcript (`hyp_text` not a string) has only its reference's size."""
    ref = normalize(ref_text, language)
    if not isinstance(hyp_text, str):
        return dict.fromkeys(TEXT_SCORES) | {"ref_norm": ref, "ref_words": len(ref.split()), "ref_chars": len(ref)}
    hyp = normalize(hyp_text, language)
    s, d, i, words = _edit_counts(ref, hyp)
    # CER languages' words are already characters (split_letters): their counts are the CER's
    chars = (s + d + i, words) if headline(language) == "cer" else _char_errors(ref, hyp)
    return {
        "ref_norm": ref, "hyp_norm": hyp, "substitutions": s, "deletions": d, "insertions": i,
        "ref_words": words, "wer_errors": s + d + i, "cer_errors": chars[0], "ref_chars": chars[1],
    }  # fmt: skip


def score_row(row: dict[str, object], reference_language: object = None) -> dict[str, object]:
    """A raw row with its text metrics, its token count and total time: what a worker adds to each
    row it makes. `reference_language`: the language the size's reference decoded the utterance in,
    when known (`scoring_language`); the driver re-scores a row whose rules it changes."""
    ok = row["status"] == Status.OK
    language = scoring_language(row["task"], row["ref_language"], reference_language, row["language"])
    tokens = row["hyp_tokens"]
    times = [row.get(k) for k in ("frontend_ms", "encode_ms", "decode_ms")]
    return {
        **row,
        "scoring_language": language,
        **text_scores(str(row["ref_text"] or ""), row["hyp_text"] if ok else None, language),
        "n_tokens": len(tokens) if isinstance(tokens, (list, tuple, np.ndarray)) else None,
        "total_ms": sum(float(t) for t in times) if all(_number(t) for t in times) else None,
    }


def _number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and value == value


def compare_with_reference(rows: pd.DataFrame) -> pd.DataFrame:
    """Scored rows of every model for some utterances (a shard's, or several shards') → with what
    needs the reference's row of the same utterance: its tokens and the token divergence against
    them, language-detection agreement, and — where the dataset names no language — the reference's
    language as the scoring rules (a row scored otherwise on its worker is scored again here, the
    same way). Column-wise where it can be: the driver runs it over every row of a night."""
    df = rows.reset_index(drop=True)
    ok = df["status"] == Status.OK
    is_reference = ((df["target"] == REFERENCE) & (df["audio_ctx"] == FULL_AUDIO_CTX) & ok).to_numpy(dtype=bool)
    facts = ["hyp_tokens", "language", "detected_language"]
    reference = df.loc[is_reference, ["size", "utt_id", *facts]].drop_duplicates(["size", "utt_id"])
    joined = df[["size", "utt_id"]].merge(
        reference.rename(columns={c: f"ref_{c}" for c in facts}), on=["size", "utt_id"], how="left"
    )
    df["reference_tokens"] = joined["ref_hyp_tokens"].to_numpy()
    languages = joined["ref_language"].astype(object).where(joined["ref_language"].notna(), None).to_numpy()
    wanted = _scoring_languages(df, languages)
    for position in np.flatnonzero(wanted != df["scoring_language"].to_numpy(dtype=object)):
        rescored = score_row(df.iloc[position].to_dict(), languages[position])
        columns = ("scoring_language", *TEXT_SCORES)
        df.iloc[position, [df.columns.get_loc(c) for c in columns]] = [rescored[c] for c in columns]
    own, theirs = df["detected_language"], joined["ref_detected_language"]
    both = (own.notna() & theirs.notna()).to_numpy(dtype=bool)
    match = pd.array([None] * len(df), dtype="boolean")
    match[both] = own.to_numpy(dtype=object)[both] == theirs.to_numpy(dtype=object)[both]
    df["language_match"] = match
    div = [_divergence(h, r) for h, r in zip(df["hyp_tokens"], df["reference_tokens"], strict=True)]
    df["exact_match"] = pd.array([d[0] for d in div], dtype="boolean")
    df["first_divergence"] = pd.array([d[1] for d in div], dtype="Int64")
    df["token_edit_rate"] = pd.array([d[2] for d in div], dtype="Float64")
    return df


def _scoring_languages(df: pd.DataFrame, reference_languages: np.ndarray) -> np.ndarray:
    """`scoring_language` of every row, column-wise (the same rules, in the same order)."""
    out = np.full(len(df), ENGLISH, dtype=object)
    for column in (df["language"], reference_languages, df["ref_language"]):  # the last given wins
        values = np.asarray(column, dtype=object)
        given = np.array([isinstance(v, str) and bool(v) for v in values], dtype=bool)
        out[given] = values[given]
    out[np.array([t == "translate" if isinstance(t, str) else False for t in df["task"]], dtype=bool)] = ENGLISH
    return out


def _divergence(hyp: object, ref: object) -> tuple[bool | None, int | None, float | None]:
    """(identical, first divergent token, token edit rate) of a row's tokens against its reference's."""
    if not isinstance(hyp, (list, np.ndarray)) or not isinstance(ref, (list, np.ndarray)):
        return None, None, None
    hyp, ref = np.asarray(hyp, dtype=np.int64), np.asarray(ref, dtype=np.int64)
    if hyp.shape == ref.shape and hyp.tobytes() == ref.tobytes():  # most rows: no need to align
        return True, None, 0.0
    hyp_list, ref_list = hyp.tolist(), ref.tolist()
    return False, first_divergence(hyp_list, ref_list), Levenshtein.distance(hyp_list, ref_list) / max(len(ref), 1)


def score_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw rows (all models, with `run_id`) → the utterances table with every per-utterance metric:
    `score_row` on each (what workers do), then `compare_with_reference`."""
    from harness.results.run_dir import scored_frame

    scored = scored_frame([score_row(r) for r in raw.to_dict("records")]).assign(run_id=raw["run_id"].to_numpy())
    return typed_utterances(compare_with_reference(scored))


def typed_utterances(df: pd.DataFrame) -> pd.DataFrame:
    """The utterances table's columns, in order, with their dtypes."""
    from harness.results.schema import UTTERANCE_DTYPES

    return df[UTTERANCE_COLUMNS].astype(UTTERANCE_DTYPES)
