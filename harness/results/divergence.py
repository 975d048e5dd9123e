"""Where a converted model drifts from the reference, and which half (encoder or decoder) causes it:
the numbers, from features, logits and tokens alone (the analysis pass, `harness.run.divergence_pass`, runs
the models and hands them over), and the tables they make.

`divergence.parquet`: one row per (candidate model, utterance), columns `DIVERGENCE_COLUMNS`:
- `status` (a `Status` value) and `error`: `ok`, or `unavailable` (long-form items: the analysis
  covers one-window items; an utterance the reference or the candidate did not transcribe in the
  main pass) / `error` / `worker failed` with the reason. `note`: why a part of an `ok` row is
  missing (e.g. a hybrid the candidate's runner cannot take).
- `encoder_snr_db`: 10·log10(Σ ref² / Σ (ref - cand)²) of the two encoders' outputs on the same
  log-mel (`converters.parity.snr_db`); +inf when they are identical (kept as inf: a model's mean
  is then inf, its minimum still says how far the worst utterance is).
- Teacher-forced (`tf_*`): both decoders, each on its own encoder's output, are fed the prompt,
  the reference's text tokens and EOT (at most the prompt's step limit), one step per token as the
  loop feeds them. On **raw** logits, before any suppression rule: what each model computes,
  independent of decoding rules (a wrong logit of a suppressed token is still a conversion error).
  `tf_steps`; `tf_top1_agree` steps whose argmax agree, `tf_top1_agreement` = agree / steps;
  `tf_max_abs_dlogit` over steps and vocabulary; `tf_mean_kl` / `tf_max_kl` over steps of
  KL(p_ref ‖ p_cand) = Σ p_ref·(log p_ref - log p_cand), softmax in float64, nats.
- `exact_match`: the candidate's own transcript (the main pass's tokens) equals the reference's.
- Hybrids, greedy through the shared loop (`harness.core.decoding.decode_window`; an engine that
  decodes itself uses its own `generate` with the same `Prompt`): `hybrid_cand_encoder_*` =
  candidate encoder + reference decoder, `hybrid_cand_decoder_*` = reference encoder + candidate
  decoder; `_tokens` and `_exact` (equal to the reference's tokens), null (with a `note`) where a
  runner's features cannot be swapped (`features_like`).
- At the first divergent token (only where `exact_match` is false): `first_divergence` (index into
  the text tokens, `harness.results.scoring.first_divergence`; also the teacher-forced step that predicts
  it); `ref_token_id`/`cand_token_id` and `ref_token`/`cand_token` (decoded text; EOT where one
  transcript ended); `ref_top5`/`cand_top5`: lists of `{"id": int, "token": str, "p": float}`,
  likeliest first, from that step's teacher-forced logits (the prefix is the shared one, so these
  are the logits each model's own loop saw there) **after** the loop's suppression rules, softmax
  renormalised over what may be sampled: their first entry is the token each model chose;
  `common_prefix_text` + `ref_continuation` is the reference's text, + `cand_continuation` the
  candidate's (decoded, not stripped, so the pieces join exactly).
- Layer drift (`converters.layer_drift`, candidates whose runtime gives its block outputs: null
  elsewhere): `layer_drift`, a list of `{"block", "snr_db", "max_abs_err"}` in data-flow order
  (each encoder block's output; each decoder block's at the first divergent step, or at the last
  token where the transcripts agree), on every divergent utterance and on the agreeing ones that
  `converters.layer_drift.sampled` picks; `first_drift_block` the first below the target's parity
  bar for encoder SNR at this quantization, null when every block holds.

`divergence.csv` / `.md`: one row per candidate model (`summarize_divergence`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from converters.parity import snr_db
from harness.core.decoding import Prompt, suppress
from harness.core.status import Status
from harness.job.spec import ModelCell
from harness.results.scoring import first_divergence

TOP_K = 5
# a half "causes" a model's divergence when its hybrid diverges on at least this many times as many
# utterances as the other half's hybrid (else: both)
DOMINANCE = 2.0

# one row of divergence.parquet (`run_id` is added when the run's shards are put together): name → dtype
ROW_COLUMNS: dict[str, str] = {
    "utt_id": "string", "size": "string", "target": "string", "quant": "string",
    "status": "string", "error": "string", "note": "string", "encoder_snr_db": "Float64",
    "tf_steps": "Int64", "tf_top1_agree": "Int64", "tf_top1_agreement": "Float64", "tf_max_abs_dlogit": "Float64",
    "tf_mean_kl": "Float64", "tf_max_kl": "Float64", "exact_match": "boolean",
    "hybrid_cand_encoder_exact": "boolean", "hybrid_cand_decoder_exact": "boolean",
    "hybrid_cand_encoder_tokens": "object", "hybrid_cand_decoder_tokens": "object",
    "first_divergence": "Int64", "ref_token_id": "Int64", "cand_token_id": "Int64",
    "ref_token": "string", "cand_token": "string", "ref_top5": "object", "cand_top5": "object",
    "common_prefix_text": "string", "ref_continuation": "string", "cand_continuation": "string",
    "layer_drift": "object", "first_drift_block": "string",
}  # fmt: skip
DIVERGENCE_COLUMNS = ["run_id", *ROW_COLUMNS]


def divergence_row(cell: ModelCell, utt_id: str, status: Status, reason: str | None = None, **facts: Any) -> dict:
    """One row: an analysed utterance (`facts`) or one without analysis (`reason`)."""
    unknown = set(facts) - set(ROW_COLUMNS)
    assert not unknown, f"not divergence columns: {unknown}"
    values = dict.fromkeys(ROW_COLUMNS)
    values.update(utt_id=utt_id, size=cell.size, target=cell.target, quant=cell.quant, **facts)
    values.update(status=Status(status).value, error=reason)
    return values


def failure_row(cell: ModelCell, utt_id: str, text: str, status: Status, reason: str, attempt: int) -> dict:
    """The scheduler's row for an utterance no analysis worker could do (`harness.run.scheduler.FailureRow`)."""
    return divergence_row(cell, utt_id, status, reason)


