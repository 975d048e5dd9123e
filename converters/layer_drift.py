"""The first layer that drifts: each encoder block's output, and each decoder block's output at one
decoding step, of a converted artifact against openai-whisper's own, as SNR and max |Δ| per block.

The reference's blocks are read with forward hooks on `whisper.model.Whisper` (the encoder on the
mel; the decoder on the whole token sequence, no cache, its last position). A candidate's are
read from its own runtime, by names fixed when it was converted (the manifest's `probes`: block →
the graph's tensor holding that block's output), never guessed at analysis time. The candidate's
decoder runs on its own encoder's output, as it does when it transcribes, so a block's SNR
measures what reaches it, drift from earlier blocks included; the first block below the
threshold is where it starts.

Runtimes that give their tensors: ONNX Runtime (the probes become graph outputs of a session made
for the analysis) and ExecuTorch (its programs return the blocks' outputs after their own,
`converters.executorch_target.Probed`). Other targets raise `Unavailable` with the reason.
"""

from __future__ import annotations

import ast
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.parity import snr_db
from harness.core.target import Artifact, Unavailable

ENCODER, DECODER = "encoder", "decoder"
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path of each node


@dataclass(frozen=True)
class BlockDrift:
    block: str  # encoder.blocks.3, decoder.blocks.0
    snr_db: float
    max_abs_err: float


@dataclass(frozen=True)
class Drift:
    model: str
    threshold_db: float
    blocks: tuple[BlockDrift, ...]

    @property
    def first(self) -> BlockDrift | None:
        """The first block, in the order the data flows, whose output is below the threshold."""
        return next((b for b in self.blocks if not b.snr_db >= self.threshold_db), None)

    def lines(self) -> list[str]:
        first = self.first
        head = f"{self.model}: " + (
            f"first block below {self.threshold_db:g} dB: {first.block} ({first.snr_db:.1f} dB)"
            if first
            else f"every block at or above {self.threshold_db:g} dB"
        )
        return [head] + [f"  {b.block:<18} {b.snr_db:7.1f} dB   max |Δ| {b.max_abs_err:.3g}" for b in self.blocks]


SAMPLE_EVERY = 8  # of the utterances whose tokens agree, about one in this many is measured too


def sampled(utt_id: str) -> bool:
    """Whether an agreeing utterance is in the analysis's sample: the same ones in every run and
    for every model (a hash of the id, not a random draw)."""
    return zlib.crc32(utt_id.encode()) % SAMPLE_EVERY == 0


def threshold_for(target: str, quant: str) -> float:
    """The bar a block's output SNR is held to: the target's parity bar for the encoder's at
    this quantization (its reasons are in `converters.registry`)."""
    from converters.registry import get_target

    return get_target(target).tolerance(quant).min_encoder_snr_db


def block_order(names: Sequence[str]) -> list[str]:
    """Encoder blocks, then decoder blocks, each by index."""
    return sorted(names, key=lambda n: (n.split(".")[0] != ENCODER, int(n.rsplit(".", 1)[1])))


def reference_blocks(model: Any, mel: np.ndarray, tokens: Sequence[int]) -> dict[str, np.ndarray]:
    """openai-whisper's block outputs: every encoder block's [1, frames, d] and every decoder block's
    at the last of `tokens` [1, d]."""
    import torch

    found: dict[str, np.ndarray] = {}
    hooks = []
    for side, blocks in ((ENCODER, model.encoder.blocks), (DECODER, model.decoder.blocks)):
        for i, block in enumerate(blocks):

            def keep(_module, _inputs, output, name=f"{side}.blocks.{i}") -> None:
                found[name] = output.detach().float().numpy()

            hooks.append(block.register_forward_hook(keep))
    try:
        with torch.no_grad():
            features = model.encoder(torch.from_numpy(mel))
            model.decoder(torch.tensor([list(tokens)]), features)
    finally:
        for hook in hooks:
            hook.remove()
    return {n: (v if n.startswith(ENCODER) else v[:, -1]) for n, v in found.items()}


def onnx_probes(path: Path, scope: str, side: str) -> dict[str, str]:
    """At conversion: the tensor that holds each block's output in an exported ONNX graph, named
    `<side>.blocks.<i>`: the output of the last residual Add placed directly in the block's module
    scope (`<scope><i>`, from the exporter's name scopes), the block's return value."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    probes: dict[str, str] = {}
    for node in graph.node:  # in topological order: a later Add of the same block replaces an earlier
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == NAME_SCOPES), None)
        if node.op_type != "Add" or not scopes or len(scopes) < 2:
            continue
        owner = scopes[-2]  # the module the node sits in (the last entry is the node itself)
        if owner.startswith(scope) and owner[len(scope) :].isdigit():
            probes[f"{side}.blocks.{owner[len(scope) :]}"] = node.output[0]
    return dict(sorted(probes.items(), key=lambda kv: int(kv[0].rsplit(".", 1)[1])))


def _probed_session(path: Path, probes: dict[str, str], threads: int):
    """An onnxruntime session of the graph at `path` that also returns the `probes` tensors."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        for name in probes.values()
        if name not in known
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory(prefix="probed-") as tmp:  # big graphs keep their weights aside
        probed = Path(tmp) / path.name
        onnx.save(model, str(probed), save_as_external_data=model.ByteSize() > (1 << 30))
        return ort.InferenceSession(str(probed), options, providers=["CPUExecutionProvider"])


