"""`onnx`: Whisper exported with `torch.onnx.export(dynamo=True)` and run by onnxruntime on CPU.

Three graphs from `converters.forms.cached_step`: the encoder, the cross-attention K/V projection (once
per utterance) and the KV-cached decoder step, whose new-token count `n` and cache length `T`
are dynamic dimensions, and every graph's `batch` too.

Batching (`Runner.batching`): the fp32 runner decodes several utterances per call, dropping a row
from the caches once it has ended. The int8 one does not: `DynamicQuantizeLinear` gives an
activation one scale over the whole tensor, so in a batch each row would be quantized by the
others' range (tiny.en, measured: 8 utterances in one call move the encoder's features by up to
14.5 and the first step's logits by 0.95; decoding 32 of them 8 at a time, the encoder row by row,
changes 6 transcripts, 7 at batch 2; a batch of copies of one utterance gives its batch-1 logits
bit for bit). On a CPU batching does not pay (x0.84 to x1.06, benchmarks/batching.py): every step
splits the stacked cross-attention cache by layer, and scales and transposes each row's cached
keys (`converters.forms.blocks.attention`), work that grows with the rows (64 % of a step at batch
8 in onnxruntime's profile). `device="cuda"` runs the graphs on onnxruntime's
CUDAExecutionProvider, fed from the host as on the CPU (the caches cross to the GPU at every step:
a correct path, not the fastest).

Quantizations:

- fp32: the exported graphs.
- int8: `onnxruntime.quantization.quantize_dynamic` of every MatMul with a weight initializer
  (int8 weights, per-call uint8 activations). The vocabulary projection is exported as a MatMul
  on an initializer (`cached_step.TransposedVocab`), so it is quantized too; the encoder's two
  convolutions stay float, as `nn.Linear`-only dynamic quantization leaves them in the
  `torchscript` target.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from whisper.model import Whisper

from converters.forms.cached_step import TransposedVocab, modules
from harness.core.checkpoint import Checkpoint
from harness.core.target import (
    CPU,
    DEFAULT_THREADS,
    Artifact,
    Implementation,
    Runner,
    Unavailable,
    device_kind,
    require,
)
from harness.core.window import mel_frames

ENCODER, CROSS_KV, DECODER = "encoder.onnx", "cross_kv.onnx", "decoder_step.onnx"
# export sample sizes: torch.export refuses 0 and 1 as samples of a dynamic dimension
SAMPLE_BATCH, SAMPLE_TOKENS, SAMPLE_CACHE = 2, 2, 3
# a protobuf message is capped at 2 GiB: bigger graphs keep their weights in a `.data` file
EXTERNAL_DATA_BYTES = 1 << 30


def _export(module: torch.nn.Module, args: tuple, path: Path, names: tuple[Sequence[str], Sequence[str]], **kw) -> None:
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress on stdout
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            input_names=list(names[0]),
            output_names=list(names[1]),
            external_data=size > EXTERNAL_DATA_BYTES,
            **kw,
        )


def export_fp32(model: Whisper, out: Path) -> None:
    """encoder.onnx, cross_kv.onnx and decoder_step.onnx of `model` in float32, into `out`."""
    from whisper.model import disable_sdpa

    d = model.dims
    encoder, cross_kv, step = modules(model, TransposedVocab)
    mel = torch.zeros(SAMPLE_BATCH, d.n_mels, mel_frames(d.n_audio_ctx))
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.inference_mode(False), torch.no_grad(), disable_sdpa():
        # explicit attention in the encoder too: the exporter decomposes SDPA anyway (measured:
        # same onnxruntime speed), and the plain graph exports in about half the time
        _export(encoder, (mel,), out / ENCODER, (["mel"], ["audio_features"]), dynamic_shapes={"mel": {0: batch}})
        features = encoder(mel)
        _export(
            cross_kv,
            (features,),
            out / CROSS_KV,
            (["audio_features"], ["cross_k", "cross_v"]),
            dynamic_shapes={"audio_features": {0: batch}},
        )
        cross_k, cross_v = cross_kv(features)
    tokens = torch.zeros(SAMPLE_BATCH, SAMPLE_TOKENS, dtype=torch.long)
    # two distinct tensors: torch.export merges inputs passed as the same object into one
    self_k, self_v = torch.zeros(2, d.n_text_layer, SAMPLE_BATCH, SAMPLE_CACHE, d.n_text_state).unbind()
    n = torch.export.Dim("n", min=1, max=d.n_text_ctx)
    t = torch.export.Dim("T", min=0, max=d.n_text_ctx - 1)
    cache = {1: batch, 2: t}
    with torch.inference_mode(False), torch.no_grad():
        _export(
            step,
            (tokens, self_k, self_v, cross_k, cross_v),
            out / DECODER,
            (["tokens", "self_k", "self_v", "cross_k", "cross_v"], ["logits", "new_self_k", "new_self_v"]),
            dynamic_shapes={
                "tokens": {0: batch, 1: n},
                "self_k": cache,
                "self_v": cache,
                "cross_k": {1: batch},
                "cross_v": {1: batch},
            },
        )


def quantize_int8(src: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in (ENCODER, CROSS_KV, DECODER):
        # MatMul only: ConvInteger would also quantize the encoder's convolutions, which the
        # Linear-only recipe of the torchscript target keeps float (comparable int8 rows)
        quantize_dynamic(src / name, out / name, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)


def io_shapes(model: Path) -> dict[str, dict[str, list[int | str]]]:
    """Input and output names and shapes as the graph declares them (dynamic dims by name)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph

    def shapes(values) -> dict[str, list[int | str]]:
        return {v.name: [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim] for v in values}

    return {"inputs": shapes(graph.input), "outputs": shapes(graph.output)}


