"""`onnx`: Whisper exported with `torch.onnx.export(dynamo=True)` and run by onnxruntime on CPU.

Three graphs from `converters.forms.cached_step`: the encoder, the cross-attention K/V projection (once
per utterance) and the KV-cached decoder step, whose new-token count `n` and cache length `T`
are dynamic dimensions. Quantizations:

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
from harness.core.target import DEFAULT_THREADS, Artifact, Implementation, Runner, require
from harness.core.window import mel_frames

ENCODER, CROSS_KV, DECODER = "encoder.onnx", "cross_kv.onnx", "decoder_step.onnx"
# export sample sizes: torch.export refuses 0 and 1 as samples of a dynamic dimension
SAMPLE_TOKENS, SAMPLE_CACHE = 2, 3
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
    mel = torch.zeros(1, d.n_mels, mel_frames(d.n_audio_ctx))
    with torch.inference_mode(False), torch.no_grad(), disable_sdpa():
        # explicit attention in the encoder too: the exporter decomposes SDPA anyway (measured:
        # same onnxruntime speed), and the plain graph exports in about half the time
        _export(encoder, (mel,), out / ENCODER, (["mel"], ["audio_features"]))
        features = encoder(mel)
        _export(cross_kv, (features,), out / CROSS_KV, (["audio_features"], ["cross_k", "cross_v"]))
        cross_k, cross_v = cross_kv(features)
    tokens = torch.zeros(1, SAMPLE_TOKENS, dtype=torch.long)
    # two distinct tensors: torch.export merges inputs passed as the same object into one
    self_k, self_v = torch.zeros(2, d.n_text_layer, 1, SAMPLE_CACHE, d.n_text_state).unbind()
    n = torch.export.Dim("n", min=1, max=d.n_text_ctx)
    t = torch.export.Dim("T", min=0, max=d.n_text_ctx - 1)
    with torch.inference_mode(False), torch.no_grad():
        _export(
            step,
            (tokens, self_k, self_v, cross_k, cross_v),
            out / DECODER,
            (["tokens", "self_k", "self_v", "cross_k", "cross_v"], ["logits", "new_self_k", "new_self_v"]),
            dynamic_shapes={"tokens": {1: n}, "self_k": {2: t}, "self_v": {2: t}, "cross_k": None, "cross_v": None},
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


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    require("onnx", "onnxscript", "onnxruntime")
    if quant == "fp32":
        export_fp32(model, out)
    else:
        with tempfile.TemporaryDirectory(prefix="onnx-fp32-") as tmp:
            export_fp32(model, Path(tmp))
            quantize_int8(Path(tmp), out)
    import onnx

    graph = onnx.load(str(out / DECODER), load_external_data=False)
    path = "torch.onnx.export(dynamo=True) of converters.forms.cached_step modules"
    if quant == "int8":
        path += ", then onnxruntime.quantization.quantize_dynamic (MatMul, QInt8 weights)"
    return {
        "path": path,
        "opset": {o.domain or "ai.onnx": o.version for o in graph.opset_import},
        "io": {name: io_shapes(out / name) for name in (ENCODER, CROSS_KV, DECODER)},
    }


class OnnxRunner(Runner):
    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # the graphs run one after another

        def session(name: str):
            return ort.InferenceSession(str(artifact.file(name)), options, providers=["CPUExecutionProvider"])

        self.encoder, self.cross_kv, self.decoder = session(ENCODER), session(CROSS_KV), session(DECODER)
        shape = self.decoder.get_inputs()[1].shape  # self_k: [n_layer, 1, "T", n_state]
        self.empty = np.zeros((shape[0], 1, 0, shape[3]), dtype=np.float32)

    def encode(self, mel: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {"mel": mel})[0]

    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        """cache: (cross_k, cross_v, self_k, self_v); the self cache's length is the tokens already seen."""
        if cache is None:  # a new utterance: its cross-attention K/V, once
            cross_k, cross_v = self.cross_kv.run(None, {"audio_features": audio_features})
            self_k = self_v = self.empty
        else:
            cross_k, cross_v, self_k, self_v = cache
        new = np.asarray([tokens[self_k.shape[2] :]], dtype=np.int64)
        feeds = {"tokens": new, "self_k": self_k, "self_v": self_v, "cross_k": cross_k, "cross_v": cross_v}
        logits, self_k, self_v = self.decoder.run(None, feeds)
        return logits[0], (cross_k, cross_v, self_k, self_v)


IMPLEMENTATION = Implementation(convert=convert, runner=OnnxRunner)
