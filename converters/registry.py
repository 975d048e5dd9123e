"""The registry of targets: each target's declaration, its code imported on first use.

A declaration (`harness.core.target.Target`) is facts only — quantizations with their parity
tolerances and why, recipe and toolchain (the store key), runtime label, Ray resource — so that
`validate`, `runs`, `history`, `compare` and `report` name and check targets without importing
torch or any SDK. Its code is one module per target, `converters.<name>_target` ('-' as '_'),
whose `IMPLEMENTATION` is imported the first time the target converts or runs; a module that fails
to import makes that target `unavailable`, never the others.

To add a target: write `converters/<name>_target.py` (its `IMPLEMENTATION`), add its declaration
here, and one test file (see the README's "Add a target").
"""

from __future__ import annotations

from converters.litert import CALIBRATED, TOOLCHAIN, soc
from harness.core.errors import HarnessError, did_you_mean
from harness.core.target import REFERENCE, Target, Tolerance


def module_of(name: str) -> str:
    """The module that implements target `name` (tests/test_targets.py holds every entry to it)."""
    return f"converters.{name.replace('-', '_')}_target"


def _declare(**facts) -> Target:
    return Target(implementation=f"{module_of(facts['name'])}:IMPLEMENTATION", **facts)


def mtk_recipe() -> str:
    """The SoC changes the produced files, so it is part of the recipe (and the store key); read from
    the environment at import, as `converters.mtk_target` reads it.
    v2: graphs built from converters.forms.blocks (same math; op order and names differ)."""
    return "mtk-litert-static-kv-v2" + (f"+aot:{soc()}" if soc() else "")


# The LiteRT graphs' bars, shared by tflite and mtk (the same graphs but for the mtk form's
# host-side lookups, measured alike).
LITERT_FP32 = Tolerance(
    80.0,
    1e-3,
    1.0,
    "fp32 on XNNPACK (explicit attention, static-cache decoder): measured 111.3 dB / 5.5e-5 (tiny.en, tflite and "
    "mtk alike), 109.4 dB / 1.2e-4 (base); 80 dB and 1e-3 keep a 30 dB / 8x margin and catch any wrong weight, mask "
    "or slot",
)
LITERT_FP16 = Tolerance(
    50.0,
    0.1,
    0.875,
    "float16 weights, float32 compute (FLOAT_CASTING): measured 69.4 dB / 5.3e-3 (tiny.en), 70.7 dB / 8.1e-3 (base); "
    "20 dB / 12x margin, one near-tie flip in 8 steps allowed",
)
LITERT_INT8_WEIGHT = Tolerance(
    20.0,
    4.0,
    0.75,
    "int8 weights per channel dequantized to float compute (the NPU's W8 mode): measured 30.7 dB / 1.27 (tiny.en), "
    "28.8 dB / 1.29 (base), top-1 8/8; full-scale noise on the embedding moves the logits by 34 and breaks top-1",
)
LITERT_INT8_DYNAMIC = Tolerance(
    20.0,
    5.0,
    0.75,
    "int8 weights per channel, activations quantized per call (XNNPACK dynamic range): measured 29.5 dB / 1.97 "
    "(tiny.en), 24.5 dB / 2.32 (base), top-1 8/8; 6 of 8 top-1 allows a near-tie flip",
)
# bump when the saved config or weights change (ctranslate2's input too)
TRANSFORMERS_RECIPE = "hf-whisper-from-openai-v1"