def divergence_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    return frame.astype({c: t for c, t in ROW_COLUMNS.items() if t != "object"})


# -- features --------------------------------------------------------------------------------------


def features_array(features: Any) -> np.ndarray | None:
    """An encoder's output as a float32 array in openai-whisper's layout [1, n_audio_ctx, d]: a
    numpy array, a torch tensor, or anything with an array interface (CTranslate2's StorageView,
    the ANE form's EncoderOutput); None when it has none."""
    try:
        return np.asarray(features, dtype=np.float32)
    except (TypeError, ValueError, RuntimeError):
        return None


def features_like(array: np.ndarray, own: Any) -> Any | None:
    """`array` in the form a runner's own encoder output `own` has, so its decoder takes it in place
    of its own: a numpy array or a torch tensor of the same shape (in `own`'s dtype); None for any
    other form (a runner's private object, e.g. CTranslate2's StorageView)."""
    import torch

    if getattr(own, "shape", None) is None or tuple(own.shape) != array.shape:
        return None
    if isinstance(own, np.ndarray):
        return array.astype(own.dtype)
    if isinstance(own, torch.Tensor):
        return torch.from_numpy(array).to(own.dtype)
    return None


def encoder_snr(reference: Any, candidate: Any) -> tuple[float | None, str | None]:
    """SNR in dB of the candidate's encoder output against the reference's, or None and why not."""
    ref, cand = features_array(reference), features_array(candidate)
    if cand is None:
        return None, f"encoder SNR: the candidate's encoder output ({type(candidate).__name__}) is not an array"
    if ref is None or ref.shape != cand.shape:
        shape = None if ref is None else ref.shape
        return None, f"encoder SNR: the candidate's encoder output is {cand.shape}, the reference's {shape}"
    return float(snr_db(ref, cand)), None


# -- teacher-forced logits -------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float64; -inf entries (masked tokens) get probability 0."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """KL(p_ref ‖ p_cand) in nats of the softmaxes of two raw logit vectors."""
    lr, lc = log_softmax(reference), log_softmax(candidate)
    return float(np.sum(np.exp(lr) * (lr - lc)))


def teacher_forced_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """The `tf_*` columns from both models' raw logits at each teacher-forced step, [steps, n_vocab]."""
    if reference.shape != candidate.shape or reference.ndim != 2 or not len(reference):
        raise ValueError(f"teacher-forced logits differ in shape: {reference.shape} and {candidate.shape}")
    agree = int(np.sum(reference.argmax(axis=-1) == candidate.argmax(axis=-1)))
    # step by step: a whole [steps, vocab] matrix in float64 would cost ~100 MB at the step limit
    kl = [kl_divergence(r, c) for r, c in zip(reference, candidate, strict=True)]
    dlogit = max(float(np.max(np.abs(r.astype(np.float64) - c))) for r, c in zip(reference, candidate, strict=True))
    return {
        "tf_steps": len(reference),
        "tf_top1_agree": agree,
        "tf_top1_agreement": agree / len(reference),
        "tf_max_abs_dlogit": dlogit,
        "tf_mean_kl": float(np.mean(kl)),
        "tf_max_kl": float(np.max(kl)),
    }


