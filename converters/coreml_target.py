"""`coreml`: Whisper in Apple-Neural-Engine form (`converters.forms.ane_model`) as two Core ML ML Programs.

The encoder package maps mel → audio features and the decoder's cross-attention keys/values; the
decoder package takes one token with a fixed-size key/value cache (static shapes, as the ANE
wants). Both come from the torch.export frontend of coremltools: its TorchScript frontend breaks
with numpy ≥ 2.4. `fp16` is Core ML's float16 compute precision (the ANE computes only in
float16); inputs and outputs stay float32.

coremltools converts on any OS but Core ML predicts only on macOS. Off macOS, parity is measured on
the ANE-form graph that was converted, in PyTorch (in float16 for `fp16`), and gated like any
other; the runner then reports itself unavailable, so a job shows "unavailable: ..." rows.

The store hashes plain files, so each .mlpackage (a folder) is kept as an uncompressed zip, as
whisper.cpp ships its Core ML encoders; the runner unzips them to a temporary folder.
"""

from __future__ import annotations

import platform
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from whisper.model import Whisper

from converters import parity
from converters.forms.ane_host import AneHost, TorchAneRunner
from converters.forms.ane_model import WhisperANE, from_whisper, vocab_chunks
from harness.core.checkpoint import Checkpoint
from harness.core.decoding import Dims, build_prompt
from harness.core.target import DEFAULT_THREADS, Artifact, Implementation, Unavailable
from harness.core.window import mel_frames

ENCODER, DECODER = "encoder.mlpackage.zip", "decoder.mlpackage.zip"
DEPLOYMENT_TARGET = "macOS13"  # the ML Program opset of macOS 13 / iOS 16: nothing here needs a newer one
ENCODER_OUTPUTS = ("audio_features", "cross_k", "cross_v")
DECODER_OUTPUTS = ("logits", "new_k", "new_v")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def runtime_unavailable() -> str | None:
    if platform.system() != "Darwin":
        return f"Core ML predicts only on macOS, this is {platform.system()} (parity was checked in PyTorch)"
    try:
        from coremltools import libcoremlpython  # noqa: F401  (the Core ML bindings, macOS wheels only)
    except ImportError as exc:
        return f"coremltools' Core ML bindings are missing ({exc})"
    return None


def _example_inputs(ane: WhisperANE) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    d = ane.dims
    mel = torch.zeros(1, d.n_mels, mel_frames(d.n_audio_ctx))
    cache = torch.zeros(d.n_text_layer, d.n_text_state, 1, d.n_text_ctx)
    cross = torch.zeros(d.n_text_layer, d.n_text_state, 1, d.n_audio_ctx)
    token, position = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    return (mel,), (token, position, cache, cache.clone(), cross, cross.clone())


def _io(mlmodel) -> dict[str, Any]:
    """Inputs and outputs as the converted model's spec states them (names, shapes, dtypes)."""
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    def features(fs) -> dict[str, list[int]]:
        return {f.name: [int(n) for n in f.type.multiArrayType.shape] for f in fs}

    desc = mlmodel.get_spec().description
    return {
        "inputs": features(desc.input),
        "outputs": features(desc.output),
        "dtypes": {
            f.name: ArrayFeatureType.ArrayDataType.Name(f.type.multiArrayType.dataType).lower()
            for f in (*desc.input, *desc.output)
        },
    }


def _zip_package(package: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        for path in sorted(package.rglob("*")):
            z.write(path, path.relative_to(package.parent).as_posix())


def _convert(ct, module: torch.nn.Module, args: tuple, outputs: tuple[str, ...], quant: str, archive: Path):
    precision = ct.precision.FLOAT16 if quant == "fp16" else ct.precision.FLOAT32
    with torch.no_grad():
        program = torch.export.export(module, args).run_decompositions({})
    mlmodel = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        compute_precision=precision,
        compute_units=ct.ComputeUnit.ALL,
        outputs=[ct.TensorType(name=name) for name in outputs],
    )
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / archive.name.removesuffix(".zip")
        mlmodel.save(str(package))
        _zip_package(package, archive)
    return mlmodel


def _torch_parity(checkpoint: Checkpoint, model: Whisper, ane: WhisperANE, quant: str) -> dict[str, Any]:
    from converters.reference_target import ReferenceRunner

    # the reference's "artifact" is only the checkpoint, described as the store describes it
    c = checkpoint
    source = {"name": c.name, "path": str(c.path), "sha256": c.sha256, "origin": c.source}
    reference = ReferenceRunner(Artifact(c.name, "reference", "fp32", c.path.parent, {"source": source}))
    dims = Dims.of(model.dims)
    numbers = parity.measure(reference, TorchAneRunner(ane, DTYPES[quant]), dims, build_prompt(dims))
    precision = str(DTYPES[quant]).removeprefix("torch.")
    return {**numbers, "runtime": f"PyTorch CPU {precision}, the ANE-form graph that was converted"}


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    try:
        import coremltools as ct
    except ImportError as exc:
        raise Unavailable(f"coremltools is not installed ({exc})") from None
    ane = from_whisper(model)
    encoder_args, decoder_args = _example_inputs(ane)
    encoder = _convert(ct, ane.encoder_package(), encoder_args, ENCODER_OUTPUTS, quant, out / ENCODER)
    decoder = _convert(ct, ane.decoder, decoder_args, DECODER_OUTPUTS, quant, out / DECODER)
    numbers = _torch_parity(checkpoint, model, ane, quant)  # casts `ane` to the quant's dtype: last
    return {
        "path": f"torch.export → coremltools {ct.__version__} mlprogram ({DEPLOYMENT_TARGET})",
        "compute_precision": "float16" if quant == "fp16" else "float32",
        "vocab_chunks": vocab_chunks(model.dims.n_vocab),
        "io": {ENCODER: _io(encoder), DECODER: _io(decoder)},
        # where Core ML can run, the store measures parity in it; elsewhere the PyTorch numbers gate
        ("parity" if runtime_unavailable() else "pytorch_parity"): numbers,
    }


def _unzip(archive: Path, into: Path) -> Path:
    with zipfile.ZipFile(archive) as z:
        z.extractall(into)
    return into / archive.name.removesuffix(".zip")


class CoreMLRunner(AneHost):
    """Core ML on macOS (compute units ALL: the ANE where Core ML places ops there; Core ML picks
    its own threads)."""

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS) -> None:
        import coremltools as ct

        d = artifact.manifest["dims"]
        self.cache_shape = (d["n_text_layer"], d["n_text_state"], 1, d["n_text_ctx"])
        self._unpacked = tempfile.TemporaryDirectory(prefix="coreml-")  # lives as long as the runner
        into = Path(self._unpacked.name)
        self.encoder = ct.models.MLModel(str(_unzip(artifact.file(ENCODER), into)), compute_units=ct.ComputeUnit.ALL)
        self.decoder = ct.models.MLModel(str(_unzip(artifact.file(DECODER), into)), compute_units=ct.ComputeUnit.ALL)

    def _encoder(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.encoder.predict({"mel": mel})
        return tuple(np.asarray(out[name], dtype=np.float32) for name in ENCODER_OUTPUTS)

    def _decoder(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.decoder.predict(inputs)
        return tuple(np.asarray(out[name], dtype=np.float32) for name in DECODER_OUTPUTS)


IMPLEMENTATION = Implementation(convert=convert, runner=CoreMLRunner, unavailable=runtime_unavailable)
