"""Building LiteRT graphs: export with litert-torch (or another exporter), quantize with
ai-edge-quantizer, and describe the files for the manifest.

Quantization recipes: fp16 weights, int8 dynamic range, int8 weight-only, and full int8 (weights
and activations) calibrated on audio the caller hands over (`converters.litert.calibration`); a
quantized graph that LiteRT's kernels refuse to prepare is `Refused` with their reason.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from whisper.model import Whisper

from converters.litert import CALIBRATED
from converters.litert.calibration import CALIBRATION_STEPS, Calibration, calibration_sets
from converters.litert.graphs import MASKED, IoNames, Part
from converters.litert.runtime import Runner, interpreter_unavailable, make_interpreter, signature
from harness.core.target import DEFAULT_THREADS, Artifact, Refused, Unavailable


def require_toolchain() -> None:
    for module, dist in (("litert_torch", "litert-torch"), ("ai_edge_quantizer", "ai-edge-quantizer")):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{dist} is not installed (pip install 'litert-torch==0.10.*' ai-edge-quantizer)")
    if reason := interpreter_unavailable("ai-edge-litert"):
        raise Unavailable(reason)


def export(module: nn.Module, sample: dict[str, torch.Tensor], path: Path) -> None:
    """PyTorch → .tflite with litert-torch at the sample's fixed shapes."""
    import litert_torch
    from whisper.model import disable_sdpa

    # written-out attention everywhere: SDPA lowers to ops the quantizer and NPUs may not take
    with torch.no_grad(), disable_sdpa():
        litert_torch.convert(module.eval(), sample_kwargs=sample).export(str(path))


Exporter = Callable[[nn.Module, dict[str, torch.Tensor], Path], None]


def quant_recipe(quant: str):
    """The ai-edge-quantizer recipe of one quantization; None keeps the float graph."""
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe, recipe_manager

    if quant == "fp32":
        return None
    if quant == "fp16":  # weights cast to float16, computed in float32
        manager = recipe_manager.RecipeManager()
        manager.add_weight_only_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            num_bits=16,
            algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
        )
        return manager.get_quantization_recipe()
    recipes = {
        "int8-dynamic": recipe.dynamic_wi8_afp32,  # int8 weights, activations quantized at run time
        "int8-weight": recipe.weight_only_wi8_afp32,  # int8 weights dequantized, float compute
        CALIBRATED: recipe.static_wi8_ai8,  # int8 weights and activations, calibrated ranges
    }
    if quant not in recipes:
        raise Unavailable(f"quantization {quant!r} has no LiteRT recipe (known: fp32, fp16, {', '.join(recipes)})")
    return recipes[quant]()


def quantize(path: Path, quant: str, calibration: Calibration | None) -> None:
    """Quantize the float graph at `path` in place. `calibration` yields batches of input samples,
    one per calibration utterance, merged into one range per tensor so one batch is in memory."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(str(path), quant_recipe(quant))
    ranges = None
    if q.need_calibration:
        if calibration is None:
            raise Unavailable(f"{quant} needs calibration data")
        for batch in calibration():
            ranges = q.calibrate(
                {"serving_default": batch}, previous_calibration_result=ranges, num_threads=DEFAULT_THREADS
            )
    result = q.quantize(ranges, enable_progress_report=False)
    result.export_model(str(path), overwrite=True)
    # XNNPACK can crash the process on files the quantizer writes wrong (full int8 measured a NaN
    # scale on the cross-attention keys, concatenated inputs of unequal scales); the reference
    # kernels refuse those with an error, so the build is refused instead
    try:
        Interpreter(
            model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        ).allocate_tensors()
    except RuntimeError as exc:
        raise Refused(f"ai-edge-quantizer's {quant} {path.name} cannot run: {exc}") from None


def io_facts(path: Path, names: IoNames) -> dict[str, Any]:
    """Names, shapes, dtypes (and int8 scales) of a .tflite file's inputs and outputs."""
    inputs, outputs = signature(make_interpreter(path), names)

    def describe(details: dict) -> dict[str, Any]:
        facts = {}
        for name, d in details.items():
            facts[name] = {"shape": d["shape"].tolist(), "dtype": np.dtype(d["dtype"]).name}
            if d["quantization"][0] != 0.0:
                facts[name]["scale_zero_point"] = [float(d["quantization"][0]), int(d["quantization"][1])]
        return facts

    return {"inputs": describe(inputs), "outputs": describe(outputs)}


def build(
    model: Whisper,
    quant: str,
    out: Path,
    graphs: dict[str, Part],
    runner: type[Runner],
    calibration_audio: Sequence[np.ndarray] = (),
    exporter: Exporter = export,
) -> dict[str, Any]:
    """Export `graphs` into `out`, quantize them with `quant`'s recipe, and return the manifest
    facts every LiteRT target shares (I/O, quantization, calibration, seconds per file)."""
    require_toolchain()
    recipe = quant_recipe(quant)
    seconds: dict[str, float] = {}
    for name, (module, sample) in graphs.items():
        assert tuple(sample) == runner.io_names[name][0], name  # the Runner feeds these names
        started = time.time()
        exporter(module, sample, out / name)
        seconds[name] = time.time() - started
    calibration: dict[str, Calibration] = {}
    if quant == CALIBRATED:
        if not calibration_audio:
            raise Unavailable(f"{quant} needs calibration audio, and its caller handed none")
        float_io = {name: io_facts(out / name, runner.io_names[name]) for name in graphs}
        float_artifact = Artifact("", "", "fp32", out, {"io": float_io})
        calibration = calibration_sets(runner, float_artifact, model.dims, calibration_audio)
    for name in graphs if recipe is not None else ():
        started = time.time()
        quantize(out / name, quant, calibration.get(name))
        seconds[name] += time.time() - started
    return {
        "io": {name: io_facts(out / name, runner.io_names[name]) for name in graphs},
        "quantization": {"tool": "ai-edge-quantizer", "recipe": quant} if recipe is not None else None,
        "calibration": (
            {"utterances": len(calibration_audio), "decoder_steps_each": CALIBRATION_STEPS} if calibration else None
        ),
        "convert_s": {name: round(s, 2) for name, s in seconds.items()},
        "kv_cache": {"slots": model.dims.n_text_ctx, "masked": MASKED, "owner": "host"},
    }
