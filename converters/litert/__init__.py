"""LiteRT plumbing shared by the tflite and mtk targets: graphs, building, calibration, the runtime.

The facts here are light (no torch, no LiteRT): the registry declares both targets from them.
"""

from __future__ import annotations

import os

# packages whose versions shape the .tflite files (part of the store key)
TOOLCHAIN = ("litert-torch", "litert-converter", "ai-edge-litert", "ai-edge-quantizer")
CALIBRATED = "int8-static"  # the one recipe that needs calibration audio
# operators the MediaTek NPU does not run, which its graphs must not hold: gathers (the host looks
# embeddings up) and in-graph cache writes (the host owns the cache)
NPU_UNSUPPORTED_OPS = frozenset({"GATHER", "GATHER_ND", "EMBEDDING_LOOKUP", "SCATTER_ND", "DYNAMIC_UPDATE_SLICE"})
# on the driver: build for this SoC ahead of time; on a board: the SoC it is
SOC_ENV = "HARNESS_MTK_SOC"


def soc() -> str:
    """The MediaTek SoC this process's environment names (e.g. MT6989), or ''."""
    return os.environ.get(SOC_ENV, "").strip().upper()
