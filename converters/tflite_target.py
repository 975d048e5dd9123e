"""`tflite`: Whisper as LiteRT (.tflite) graphs, converted with litert-torch, run by ai-edge-litert.

Three fixed-shape graphs with a host-owned static KV cache (`converters.litert.graphs`), built and
quantized by `converters.litert.build` (ai-edge-quantizer: fp16 weights, int8 dynamic range, int8
weight-only, full int8 calibrated on train-clean-100 audio the caller hands over), run by
`converters.litert.runtime` on the LiteRT CPU interpreter (XNNPACK). `converters.mtk_target` builds the
MediaTek form from the same pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from whisper.model import Whisper

from converters.litert import build as litert_build
from converters.litert import graphs as litert_graphs
from converters.litert import runtime as litert_runtime
from harness.core.checkpoint import Checkpoint
from harness.core.target import Implementation


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    facts = litert_build.build(model, quant, out, litert_graphs.parts(model), litert_runtime.Runner, calibration)
    return {**facts, "path": "litert-torch", "runtime": "litert-cpu"}


IMPLEMENTATION = Implementation(
    convert=convert, runner=litert_runtime.Runner, unavailable=litert_runtime.runtime_unavailable
)