_DECLARED = (
    _declare(
        name=REFERENCE,
        description="openai-whisper in PyTorch (the reference)",
        recipe="openai-whisper-pytorch",
        toolchain=(),
        tolerances={"fp32": Tolerance(float("inf"), 0.0, 1.0, "the reference is the parity baseline: itself, exactly")},
        runtime="torch",
    ),
    _declare(
        name="torchscript",
        description="TorchScript, explicit KV cache",
        recipe="torchscript-kv-cache-v2",  # v2: from converters.forms.blocks (same math; op order, names differ)
        toolchain=(),
        tolerances={
            "fp32": Tolerance(
                80.0,
                1e-3,
                1.0,
                "traced fp32, the encoder's SDPA kept: encoder bit-identical (inf dB), "
                "logits 4.8e-5 (tiny.en) / 3.8e-5 (base) off; 80 dB and 20x room for other CPUs' kernels",
            ),
            "fp16": Tolerance(
                40.0,
                0.5,
                0.875,
                "half weights and activations (LayerNorm, softmax in fp32): measured "
                "57.3 dB / 0.031 (tiny.en), 55.1 dB / 0.041 (base) with torch's emulated half; room for "
                "native fp16 kernels' accumulation order and one near-tie flip in 8 steps",
            ),
            "int8": Tolerance(
                10.0,
                15.0,
                0.75,
                "quantize_dynamic on every Linear: measured 17.2 dB / 3.9 (tiny.en), "
                "13.8 dB / 9.7 (base), top-1 8/8; full-scale noise on the embedding gives 29 and top-1 "
                "0/8, so 6 of 8 top-1 is what catches a broken file",
            ),
        },
        runtime="torch",
    ),
    _declare(
        name="onnx",
        description="ONNX (dynamo export), KV cache, onnxruntime CPU",
        recipe="onnx-dynamo-kv-cache-v3",  # v3: every graph's batch dimension dynamic (v2: forms.blocks)
        toolchain=("onnx", "onnxscript", "onnx-ir", "onnxruntime"),
        tolerances={
            "fp32": Tolerance(
                80.0,
                1e-3,
                1.0,
                "onnxruntime on the dynamo export: encoder 118.8 dB / 115.1 dB, logits "
                "2.7e-5 / 8.0e-5 off (tiny.en / base); torchscript fp32's bounds, for the same reasons",
            ),
            "int8": Tolerance(
                12.0,
                16.0,
                0.75,
                "quantize_dynamic on every weight MatMul (LM head included), uint8 "
                "activations: measured 21.8 dB / 2.7 (tiny.en), 17.3 dB / 10.7 (base), top-1 8/8; noise on "
                "the vocabulary gives 27 and top-1 2/8, caught by 6/8",
            ),
        },
        runtime="onnxruntime-cpu",
        requires=("onnxruntime",),
    ),
    _declare(
        name="coreml",
        description="Core ML .mlpackage in ANE form; macOS only",
        recipe="ane-bc1s-static-kv-v1",
        toolchain=("coremltools",),
        tolerances={
            "fp32": Tolerance(
                60.0,
                1e-2,
                1.0,
                "ANE form in fp32 (1x1 convs, per-head einsum, bias-before-scale "
                "LayerNorm): the same math reassociated, like torchscript-mtk (tiny.en 110 dB, 2e-4)",
            ),
            "fp16": Tolerance(
                40.0,
                0.5,
                0.875,
                "float16 everywhere, as on the ANE: ~11-bit rounding at every op; "
                "tiny.en measured 56 dB and 0.05 on logits of magnitude ~20; margin for deeper models and "
                "one near-tie flip in 8 steps",
            ),
        },
        runtime="coreml",
    ),
    _declare(
        name="torchscript-mtk",
        description="MediaTek-friendly TorchScript: decoder on token embeddings, no gather, mask as buffer",
        recipe="mtk-embedding-decoder-v1",
        toolchain=(),
        tolerances={
            "fp32": Tolerance(
                60.0,
                1e-2,
                1.0,
                "fp32 re-tracing of the same math (explicit attention instead of SDPA): "
                "only float reassociation differs, so errors stay near fp32 epsilon after 4 to 32 layers",
            ),
        },
        runtime="torch",
    ),
    _declare(
        name="transformers",
        description="Hugging Face WhisperForConditionalGeneration from the same weights (SDPA, HF KV cache)",
        recipe=TRANSFORMERS_RECIPE,
        toolchain=("transformers", "safetensors"),
        tolerances={
            "fp32": Tolerance(
                80.0,
                1e-3,
                1.0,
                "HF Whisper on the same fp32 weights: encoder bit-identical (SNR inf), "
                "logits 2.2e-5 off (HF scales q once by d^-0.5, whisper q and k by d^-0.25); 80 dB and 1e-3 "
                "leave room for other CPUs' kernels and still catch any wrong weight",
            ),
        },
        runtime="torch",
        requires=("transformers",),
    ),
    _declare(
        name="ctranslate2",
        description="CTranslate2 (faster-whisper's engine) via its TransformersConverter; CPU",
        recipe=f"ct2-transformers-converter-v1+{TRANSFORMERS_RECIPE}",  # the HF folder is its input
        toolchain=("ctranslate2", "transformers"),
        tolerances={
            "fp32": Tolerance(
                80.0,
                1e-3,
                1.0,
                "CTranslate2 fp32 (its own GEMM/GELU kernels): encoder 112 dB, logits "
                "4.7e-5 off on tiny.en; 80 dB and 1e-3 keep a 30 dB / 20x margin and catch any wrong weight",
            ),
            "int8": Tolerance(
                15.0,
                4.0,
                0.75,
                "int8 weights per row, activations quantized on the fly: encoder 27.8 dB "
                "(tiny.en) / 24.2 dB (base), falling with depth, logits 1.73 / 1.83 off, top-1 8/8; room for "
                "deeper sizes and a near-tie flip; a perturbed embedding still fails by far",
            ),
        },
        runtime="ctranslate2-cpu",
        requires=("ctranslate2",),
    ),
    _declare(
        name="tflite",
        description="LiteRT .tflite via litert-torch, static KV cache, ai-edge-quantizer; LiteRT CPU (XNNPACK)",
        recipe="litert-static-kv-v2",  # v2: graphs from converters.forms.blocks (same math; op order and names differ)
        toolchain=TOOLCHAIN,
        tolerances={
            "fp32": LITERT_FP32,
            "fp16": LITERT_FP16,
            "int8-dynamic": LITERT_INT8_DYNAMIC,
            "int8-weight": LITERT_INT8_WEIGHT,
            CALIBRATED: Tolerance(
                20.0,
                5.0,
                0.75,
                "full int8 (per-tensor ranges calibrated on train-clean-100 audio) held to the dynamic form's bar, "
                "that of a usable int8 form; on tiny.en a calibration that loaded measured 0.2 dB, 28.5, top-1 0/8 "
                "(per-tensor int8 cannot hold whisper's outliers)",
            ),
        },
        runtime="litert-cpu",
        calibrated=frozenset({CALIBRATED}),
    ),
    _declare(
        name="executorch",
        description="ExecuTorch .pte lowered to XNNPACK (static KV cache, the LiteRT graphs); torchao int8",
        # v3: the blocks' outputs as extra outputs (probes); v2: LayerNorm written out, per-layer decoder inputs
        recipe="executorch-xnnpack-static-kv-v3",
        toolchain=("executorch", "torchao"),
        tolerances={
            "fp32": Tolerance(
                80.0,
                1e-3,
                1.0,
                "fp32 on XNNPACK (explicit attention and LayerNorm, static-cache decoder): measured 111.3 dB / 5.4e-5 "
                "(tiny.en), 109.3 dB / 1.3e-4 (base); LiteRT fp32's bars, for the same reasons",
            ),
            "int8": Tolerance(
                20.0,
                4.0,
                0.75,
                "torchao PT2E dynamic int8 per channel on every linear and conv (LM head included): measured "
                "32.0 dB / 1.50 (tiny.en), 27.6 dB / 1.62 (base), top-1 8/8; a perturbed embedding moves the "
                "logits by tens",
            ),
        },
        runtime="executorch-xnnpack",
        requires=("executorch",),
    ),
    _declare(
        name="mtk",
        description="MediaTek NPU form as .tflite (no gather, host embeddings, static KV cache); LiteRT CPU emulation",
        recipe=mtk_recipe(),
        toolchain=(*TOOLCHAIN, "mtk_converter", "ai-edge-litert-sdk-mediatek"),
        tolerances={"fp32": LITERT_FP32, "fp16": LITERT_FP16, "int8": LITERT_INT8_WEIGHT},
        runtime="litert-cpu (MediaTek emulation)",
        resource="mediatek",
    ),
)
TARGETS: dict[str, Target] = {t.name: t for t in _DECLARED}
assert REFERENCE in TARGETS


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise HarnessError(
            f"unknown target '{name}'{did_you_mean(name, TARGETS)}; known: {', '.join(TARGETS)}"
        ) from None
