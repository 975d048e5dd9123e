"""`tflite`: Whisper as LiteRT (.tflite) graphs, converted with litert-torch, run by ai-edge-litert.

Three fixed-shape graphs (whisper's attention does not export with a dynamic length):
- `encoder.tflite`: mel [1, n_mels, 3000] → audio_features [1, n_audio_ctx, d];
- `cross_kv.tflite`: audio_features → every layer's cross-attention keys and values, computed
  once per utterance instead of once per token;
- `decoder.tflite`: one token per call against a static self-attention KV cache of n_text_ctx
  slots. The host owns the cache: it feeds the cache and an additive mask row (filled slots 0,
  the rest `MASKED`), and writes the step's new key/value row back into slot `position`. The
  token's own key is concatenated inside the graph, so no scatter or dynamic-update op is needed
  and every shape is static.

Quantizations run ai-edge-quantizer on the float graphs: fp16 weights, int8 dynamic range,
int8 weight-only, and full int8 (weights and activations) calibrated on the train-clean-100
utterances in `data/librispeech-calibration/` (never evaluation audio); a quantized graph that
LiteRT's kernels refuse to prepare (full int8 with ai-edge-quantizer 0.10) makes the build
Unavailable with their reason. `converters/mtk.py` builds the MediaTek form from the same pieces.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from whisper.model import Whisper

from converters.protocol import Artifact, Refused, Unavailable
from harness.weights import Checkpoint

RECIPE = "litert-static-kv-v1"  # bump when the graphs or the quantization recipes change
TOOLCHAIN = ("litert-torch", "litert-converter", "ai-edge-litert", "ai-edge-quantizer")
ENCODER, CROSS_KV, DECODER = "encoder.tflite", "cross_kv.tflite", "decoder.tflite"
CACHE_INPUTS = ("mask", "k_cache", "v_cache", "cross_k", "cross_v")
DECODER_OUTPUTS = ("logits", "k_new", "v_new")
# (input names, output names) of each file, in the traced modules' argument and result order
IO_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    ENCODER: (("mel",), ("audio_features",)),
    CROSS_KV: (("audio_features",), ("cross_k", "cross_v")),
    DECODER: (("token", "position", *CACHE_INPUTS), DECODER_OUTPUTS),
}
CALIBRATION = Path(__file__).resolve().parents[1] / "data" / "librispeech-calibration"
CALIBRATION_STEPS = 6  # decoder steps recorded per calibration utterance, spread over its decode
# Additive mask value of an empty cache slot. Finite, not -inf: exp() underflows to 0 all the
# same, and a calibrated int8 graph needs a finite range for the mask input.
MASKED = -1e4
# Which interpreter runs the graphs; tflite-runtime only where its numpy < 2 pin can be met.
INTERPRETER_ENV = "HARNESS_LITERT_INTERPRETER"
INTERPRETERS = ("ai-edge-litert", "tflite-runtime")


def runtime_unavailable() -> str | None:
    return interpreter_unavailable(os.environ.get(INTERPRETER_ENV, INTERPRETERS[0]))


def interpreter_unavailable(interpreter: str) -> str | None:
    if interpreter not in INTERPRETERS:
        return f"{INTERPRETER_ENV}={interpreter!r} is not one of {', '.join(INTERPRETERS)}"
    module = "ai_edge_litert" if interpreter == "ai-edge-litert" else "tflite_runtime"
    if importlib.util.find_spec(module) is None:
        return f"{interpreter} is not installed"
    if interpreter == "tflite-runtime" and int(np.__version__.split(".")[0]) >= 2:
        return f"tflite-runtime 2.14 is built for numpy < 2; this environment has numpy {np.__version__}"
    return None


def interpreter_refusal(interpreter: str, quant: str, toolchain: dict[str, str]) -> str | None:
    """Why `interpreter` must not run an artifact of `quant` built with `toolchain`, or None.

    tflite-runtime 2.14 misreads the dynamic-range int8 files that ai-edge-quantizer writes
    (int8 weights, float activations quantized on the fly): it runs without an error and returns
    wrong numbers, so the combination is refused rather than measured.
    """
    if interpreter == "tflite-runtime" and quant == "int8-dynamic" and toolchain.get("ai-edge-quantizer") != "absent":
        return (
            f"tflite-runtime gives silently wrong results on dynamic-range int8 files from ai-edge-quantizer "
            f"{toolchain.get('ai-edge-quantizer', '(unknown version)')}; run this artifact with ai-edge-litert"
        )
    return None


# --- the graphs --------------------------------------------------------------------------------


def attend(n_head: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Whisper's qkv_attention for one query position, written out (no SDPA): q [1, 1, d]; k, v
    [1, T, d] with k already scaled by whisper's d_head**-0.25; mask [1, 1, T] additive or None."""
    d = q.shape[-1]
    q = q.view(1, 1, n_head, -1).permute(0, 2, 1, 3) * (d // n_head) ** -0.25
    k = k.view(1, -1, n_head, d // n_head).permute(0, 2, 3, 1)
    v = v.view(1, -1, n_head, d // n_head).permute(0, 2, 1, 3)
    w = q @ k
    if mask is not None:
        w = w + mask[:, None]
    return (torch.softmax(w, dim=-1) @ v).permute(0, 2, 1, 3).reshape(1, 1, d)


class EncoderGraph(nn.Module):
    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, mel: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"audio_features": self.encoder(mel)}


class CrossKVGraph(nn.Module):
    """Every decoder layer's cross-attention keys (pre-scaled) and values: [n_layer, 1, n_audio_ctx, d]."""

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.blocks = model.decoder.blocks

    def forward(self, audio_features: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = (audio_features.shape[-1] // self.blocks[0].cross_attn.n_head) ** -0.25
        keys = [b.cross_attn.key(audio_features) * scale for b in self.blocks]
        values = [b.cross_attn.value(audio_features) for b in self.blocks]
        return {"cross_k": torch.stack(keys), "cross_v": torch.stack(values)}


class DecoderLayers(nn.Module):
    """The decoder after its embeddings: one position against the static KV cache.

    x [1, 1, d]; mask [1, 1, N] additive over the cache slots; k_cache, v_cache [n_layer, 1, N, d]
    (keys pre-scaled, as this graph returns them); cross_k, cross_v from CrossKVGraph. Returns the
    logits [1, n_vocab] and this position's keys and values [n_layer, 1, 1, d] for the host to
    store in slot `position`.
    """

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.blocks = model.decoder.blocks
        self.ln = model.decoder.ln
        self.lm_head = model.decoder.token_embedding.weight  # tied to the embedding

    def forward(self, x, mask, k_cache, v_cache, cross_k, cross_v) -> dict[str, torch.Tensor]:
        n_head = self.blocks[0].attn.n_head
        scale = (x.shape[-1] // n_head) ** -0.25
        with_self = torch.cat([mask, torch.zeros_like(mask[..., :1])], dim=-1)  # the token sees itself
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            h = block.attn_ln(x)
            k, v = block.attn.key(h) * scale, block.attn.value(h)
            keys, values = torch.cat([k_cache[i], k], dim=1), torch.cat([v_cache[i], v], dim=1)
            x = x + block.attn.out(attend(n_head, block.attn.query(h), keys, values, with_self))
            h = block.cross_attn_ln(x)
            x = x + block.cross_attn.out(attend(n_head, block.cross_attn.query(h), cross_k[i], cross_v[i], None))
            x = x + block.mlp(block.mlp_ln(x))
            new_k.append(k)
            new_v.append(v)
        logits = nn.functional.linear(self.ln(x)[:, 0], self.lm_head)  # a FULLY_CONNECTED the quantizer takes
        return {"logits": logits, "k_new": torch.stack(new_k), "v_new": torch.stack(new_v)}


class TokenDecoderGraph(nn.Module):
    """The `tflite` decoder: token id and position in, both embedding lookups inside the graph."""

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.layers = DecoderLayers(model)
        self.token_embedding = model.decoder.token_embedding
        self.positional_embedding = model.decoder.positional_embedding

    def forward(self, token, position, mask, k_cache, v_cache, cross_k, cross_v) -> dict[str, torch.Tensor]:
        x = self.token_embedding(token) + self.positional_embedding[position][None]
        return self.layers(x, mask, k_cache, v_cache, cross_k, cross_v)


Part = tuple[nn.Module, dict[str, torch.Tensor]]  # a module and sample inputs that fix its shapes


def cache_samples(model: Whisper) -> dict[str, torch.Tensor]:
    """Sample values of the decoder's mask, cache and cross-attention inputs (CACHE_INPUTS)."""
    d = model.dims
    cache = torch.zeros(d.n_text_layer, 1, d.n_text_ctx, d.n_text_state)
    cross = torch.zeros(d.n_text_layer, 1, d.n_audio_ctx, d.n_text_state)
    mask = torch.full((1, 1, d.n_text_ctx), MASKED)
    return {"mask": mask, "k_cache": cache, "v_cache": cache.clone(), "cross_k": cross, "cross_v": cross.clone()}


def audio_parts(model: Whisper) -> dict[str, Part]:
    """The encoder and cross-attention graphs, the same in every LiteRT form."""
    d = model.dims
    return {
        ENCODER: (EncoderGraph(model), {"mel": torch.zeros(1, d.n_mels, 3000)}),
        CROSS_KV: (CrossKVGraph(model), {"audio_features": torch.zeros(1, d.n_audio_ctx, d.n_audio_state)}),
    }


def parts(model: Whisper) -> dict[str, Part]:
    token = {"token": torch.zeros(1, 1, dtype=torch.int32), "position": torch.zeros(1, dtype=torch.int32)}
    return {**audio_parts(model), DECODER: (TokenDecoderGraph(model), {**token, **cache_samples(model)})}


# --- conversion and quantization ----------------------------------------------------------------


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
        "int8-static": recipe.static_wi8_ai8,  # int8 weights and activations, calibrated ranges
    }
    if quant not in recipes:
        raise Unavailable(f"quantization {quant!r} has no LiteRT recipe (known: fp32, fp16, {', '.join(recipes)})")
    return recipes[quant]()


Calibration = Callable[[], Iterator[list[dict[str, np.ndarray]]]]


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
            ranges = q.calibrate({"serving_default": batch}, previous_calibration_result=ranges, num_threads=1)
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


def signature(interpreter, names: tuple[tuple[str, ...], tuple[str, ...]]) -> tuple[dict, dict]:
    """Input and output details by name: from the signature litert-torch writes, else (a converter
    that writes none) by position in the traced module's order."""
    if interpreter.get_signature_list():
        runner = interpreter.get_signature_runner()
        return runner.get_input_details(), runner.get_output_details()
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    return dict(zip(names[0], inputs, strict=True)), dict(zip(names[1], outputs, strict=True))


def io_facts(path: Path, names: tuple[tuple[str, ...], tuple[str, ...]]) -> dict[str, Any]:
    """Names, shapes, dtypes (and int8 scales) of a .tflite file's inputs and outputs."""
    interpreter = make_interpreter(path)
    inputs, outputs = signature(interpreter, names)

    def describe(details: dict) -> dict[str, Any]:
        facts = {}
        for name, d in details.items():
            facts[name] = {"shape": d["shape"].tolist(), "dtype": np.dtype(d["dtype"]).name}
            if d["quantization"][0] != 0.0:
                facts[name]["scale_zero_point"] = [float(d["quantization"][0]), int(d["quantization"][1])]
        return facts

    return {"inputs": describe(inputs), "outputs": describe(outputs)}


def calibration_audio() -> list[np.ndarray]:
    from harness.data import count_rows, plan_shards, read_shard
    from harness.spec import DatasetSpec

    spec = DatasetSpec(path=CALIBRATION)
    (shard,) = plan_shards(count_rows(spec), 1000)
    return [u.audio for u in read_shard(spec, shard) if u.audio is not None]


def calibration_sets(float_runner: Runner, model: Whisper, audio: list[np.ndarray]) -> dict[str, Calibration]:
    """Real inputs of each graph, recorded while the float graphs transcribe the calibration audio.

    The decoder's samples come from its own greedy decode (the shared loop) at
    `CALIBRATION_STEPS` positions spread over each utterance, so the cache holds real keys.
    """
    from harness.decoding import Dims, build_prompt, greedy_decode, log_mel
    from harness.spec import DecodingSpec

    d = model.dims
    dims = Dims(d.n_mels, d.n_vocab, d.n_text_ctx)
    prompt = build_prompt(dims, DecodingSpec())

    def encoder() -> Iterator[list[dict]]:
        for a in audio:
            yield [{"mel": log_mel(a, d.n_mels)}]

    def cross_kv() -> Iterator[list[dict]]:
        for a in audio:
            yield [{"audio_features": float_runner.encode(log_mel(a, d.n_mels))}]

    def decoder() -> Iterator[list[dict]]:
        for a in audio:
            # positions 0 .. the last one this utterance's decode feeds, then that decode recorded
            last = len(prompt.tokens) + greedy_decode(float_runner, a, dims, prompt).n_steps - 2
            float_runner.recording = Recording(set(np.linspace(0, last, CALIBRATION_STEPS).astype(int).tolist()))
            greedy_decode(float_runner, a, dims, prompt)
            yield float_runner.recording.samples
            float_runner.recording = None

    return {ENCODER: encoder, CROSS_KV: cross_kv, DECODER: decoder}


def build(
    model: Whisper, quant: str, out: Path, graphs: dict[str, Part], runner: type[Runner], exporter: Exporter = export
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
    audio: list[np.ndarray] = []
    if recipe is not None and quant == "int8-static":
        float_io = {name: io_facts(out / name, runner.io_names[name]) for name in graphs}
        audio = calibration_audio()
        calibration = calibration_sets(runner(Artifact("", "", "fp32", out, {"io": float_io})), model, audio)
    for name in graphs if recipe is not None else ():
        started = time.time()
        quantize(out / name, quant, calibration.get(name))
        seconds[name] += time.time() - started
    return {
        "io": {name: io_facts(out / name, runner.io_names[name]) for name in graphs},
        "quantization": {"tool": "ai-edge-quantizer", "recipe": quant} if recipe is not None else None,
        "calibration": (
            {"audio": f"data/{CALIBRATION.name}", "utterances": len(audio), "decoder_steps_each": CALIBRATION_STEPS}
            if audio
            else None
        ),
        "convert_s": {name: round(s, 2) for name, s in seconds.items()},
        "kv_cache": {"slots": model.dims.n_text_ctx, "masked": MASKED, "owner": "host"},
    }


def convert(checkpoint: Checkpoint, model: Whisper, quant: str, out: Path) -> dict[str, Any]:
    return {**build(model, quant, out, parts(model), Runner), "path": "litert-torch", "runtime": "litert-cpu"}


# --- running ------------------------------------------------------------------------------------


def make_interpreter(path: Path, interpreter: str = INTERPRETERS[0]):
    if interpreter == "tflite-runtime":
        from tflite_runtime.interpreter import Interpreter
    else:
        from ai_edge_litert.interpreter import Interpreter
    # one thread: the harness parallelises across utterances and workers, not inside a graph
    return Interpreter(model_path=str(path), num_threads=1)


class Graph:
    """One .tflite file on a LiteRT interpreter (XNNPACK on CPU), its tensors addressed by name.

    Values cross this boundary as float32: a fully quantized graph takes and returns int8
    tensors, so floats are quantized and results dequantized here with each tensor's own scale
    and zero point, as an application feeding such a graph (or an NPU) must do.
    """

    def __init__(self, path: Path, interpreter: str, names: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
        self.interpreter = make_interpreter(path, interpreter)
        self.interpreter.allocate_tensors()
        inputs, outputs = signature(self.interpreter, names)
        self.inputs = {n: d["index"] for n, d in inputs.items()}
        self.outputs = {n: d["index"] for n, d in outputs.items()}
        self.quantized = {  # name → (dtype, scale, zero point) of the tensors stored as integers
            n: (np.dtype(d["dtype"]), *d["quantization"])
            for n, d in {**inputs, **outputs}.items()
            if d["quantization"][0] != 0.0
        }

    def to_tensor(self, name: str, value: np.ndarray) -> np.ndarray:
        if name not in self.quantized:
            return value
        dtype, scale, zero_point = self.quantized[name]
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale) + zero_point, info.min, info.max).astype(dtype)

    def from_tensor(self, name: str, value: np.ndarray) -> np.ndarray:
        if name not in self.quantized:
            return value
        _, scale, zero_point = self.quantized[name]
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)

    def set(self, name: str, value: np.ndarray) -> None:
        self.interpreter.set_tensor(self.inputs[name], self.to_tensor(name, value))

    def write(self, name: str, key: Any, value: np.ndarray | float) -> None:
        """Update part of an input in place: input buffers persist from one run to the next."""
        buffer = self.interpreter.tensor(self.inputs[name])()
        buffer[key] = self.to_tensor(name, np.asarray(value, dtype=np.float32))
        del buffer  # the interpreter refuses to run while a view of its buffers is alive

    def read(self, name: str) -> np.ndarray:
        """A float copy of an input's current value."""
        return self.from_tensor(name, self.interpreter.tensor(self.inputs[name])().copy())

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        for name, value in inputs.items():
            self.set(name, value)
        self.interpreter.invoke()
        return {n: self.from_tensor(n, self.interpreter.get_tensor(i)) for n, i in self.outputs.items()}


class Runner:
    """Encoder, then the decoder one token at a time against the static cache.

    The self-attention cache lives in the decoder interpreter's own input buffers: a step writes
    only its new row, so no step copies the whole cache. One sequence at a time per Runner (a
    `None` cache starts a new one), as with the reference's hooks.
    """

    kv_cache = True
    io_names = IO_NAMES

    def __init__(self, artifact: Artifact) -> None:
        interpreter = os.environ.get(INTERPRETER_ENV, INTERPRETERS[0])
        reason = interpreter_unavailable(interpreter) or interpreter_refusal(
            interpreter, artifact.quant, artifact.manifest.get("toolchain", {})
        )
        if reason:
            raise Unavailable(reason)
        self.encoder, self.cross_kv, self.decoder = (
            Graph(artifact.file(name), interpreter, self.io_names[name]) for name in (ENCODER, CROSS_KV, DECODER)
        )
        slots = artifact.manifest["io"][DECODER]["inputs"]["mask"]["shape"][-1]
        # the precomputed additive causal mask: row p lets position p see slots 0 .. p-1
        self.mask = np.where(np.arange(slots)[None] < np.arange(slots)[:, None], 0.0, MASKED).astype(np.float32)
        self.recording: Recording | None = None  # set while calibration inputs are captured

    def encode(self, mel: np.ndarray) -> np.ndarray:
        return self.encoder.run(mel=mel)["audio_features"]

    def step(self, tokens: Sequence[int], audio_features: Any, cache: Any) -> tuple[np.ndarray, Any]:
        if cache is None:  # a new sequence: its cross-attention keys and values, an empty cache
            for name, value in self.cross_kv.run(audio_features=np.asarray(audio_features, np.float32)).items():
                self.decoder.set(name, value)
            self.decoder.write("k_cache", ..., 0.0)
            self.decoder.write("v_cache", ..., 0.0)
            cache = 0
        for position in range(cache, len(tokens)):
            logits = self.advance(tokens[position], position)
        return logits, len(tokens)  # the cache: how many positions it holds

    def embed(self, token: int, position: int) -> dict[str, np.ndarray]:
        """The decoder's token inputs (the MediaTek form looks the embeddings up on the host)."""
        return {"token": np.array([[token]], dtype=np.int32), "position": np.array([position], dtype=np.int32)}

    def advance(self, token: int, position: int) -> np.ndarray:
        inputs = {**self.embed(token, position), "mask": self.mask[position][None, None]}
        out = self.decoder.run(**inputs)
        if self.recording is not None and position in self.recording.positions:
            self.recording.capture(inputs, self.decoder)
        slot = (slice(None), slice(None), position)
        self.decoder.write("k_cache", slot, out["k_new"][:, :, 0])
        self.decoder.write("v_cache", slot, out["v_new"][:, :, 0])
        return out["logits"][0]


@dataclass
class Recording:
    """Decoder inputs captured at chosen positions of one sequence, for calibration."""

    positions: set[int]
    samples: list[dict[str, np.ndarray]] = field(default_factory=list)
    cross: dict[str, np.ndarray] = field(default_factory=dict)  # one copy per sequence, shared

    def capture(self, inputs: dict[str, np.ndarray], decoder: Graph) -> None:
        if not self.cross:
            self.cross = {n: decoder.read(n) for n in ("cross_k", "cross_v")}
        cache = {n: decoder.read(n) for n in ("k_cache", "v_cache")}
        self.samples.append({**inputs, **cache, **self.cross})