Probe = Callable[[np.ndarray, Sequence[int]], dict[str, np.ndarray]]  # (mel, tokens) → block outputs


def onnx_probe(artifact: Artifact, threads: int) -> Probe:
    """An ONNX artifact's block outputs, by its manifest's probes: its three graphs loaded once as
    sessions that also return them."""
    from converters import onnx_target

    probes, enc_file, step_file = artifact.manifest["probes"], onnx_target.ENCODER, onnx_target.DECODER
    encoder = _probed_session(artifact.file(enc_file), probes[enc_file], threads)
    cross_kv = _probed_session(artifact.file(onnx_target.CROSS_KV), {}, threads)
    decoder = _probed_session(artifact.file(step_file), probes[step_file], threads)

    def blocks(mel: np.ndarray, tokens: Sequence[int]) -> dict[str, np.ndarray]:
        features, *enc = encoder.run(["audio_features", *probes[enc_file].values()], {"mel": mel})
        cross_k, cross_v = cross_kv.run(None, {"audio_features": features})
        empty = np.zeros((cross_k.shape[0], 1, 0, cross_k.shape[-1]), np.float32)
        feeds = {"tokens": np.asarray([list(tokens)], np.int64), "self_k": empty, "self_v": empty,
                 "cross_k": cross_k, "cross_v": cross_v}  # fmt: skip
        dec = decoder.run(list(probes[step_file].values()), feeds)
        return {
            **dict(zip(probes[enc_file], enc, strict=True)),
            **{name: value[:, -1] for name, value in zip(probes[step_file], dec, strict=True)},
        }

    return blocks


def executorch_probe(artifact: Artifact, threads: int) -> Probe:
    """An ExecuTorch artifact's block outputs: its programs return them after their own outputs
    (`converters.executorch_target.Probed`); its runner, loaded once, keeps the last encode's and
    step's."""
    from converters import executorch_target

    runner = executorch_target.Runner(artifact, threads)

    def blocks(mel: np.ndarray, tokens: Sequence[int]) -> dict[str, np.ndarray]:
        runner.step(list(tokens), runner.encode(mel), None)  # the prompt and prefix, one token at a time
        return {name: value.numpy()[:, -1] if name.startswith(DECODER) else value.numpy()
                for name, value in runner.probes.items()}  # fmt: skip

    return blocks


PROBED: dict[str, Callable[[Artifact, int], Probe]] = {"onnx": onnx_probe, "executorch": executorch_probe}


def probe_for(artifact: Artifact, threads: int = 1) -> Probe:
    """What reads `artifact`'s block outputs, its runtime loaded now: load it once per artifact and
    hand it to `measure` for each utterance. `Unavailable` where the runtime gives no blocks, or the
    artifact records no probes."""
    if artifact.target not in PROBED:
        raise Unavailable(
            f"{artifact.target}: no block outputs from its runtime yet (layer drift reads: {', '.join(PROBED)})"
        )
    if not artifact.manifest.get("probes"):
        raise Unavailable(f"{artifact.path.name} records no probes (built before they were): rebuild it")
    return PROBED[artifact.target](artifact, threads)


def measure(
    artifact: Artifact,
    model: Any,
    mel: np.ndarray,
    tokens: Sequence[int],
    threshold_db: float,
    probe: Probe | None = None,
) -> Drift:
    """Every block of `artifact` (read by `probe`, else one loaded for this call) against the
    reference `model` on one window's `mel` and the decoder at the last of `tokens` (e.g. the
    prompt and the common prefix up to a divergence)."""
    theirs = (probe or probe_for(artifact))(mel, tokens)
    ours = reference_blocks(model, mel, tokens)
    blocks = tuple(
        BlockDrift(name, round(snr_db(ours[name], theirs[name]), 2), float(np.max(np.abs(ours[name] - theirs[name]))))
        for name in block_order([n for n in ours if n in theirs])
    )
    return Drift(f"{artifact.size}/{artifact.target}/{artifact.quant}", threshold_db, blocks)


def at_first_divergence(artifact: Artifact, audio: np.ndarray, threads: int = 1) -> tuple[Drift, int | None]:
    """`measure` on one utterance at the decoding step where the candidate first leaves the
    reference's greedy tokens (the prompt and their common prefix fed; every token when they agree),
    against the target's own parity bar for this quantization. Also returns that step (None: none)."""
    from converters.registry import get_target
    from harness.core.audio import log_mel
    from harness.core.decoding import Dims, build_prompt, greedy_decode
    from harness.core.target import REFERENCE
    from harness.core.weights import load_model

    probe = probe_for(artifact, threads)  # an artifact without probes is refused before decoding
    dims = Dims.of(artifact.manifest["dims"])
    prompt = build_prompt(dims)
    ours = greedy_decode(get_target(REFERENCE).runner(artifact, threads), audio, dims, prompt).tokens
    theirs = greedy_decode(get_target(artifact.target).runner(artifact, threads), audio, dims, prompt).tokens
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if step is None and len(ours) != len(theirs):
        step = min(len(ours), len(theirs))
    fed = [*prompt.tokens, *(ours if step is None else ours[:step])]
    mel = log_mel(audio, dims.n_mels, dims.n_audio_ctx)
    threshold = threshold_for(artifact.target, artifact.quant)
    return measure(artifact, load_model(artifact.checkpoint()).eval(), mel, fed, threshold, probe), step
