"""The registry of targets: one line per target module, each keeping the `Target` contract.

To add a target: write its module (its `TARGET` declares everything the harness needs), add one
line here, and one test file (see the README's "Add a target").
"""

from __future__ import annotations

from converters import (
    coreml_target,
    ctranslate2_target,
    mtk_target,
    onnx_target,
    reference_target,
    tflite_target,
    torchscript_mtk_target,
    torchscript_target,
    transformers_target,
)
from harness.core.errors import HarnessError, did_you_mean
from harness.core.target import REFERENCE, Target

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        reference_target.TARGET,
        torchscript_target.TARGET,
        onnx_target.TARGET,
        coreml_target.TARGET,
        torchscript_mtk_target.TARGET,
        transformers_target.TARGET,
        ctranslate2_target.TARGET,
        tflite_target.TARGET,
        mtk_target.TARGET,
    )
}
assert REFERENCE in TARGETS


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise HarnessError(
            f"unknown target '{name}'{did_you_mean(name, TARGETS)}; known: {', '.join(TARGETS)}"
        ) from None
