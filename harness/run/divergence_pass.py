"""The divergence analysis pass (job setting `analysis: {divergence: true}`), after the main pass.

It needs the reference's tokens, so it runs once every main-pass row exists: per candidate model
(every model of the job but the reference) and utterance, a worker holding both the candidate's
and the reference's runner encodes the utterance with both, teacher-forces both decoders on the
reference's tokens, decodes the two hybrids and finds the first divergent token
(`harness.results.divergence` computes the numbers and documents every column). It runs on the same
scheduler as the main pass, as a pass of its own (`harness.run.passes`) with `DivergenceWorker` for
`ModelWorker`: same slots, placement, retries and failure rows; the workers get both artifacts
through the node cache (`harness.run.node_cache`), never a driver path.

Each finished (model, shard) is persisted at once in `<run dir>/divergence/`, as the main pass's
rows are in `raw/`, so `--resume` re-plans only the analysis shards that are missing. Then
`divergence.parquet`, `divergence.csv` and `divergence.md` are written beside `utterances.parquet`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from converters import layer_drift
from converters.registry import get_target
from harness.core.audio import log_mel
from harness.core.decoding import LONG_FORM, DecodingOptions, Dims, Prompt, build_prompt, decode_window, tokenizer_for
from harness.core.errors import one_line
from harness.core.status import Status
from harness.core.target import REFERENCE, Runner, Unavailable
from harness.core.weights import load_model
from harness.core.window import FULL_AUDIO_CTX
from harness.job.spec import JobSpec, ModelCell
from harness.results.divergence import (
    DIVERGENCE_COLUMNS,
    divergence_facts,
    divergence_frame,
    divergence_row,
    encoder_snr,
    failure_row,
    features_array,
    features_like,
    summarize_divergence,
    teacher_forced_metrics,
    teacher_targets,
)
from harness.results.run_dir import RunDir, write_parquet_atomic
from harness.results.run_info import PassReport
from harness.results.timing import prepare_worker_threads
from harness.run.dataset import Rows, Shard, plan_shards
from harness.run.node_cache import PublishedArtifact, materialise
from harness.run.passes import Pass, PreparedModel, serving
from harness.run.scheduler import Index, Work
from harness.run.worker import Loaded, load_runner, node_name

DIVERGENCE = "divergence"  # the run directory's folder of per-(model, shard) analysis rows


@dataclass(frozen=True)
class Transcripts:
    """What the main pass decoded of one utterance: the analysis's inputs."""

    reference: tuple[int, ...]
    candidate: tuple[int, ...]


@dataclass(frozen=True)
class AnalysisSetup:
    cell: ModelCell  # the candidate
    candidate: PublishedArtifact
    reference: PublishedArtifact
    dims: Dims
    prompt: Prompt
    decoding: DecodingOptions
    rows: Rows
    # per utterance id of the shards to do: its transcripts, or why it is not analysed
    inputs: Mapping[str, Transcripts | str]
    threads: int


def teacher_forced(runner: Runner, features: Any, prompt: Prompt, targets: Sequence[int]) -> np.ndarray:
    """Raw logits [len(targets), n_vocab]: step i sees the prompt and targets[:i], fed as the greedy
    loop feeds them (the prompt in the first call, then one token per call on the runner's cache)."""
    tokens, cache, out = list(prompt.tokens), None, []
    for target in targets:
        logits, cache = runner.step(tokens, features, cache)
        out.append(np.array(logits, dtype=np.float32, copy=True))  # a runner may reuse its output buffer
        tokens.append(target)
    return np.stack(out)


def _hybrid(decoder: Runner, features: Any, own: Any, prompt: Prompt, what: str) -> tuple[list[int] | None, str | None]:
    """Greedy tokens of `decoder` on another encoder's `features`, in the form of its `own` (None and why not)."""
    array = features_array(features)
    swapped = None if array is None else features_like(array, own)
    if swapped is None:
        return None, (
            f"{what}: not available: this decoder takes its own encoder's output, a {type(own).__name__}, and "
            f"only a numpy array or torch tensor of the same shape can be swapped for the other's "
            f"({type(features).__name__})"
        )
    return list(decode_window(decoder, swapped, prompt)[0]), None


