"""The registry of targets: one line per target module, each keeping the `Target` contract.

To add a target: write its module (its `TARGET` declares everything the harness needs), add one
line here, and one test file (see the README's "Add a target").
"""

from __future__ import annotations

from converters import (
    coreml_target,
    ct2_target,
    hf_transformers,
    litert_target,
    mtk,
    onnx_export,
    reference,
    torchscript,
    torchscript_mtk,
)
from harness.core.errors import HarnessError, did_you_mean
from harness.core.target import REFERENCE, Target

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        reference.TARGET,
        torchscript.TARGET,
        onnx_export.TARGET,
        coreml_target.TARGET,
        torchscript_mtk.TARGET,
        hf_transformers.TARGET,
        ct2_target.TARGET,
        litert_target.TARGET,
        mtk.TARGET,
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