def teacher_targets(reference_tokens: Sequence[int], prompt: Prompt) -> list[int]:
    """The tokens the teacher-forced steps predict: the reference's text tokens and EOT, within the
    prompt's step limit (a transcript cut by the limit has no EOT)."""
    return [*reference_tokens, prompt.eot][: prompt.step_limit]


def top_choices(logits: np.ndarray, prompt: Prompt, step: int, k: int = TOP_K) -> list[tuple[int, float]]:
    """The `k` likeliest tokens at text step `step` under the loop's suppression rules, with their
    probability (softmax over what may be sampled); the first is the loop's greedy choice (ties:
    the lower id, as argmax)."""
    x = np.array(logits, dtype=np.float32, copy=True)
    suppress(x, prompt, first_step=step == 0)
    order = np.argsort(-x, kind="stable")[:k]
    p = np.exp(log_softmax(x))
    return [(int(i), float(p[i])) for i in order]


def divergence_facts(
    reference_tokens: Sequence[int],
    candidate_tokens: Sequence[int],
    reference_logits: np.ndarray,
    candidate_logits: np.ndarray,
    prompt: Prompt,
    decode: Callable[[list[int]], str],
) -> dict[str, Any]:
    """The first divergent token's columns ({} when the transcripts are identical), from the
    teacher-forced logits [steps, n_vocab] of both models."""
    ref, cand = list(reference_tokens), list(candidate_tokens)
    k = first_divergence(cand, ref)
    if k is None:
        return {}
    ref_id = ref[k] if k < len(ref) else prompt.eot
    cand_id = cand[k] if k < len(cand) else prompt.eot
    facts: dict[str, Any] = {
        "first_divergence": k,
        "ref_token_id": ref_id,
        "cand_token_id": cand_id,
        "ref_token": decode([ref_id]),
        "cand_token": decode([cand_id]),
        "common_prefix_text": decode(ref[:k]),
        "ref_continuation": decode(ref[k:]),
        "cand_continuation": decode(cand[k:]),
    }
    if k < len(reference_logits):  # always, unless the reference was cut by the step limit there
        for name, logits in (("ref_top5", reference_logits), ("cand_top5", candidate_logits)):
            facts[name] = [{"id": i, "token": decode([i]), "p": p} for i, p in top_choices(logits[k], prompt, k)]
    return facts


# -- per model -------------------------------------------------------------------------------------


def verdict(full_exact: Sequence[bool], cand_encoder_exact: Sequence[bool], cand_decoder_exact: Sequence[bool]) -> str:
    """Which half makes a model diverge.

    `full_exact`: per utterance, whether the candidate's own transcript equals the reference's;
    the hybrids' (`cand_encoder_exact`: candidate encoder + reference decoder, `cand_decoder_exact`:
    reference encoder + candidate decoder) over the utterances that have both. `-`: nothing to
    judge by; `none`: every transcript equal; `unknown`: it diverges, and no utterance has both
    hybrids. Otherwise, with e and d the utterances each hybrid gets wrong: `encoder` when
    e ≥ DOMINANCE·d (and e > 0), `decoder` when d ≥ DOMINANCE·e (and d > 0), else `both` —
    including when neither half alone diverges and only the two together do.
    """
    if not len(full_exact):
        return "-"
    if all(full_exact):
        return "none"
    if not len(cand_encoder_exact) or not len(cand_decoder_exact):
        return "unknown"
    e = sum(not x for x in cand_encoder_exact)
    d = sum(not x for x in cand_decoder_exact)
    if e > 0 and e >= DOMINANCE * d:
        return "encoder"
    if d > 0 and d >= DOMINANCE * e:
        return "decoder"
    return "both"


HYBRIDS = ("hybrid_cand_encoder_exact", "hybrid_cand_decoder_exact")
# divergence.csv's columns, one row per candidate model
SUMMARY_COLUMNS = [
    "size", "target", "quant", "n", "analysed", "encoder_snr_mean_db", "encoder_snr_min_db", "tf_steps",
    "tf_top1_agreement", "tf_max_abs_dlogit", "tf_mean_kl", "tf_max_kl", "exact_match", "exact_cand_encoder",
    "exact_cand_decoder", "verdict", "drift_analysed", "first_drift_block", "reason",
]  # fmt: skip