def analyse(
    reference: Runner,
    candidate: Runner,
    audio: np.ndarray,
    dims: Dims,
    prompt: Prompt,
    transcripts: Transcripts,
    decode: Callable[[list[int]], str],
) -> dict[str, Any]:
    """One utterance's divergence columns (`harness.results.divergence`), from both runners."""
    mel = log_mel(audio, dims.n_mels)
    ref_features, cand_features = reference.encode(mel), candidate.encode(mel)
    snr, snr_note = encoder_snr(ref_features, cand_features)
    targets = teacher_targets(transcripts.reference, prompt)
    ref_logits = teacher_forced(reference, ref_features, prompt, targets)
    cand_logits = teacher_forced(candidate, cand_features, prompt, targets)
    enc_tokens, enc_note = _hybrid(
        reference, cand_features, ref_features, prompt, "candidate encoder + reference decoder"
    )
    dec_tokens, dec_note = _hybrid(
        candidate, ref_features, cand_features, prompt, "reference encoder + candidate decoder"
    )
    reference_tokens = list(transcripts.reference)
    notes = [n for n in (snr_note, enc_note, dec_note) if n]
    return {
        "encoder_snr_db": snr,
        **teacher_forced_metrics(ref_logits, cand_logits),
        "exact_match": list(transcripts.candidate) == reference_tokens,
        "hybrid_cand_encoder_tokens": enc_tokens,
        "hybrid_cand_encoder_exact": None if enc_tokens is None else enc_tokens == reference_tokens,
        "hybrid_cand_decoder_tokens": dec_tokens,
        "hybrid_cand_decoder_exact": None if dec_tokens is None else dec_tokens == reference_tokens,
        **divergence_facts(transcripts.reference, transcripts.candidate, ref_logits, cand_logits, prompt, decode),
        "note": "; ".join(notes) or None,
    }


class DivergenceWorker(Loaded):
    """Holds a candidate and its reference; the analysis pass's `ModelWorker` (a plain class, made
    an actor by the scheduler's cluster, testable without Ray)."""

    def __init__(self, setup: AnalysisSetup) -> None:
        started = time.perf_counter()
        prepare_worker_threads(setup.threads)
        self.setup = setup
        self.reference = load_runner(setup.reference, setup.threads)
        self.candidate = load_runner(setup.candidate, setup.threads)
        self.tokenizer = tokenizer_for(setup.dims, setup.decoding)
        self.node = node_name()
        # layer drift, where the candidate's runtime gives its blocks: the artifact on this node and
        # openai-whisper's model of its checkpoint (loaded on first use: most utterances agree)
        self.artifact = materialise(setup.candidate) if setup.cell.target in layer_drift.PROBED else None
        self.whisper: Any = None
        self.probe: layer_drift.Probe | None = None
        setup.rows.open()
        self.load_s = time.perf_counter() - started

    def run_shard(self, shard: Shard, skip: int = 0, attempt: int = 0) -> Iterator[dict[str, Any]]:
        """One row per utterance of `shard`, after the first `skip` (a retry's rows already in)."""
        s, cell = self.setup, self.setup.cell
        for utt in s.rows.read(Shard(shard.index, shard.start + skip, shard.stop)):
            given = s.inputs[utt.utt_id]
            if isinstance(given, str):
                yield divergence_row(cell, utt.utt_id, Status.UNAVAILABLE, given)
            elif utt.audio is None:
                yield divergence_row(cell, utt.utt_id, Status.ERROR, utt.error)
            else:
                try:
                    facts = analyse(self.reference, self.candidate, utt.audio, s.dims, s.prompt, given, self._decode)
                    drift, why = self._drift(utt.utt_id, utt.audio, given, facts.get("first_divergence"))
                    facts.update(drift)
                    if why:  # the rest of the analysis stands without it
                        facts["note"] = "; ".join(n for n in (facts["note"], why) if n)
                except Exception as exc:  # one utterance's failure is its row, never the run's
                    yield divergence_row(cell, utt.utt_id, Status.ERROR, f"analysis failed: {one_line(exc)}")
                    continue
                yield divergence_row(cell, utt.utt_id, Status.OK, **facts)

    def _drift(
        self, utt_id: str, audio: np.ndarray, given: Transcripts, step: int | None
    ) -> tuple[dict[str, Any], str | None]:
        """The layer-drift columns of a divergent utterance, or of a sampled agreeing one (none
        else), and why they are missing where the artifact cannot give them."""
        if self.artifact is None or (step is None and not layer_drift.sampled(utt_id)):
            return {}, None
        if self.probe is None:  # both loaded at the first utterance measured
            try:
                self.probe = layer_drift.probe_for(self.artifact, self.setup.threads)
            except Unavailable as exc:
                return {}, f"layer drift: {exc}"
            self.whisper = load_model(self.artifact.checkpoint()).eval()
        s = self.setup
        fed = [*s.prompt.tokens, *(given.reference if step is None else given.reference[:step])]
        mel = log_mel(audio, s.dims.n_mels, s.dims.n_audio_ctx)
        threshold = layer_drift.threshold_for(s.cell.target, s.cell.quant)
        drift = layer_drift.measure(self.artifact, self.whisper, mel, fed, threshold, self.probe)
        first = drift.first
        return {
            "layer_drift": [asdict(b) for b in drift.blocks],
            "first_drift_block": first.block if first else None,
        }, None

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)


