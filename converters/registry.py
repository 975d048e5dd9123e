"""The registry of targets: one entry per backend module, validated in one place."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from harness.errors import HarnessError, did_you_mean


@dataclass(frozen=True)
class Target:
    name: str
    module: str  # imported lazily: validating a job must not pay for torch or toolchains
    quants: tuple[str, ...]
    description: str
    # a Ray resource that nodes with this target's hardware advertise (e.g. MediaTek boards):
    # when the cluster has one, the target's workers are placed there; otherwise it runs in emulation
    board_resource: str | None = None
    runtime: str = "torch"  # what executes it, for tables; a manifest's own `runtime` overrides it

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


REFERENCE = "reference"

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(REFERENCE, "converters.reference", ("fp32",), "openai-whisper in PyTorch (the reference)"),
        Target("torchscript", "converters.torchscript", ("fp32", "fp16", "int8"), "TorchScript, explicit KV cache"),
        Target(
            "onnx",
            "converters.onnx_export",
            ("fp32", "int8"),
            "ONNX (dynamo export), KV cache, onnxruntime CPU",
            runtime="onnxruntime-cpu",
        ),
        Target(
            "coreml",
            "converters.coreml_target",
            ("fp32", "fp16"),
            "Core ML .mlpackage in ANE form; macOS only",
            runtime="coreml",
        ),
        Target(
            "torchscript-mtk",
            "converters.torchscript_mtk",
            ("fp32",),
            "MediaTek-friendly TorchScript: decoder on token embeddings, no gather, mask as buffer",
        ),
        Target(
            "transformers",
            "converters.hf_transformers",
            ("fp32",),
            "Hugging Face WhisperForConditionalGeneration from the same weights (SDPA, HF KV cache)",
        ),
        Target(
            "ctranslate2",
            "converters.ct2_target",
            ("fp32", "int8"),
            "CTranslate2 (faster-whisper's engine) via its TransformersConverter; CPU, one thread",
            runtime="ctranslate2-cpu",
        ),
        Target(
            "tflite",
            "converters.litert_target",
            ("fp32", "fp16", "int8-dynamic", "int8-weight", "int8-static"),
            "LiteRT .tflite via litert-torch, static KV cache, ai-edge-quantizer; LiteRT CPU (XNNPACK), one thread",
            runtime="litert-cpu",
        ),
        Target(
            "mtk",
            "converters.mtk",
            ("fp32", "fp16", "int8"),
            "MediaTek NPU form as .tflite (no gather, host embeddings, static KV cache); LiteRT CPU emulation",
            board_resource="mediatek",
        ),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise HarnessError(
            f"unknown target '{name}'{did_you_mean(name, TARGETS)}; known: {', '.join(TARGETS)}"
        ) from None