def block_probes(folder: Path) -> dict[str, dict[str, str]]:
    """Where each encoder and decoder block's output is in the exported float graphs (see
    `converters.layer_drift`): fixed here, at conversion, and kept in the manifest."""
    from converters.layer_drift import onnx_probes

    return {
        ENCODER: onnx_probes(folder / ENCODER, "encoder.blocks.", "encoder"),
        DECODER: onnx_probes(folder / DECODER, "blocks.", "decoder"),
    }


def kept(path: Path, probes: dict[str, str]) -> dict[str, str]:
    """The probes whose tensors the final graph still has (quantization renames what it replaces)."""
    import onnx

    names = {o for node in onnx.load(str(path), load_external_data=False).graph.node for o in node.output}
    return {block: name for block, name in probes.items() if name in names}


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    require("onnx", "onnxscript", "onnxruntime")
    if quant == "fp32":
        export_fp32(model, out)
        probes = block_probes(out)
    else:
        with tempfile.TemporaryDirectory(prefix="onnx-fp32-") as tmp:
            export_fp32(model, Path(tmp))
            probes = block_probes(Path(tmp))
            quantize_int8(Path(tmp), out)
    import onnx

    graph = onnx.load(str(out / DECODER), load_external_data=False)
    path = "torch.onnx.export(dynamo=True) of converters.forms.cached_step modules"
    if quant == "int8":
        path += ", then onnxruntime.quantization.quantize_dynamic (MatMul, QInt8 weights)"
    return {
        "path": path,
        "probes": {name: kept(out / name, found) for name, found in probes.items()},
        "opset": {o.domain or "ai.onnx": o.version for o in graph.opset_import},
        "io": {name: io_shapes(out / name) for name in (ENCODER, CROSS_KV, DECODER)},
    }


class OnnxRunner(Runner):
    batching = True

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS, device: str = CPU) -> None:
        import onnxruntime as ort

        providers: list[Any] = ["CPUExecutionProvider"]
        self._device = device_kind(device)
        if self._device != CPU:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise Unavailable(
                    f"device {device!r}: onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                    f"(providers: {', '.join(ort.get_available_providers())}; onnxruntime-gpu has it)"
                )
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
            self.runtime = "onnxruntime-cuda"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # the graphs run one after another

        def session(name: str):
            made = ort.InferenceSession(str(artifact.file(name)), options, providers=providers)
            # onnxruntime falls back to the CPU, silently, when the CUDA provider fails to load
            if self._device != CPU and made.get_providers()[0] != "CUDAExecutionProvider":
                raise Unavailable(f"device {device!r}: onnxruntime could not start its CUDAExecutionProvider")
            return made

        self.encoder, self.cross_kv, self.decoder = session(ENCODER), session(CROSS_KV), session(DECODER)
        shape = self.decoder.get_inputs()[1].shape  # self_k: [n_layer, batch, "T", n_state]
        self.empty = np.zeros((shape[0], 1, 0, shape[3]), dtype=np.float32)
        # this artifact's own answer to the class's: int8 activations are quantized per call (see the
        # module docstring), and graphs exported before the batch dimension was dynamic take one row
        self.batching = artifact.quant == "fp32" and shape[1] != 1

    def encode(self, mel: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"mel": mel})[0]

    def encode_batch(self, mel: np.ndarray) -> np.ndarray:
        # a CPU encodes row by row (harness.core.target says why)
        return np.concatenate([self.encode(row[None]) for row in mel]) if self._device == CPU else self.encode(mel)

    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        """cache: (cross_k, cross_v, self_k, self_v); the self cache's length is the tokens already seen."""
        if cache is None:  # a new utterance: its cross-attention K/V, once
            cross_k, cross_v = self.cross_kv.run(None, {"audio_features": audio_features})
            self_k = self_v = self.empty
        else:
            cross_k, cross_v, self_k, self_v = cache
        logits, cache = self._step(
            np.asarray([tokens[self_k.shape[2] :]], dtype=np.int64), (cross_k, cross_v, self_k, self_v)
        )
        return logits[0], cache

    def step_batch(
        self, tokens: Sequence[Sequence[int]], audio_features: Any, cache: Any, rows: Sequence[int] | None = None
    ) -> tuple[np.ndarray, Any]:
        """cache: (rows, (cross_k, cross_v, self_k, self_v)) of the rows still decoding."""
        if cache is None:  # a new batch, every row: its cross-attention K/V, once
            held = tuple(range(len(tokens)))
            cross_k, cross_v = self.cross_kv.run(None, {"audio_features": audio_features})
            self_k = self_v = np.repeat(self.empty, len(tokens), axis=1)
        else:
            before, (cross_k, cross_v, self_k, self_v) = cache
            held = before if rows is None else tuple(rows)
            if held != before:  # rows that ended leave every cache: later steps compute only the others
                keep = [before.index(r) for r in held]
                cross_k, cross_v, self_k, self_v = (c[:, keep] for c in (cross_k, cross_v, self_k, self_v))
        new = np.asarray([t[self_k.shape[2] :] for t in tokens], dtype=np.int64)
        logits, caches = self._step(new, (cross_k, cross_v, self_k, self_v))
        return logits, (held, caches)

    def _step(self, new: np.ndarray, caches: tuple[np.ndarray, ...]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The decoder graph on `new` tokens [rows, n]: the last position's logits, and the caches after them."""
        cross_k, cross_v, self_k, self_v = caches
        feeds = {"tokens": new, "self_k": self_k, "self_v": self_v, "cross_k": cross_k, "cross_v": cross_v}
        logits, self_k, self_v = self.decoder.run(None, feeds)
        return logits, (cross_k, cross_v, self_k, self_v)


IMPLEMENTATION = Implementation(convert=convert, runner=OnnxRunner)