# -- the driver's side -----------------------------------------------------------------------------

# the analysis as a pass: its rows in divergence/, a row per candidate model and utterance
ANALYSIS = Pass(
    "divergence analysis", DIVERGENCE, DivergenceWorker, divergence_frame, failure_row, ("size", "target", "quant")
)


def analysed(cell: ModelCell) -> bool:
    """Whether the analysis covers a model: every candidate at the full audio context (one at a
    trimmed context has an encoder output of another shape than the reference's)."""
    return cell.target != REFERENCE and cell.audio_ctx == FULL_AUDIO_CTX


def transcripts_of(raw: pd.DataFrame, cell: ModelCell) -> dict[str, Transcripts | str]:
    """Per utterance id: the reference's and the candidate's tokens from the main pass's rows, or
    why the utterance is not analysed."""
    rows = raw[(raw["size"] == cell.size) & (raw["audio_ctx"] == cell.audio_ctx)]
    ref = rows[rows["target"] == REFERENCE].set_index("utt_id")
    cand = rows[(rows["target"] == cell.target) & (rows["quant"] == cell.quant)].set_index("utt_id")
    out: dict[str, Transcripts | str] = {}
    for utt_id, c in cand.iterrows():
        r = ref.loc[utt_id]
        if r["status"] != Status.OK:
            out[utt_id] = f"the reference has no transcript of it ({r['status']}: {r['error']})"
        elif c["status"] != Status.OK:
            out[utt_id] = f"the candidate has no transcript of it ({c['status']}: {c['error']})"
        elif LONG_FORM in (r["decoding"], c["decoding"]):
            out[utt_id] = "decoded in long form (30 s windows): the analysis covers one-window (short-form) items"
        else:
            out[utt_id] = Transcripts(tuple(int(t) for t in r["hyp_tokens"]), tuple(int(t) for t in c["hyp_tokens"]))
    return out


def run_divergence(
    spec: JobSpec, models: Sequence[PreparedModel], run: RunDir, raw: pd.DataFrame, rows: Rows, progress: bool, log
) -> PassReport:
    """Analyse every (candidate model, shard) without a file in `divergence/`, from the main pass's
    rows `raw`; returns the scheduler's report (nodes, workers, failures)."""
    ids, texts = rows.index()
    shards = plan_shards(rows.sizes, spec.cluster.shard_size)
    references = {p.cell.size: p for p in models if p.cell.target == REFERENCE}
    with serving() as server:
        work = []
        for p in models:
            todo = ANALYSIS.todo(run, p.cell, shards) if analysed(p.cell) else ()
            if not todo:
                continue
            inputs = transcripts_of(raw, p.cell)
            runnable = []
            for s in todo:
                given = {ids[i]: inputs[ids[i]] for i in range(s.start, s.stop)}
                if any(isinstance(g, Transcripts) for g in given.values()):
                    runnable.append(s)
                else:  # nothing to analyse: its rows are written here, without a worker
                    rows = [divergence_row(p.cell, u, Status.UNAVAILABLE, str(g)) for u, g in given.items()]
                    ANALYSIS.persist(run, p.cell, s, rows)
            if not runnable:
                continue
            setup = AnalysisSetup(
                p.cell,
                server.publish(p),
                server.publish(references[p.cell.size]),
                p.dims,
                build_prompt(p.dims, spec.decoding),
                spec.decoding,
                rows,
                {ids[i]: inputs[ids[i]] for s in runnable for i in range(s.start, s.stop)},
                spec.cluster.threads,
            )
            work.append(Work(setup, tuple(runnable), get_target(p.cell.target).resource))
        if not work:
            return PassReport()
        log(f"divergence analysis: {len(work)} models, {sum(len(w.shards) for w in work)} shards")
        return ANALYSIS.schedule(run, work, spec.cluster, lambda: (ids, texts), progress, log)


def write_divergence(run: RunDir, candidates: Sequence[ModelCell], n_rows: int, index: Index) -> pd.DataFrame:
    """divergence.parquet (every analysis row, with the run id), divergence.csv and .md (per model);
    returns the per-model table. Exactly one row per (candidate, utterance), or it raises
    (`Pass.check_complete`)."""
    from harness.results.divergence import format_divergence

    rows = ANALYSIS.rows(run)
    ANALYSIS.check_complete(rows, candidates, n_rows, index)
    rows = rows.assign(run_id=run.run_id)[DIVERGENCE_COLUMNS]
    summary = summarize_divergence(rows)
    write_parquet_atomic(rows, run.path / "divergence.parquet")
    summary.to_csv(run.path / "divergence.csv", index=False)
    (run.path / "divergence.md").write_text(format_divergence(summary) + "\n")
    return summary