def summarize_divergence(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per candidate model over divergence.parquet's rows: `n` all of them, `analysed` the
    `ok` ones, which the numbers are over.

    Encoder SNR: mean and minimum of the utterances' dB; teacher-forced top-1 agreement Σagree /
    Σsteps, mean KL per step over every step (step-weighted), the maxima over utterances; each
    exact share over the utterances that have that run; the verdict (`verdict`); `reason`: how many
    rows were not analysed, and the commonest reason.
    """
    out = []
    for (size, target, quant), g in rows.groupby(["size", "target", "quant"], sort=False):
        ok = g[g["status"] == Status.OK]
        snr = ok["encoder_snr_db"].dropna().astype(float)
        steps = int(ok["tf_steps"].sum())
        both = ok.dropna(subset=list(HYBRIDS))
        call = verdict(list(ok["exact_match"].astype(bool)), *(list(both[h].astype(bool)) for h in HYBRIDS))
        failed = g[g["status"] != Status.OK]
        reasons = failed["error"].value_counts()
        out.append(
            {
                "size": size,
                "target": target,
                "quant": quant,
                "n": len(g),
                "analysed": len(ok),
                "encoder_snr_mean_db": float(snr.mean()) if len(snr) else float("nan"),
                "encoder_snr_min_db": float(snr.min()) if len(snr) else float("nan"),
                "tf_steps": steps,
                "tf_top1_agreement": int(ok["tf_top1_agree"].sum()) / steps if steps else float("nan"),
                "tf_max_abs_dlogit": _max(ok["tf_max_abs_dlogit"]),
                "tf_mean_kl": float((ok["tf_mean_kl"] * ok["tf_steps"]).sum()) / steps if steps else float("nan"),
                "tf_max_kl": _max(ok["tf_max_kl"]),
                "exact_match": _share(ok["exact_match"]),
                "exact_cand_encoder": _share(ok["hybrid_cand_encoder_exact"]),
                "exact_cand_decoder": _share(ok["hybrid_cand_decoder_exact"]),
                "verdict": call,
                **drift_summary(ok),
                "reason": f"{len(failed)} not analysed, e.g. {reasons.index[0]}" if len(failed) else "",
            }
        )
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def drift_summary(ok: pd.DataFrame) -> dict[str, Any]:
    """A model's layer drift over its analysed utterances: how many had it measured, and the block
    most often first below the target's bar ("none": every block held on every one of them)."""
    measured = ok[ok["layer_drift"].notna()] if "layer_drift" in ok else ok.iloc[:0]
    firsts = measured["first_drift_block"].dropna() if len(measured) else pd.Series(dtype=object)
    first = str(firsts.mode().iloc[0]) if len(firsts) else ("none" if len(measured) else "")
    return {"drift_analysed": len(measured), "first_drift_block": first}


def _max(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.max()) if len(values) else float("nan")


def _share(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.astype(float).mean()) if len(values) else float("nan")


def format_divergence(summary: pd.DataFrame) -> str:
    """The per-model table `run` prints after its summary, reasons for rows not analysed under it."""
    from tabulate import tabulate

    shown = summary.drop(columns="reason").rename(
        columns={
            "encoder_snr_mean_db": "enc_snr_mean_db",
            "encoder_snr_min_db": "enc_snr_min_db",
            "exact_match": "exact full",
            "exact_cand_encoder": "exact cand-enc+ref-dec",
            "exact_cand_decoder": "exact ref-enc+cand-dec",
        }
    )
    for col in ("tf_top1_agreement", "exact full", "exact cand-enc+ref-dec", "exact ref-enc+cand-dec"):
        shown[col] = shown[col].map(lambda v: f"{100 * v:.2f}%" if v == v else "-")
    for col in ("enc_snr_mean_db", "enc_snr_min_db"):
        shown[col] = shown[col].map(lambda v: f"{v:.1f}" if v == v else "-")
    for col in ("tf_max_abs_dlogit", "tf_mean_kl", "tf_max_kl"):
        shown[col] = shown[col].map(lambda v: f"{v:.3g}" if v == v else "-")
    notes = [
        f"- {size}/{target}/{quant}: {reason}"
        for size, target, quant, reason in zip(
            summary["size"], summary["target"], summary["quant"], summary["reason"], strict=True
        )
        if reason
    ]
    table = tabulate(shown, headers="keys", tablefmt="github", showindex=False)
    return table + ("\n\n" + "\n".join(notes) if notes else "")
