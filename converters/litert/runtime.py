"""Running LiteRT graphs: which interpreter, tensors by name, and the static-cache decoder loop.

`ai-edge-litert` by default; `HARNESS_LITERT_INTERPRETER=tflite-runtime` selects the second
interpreter where its numpy < 2 pin can be met. Graphs take the `threads` the worker gives them:
the harness parallelises across workers, not inside a graph.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from converters.forms.static_cache import StaticCacheRunner
from converters.litert.graphs import CROSS_KV, DECODER, ENCODER, IO_NAMES, MASKED, IoNames
from harness.core.target import DEFAULT_THREADS, Artifact, Unavailable

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


def make_interpreter(path: Path, interpreter: str = INTERPRETERS[0], threads: int = DEFAULT_THREADS):
    if interpreter == "tflite-runtime":
        from tflite_runtime.interpreter import Interpreter
    else:
        from ai_edge_litert.interpreter import Interpreter
    return Interpreter(model_path=str(path), num_threads=threads)


def signature(interpreter, names: IoNames) -> tuple[dict, dict]:
    """Input and output details by name: from the signature litert-torch writes, else (a converter
    that writes none) by position in the traced module's order."""
    if interpreter.get_signature_list():
        runner = interpreter.get_signature_runner()
        return runner.get_input_details(), runner.get_output_details()
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    return dict(zip(names[0], inputs, strict=True)), dict(zip(names[1], outputs, strict=True))


class Graph:
    """One .tflite file on a LiteRT interpreter (XNNPACK on CPU), its tensors addressed by name.

    Values cross this boundary as float32: a fully quantized graph takes and returns int8
    tensors, so floats are quantized and results dequantized here with each tensor's own scale
    and zero point, as an application feeding such a graph (or an NPU) must do.
    """

    def __init__(self, path: Path, interpreter: str, names: IoNames, threads: int = DEFAULT_THREADS) -> None:
        self.interpreter = make_interpreter(path, interpreter, threads)
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


class CompiledGraph:
    """One .tflite file on LiteRT's CompiledModel API, the API that reaches a board's NPU (through
    the vendor's dispatch library) and also runs on the CPU, with `Graph`'s interface.

    Inputs live in host arrays; an input changed since the last run (a cache row written, say) is
    copied into its TensorBuffer before the next. Float I/O only: the MediaTek form's quantizations
    keep float activations at the graph's edges.
    """

    def __init__(self, path: Path, accelerators: Any, threads: int = DEFAULT_THREADS, environment: Any = None) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.options import CpuOptions, Options

        options = Options(hardware_accelerators=accelerators, cpu_options=CpuOptions(num_threads=threads))
        self.model = CompiledModel.from_file(str(path), environment=environment, options=options)
        (self.signature,) = self.model.get_signature_list()
        inputs = self.model.get_input_tensor_details(self.signature)
        self.shapes = {n: d["shape"] for n, d in self.model.get_output_tensor_details(self.signature).items()}
        if integer := sorted(n for n, d in inputs.items() if d["dtype"] != "float32"):
            raise Unavailable(f"{path.name}: integer tensors at the graph's edge ({', '.join(integer)})")
        self.arrays = {n: np.zeros(d["shape"], np.float32) for n, d in inputs.items()}
        self.inputs = {n: self.model.create_input_buffer_by_name(self.signature, n) for n in inputs}
        self.outputs = {n: self.model.create_output_buffer_by_name(self.signature, n) for n in self.shapes}
        self.changed = set(inputs)
        self.fully_accelerated = self.model.is_fully_accelerated()

    def set(self, name: str, value: np.ndarray) -> None:
        self.write(name, ..., value)

    def write(self, name: str, key: Any, value: np.ndarray | float) -> None:
        self.arrays[name][key] = value
        self.changed.add(name)

    def read(self, name: str) -> np.ndarray:
        return self.arrays[name].copy()

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        for name, value in inputs.items():
            self.set(name, value)
        for name in self.changed:
            self.inputs[name].write(self.arrays[name])
        self.changed.clear()
        self.model.run_by_name(self.signature, self.inputs, self.outputs)
        return {
            n: self.outputs[n].read(int(np.prod(shape)), np.float32).reshape(shape) for n, shape in self.shapes.items()
        }


class Runner(StaticCacheRunner):
    """Encoder, then the decoder one token at a time against the static cache.

    The self-attention cache lives in the decoder interpreter's own input buffers: a step writes
    only its new row, so no step copies the whole cache.
    """

    io_names = IO_NAMES

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS) -> None:
        self.encoder, self.cross_kv, self.decoder = self.load(artifact, threads)
        slots = artifact.manifest["io"][DECODER]["inputs"]["mask"]["shape"][-1]
        # the precomputed additive causal mask: row p lets position p see slots 0 .. p-1
        self.mask = np.where(np.arange(slots)[None] < np.arange(slots)[:, None], 0.0, MASKED).astype(np.float32)

    def load(self, artifact: Artifact, threads: int) -> tuple[Graph | CompiledGraph, ...]:
        """The encoder, cross-K/V and decoder graphs, on the interpreter the environment selects."""
        interpreter = os.environ.get(INTERPRETER_ENV, INTERPRETERS[0])
        reason = interpreter_unavailable(interpreter) or interpreter_refusal(
            interpreter, artifact.quant, artifact.manifest.get("toolchain", {})
        )
        if reason:
            raise Unavailable(reason)
        return tuple(
            Graph(artifact.file(name), interpreter, self.io_names[name], threads)
            for name in (ENCODER, CROSS_KV, DECODER)
        )

    def encode(self, mel: np.ndarray) -> np.ndarray:
        return self.encoder.run(mel=mel)["audio_features"]

    def start(self, audio_features: Any) -> None:
        for name, value in self.cross_kv.run(audio_features=np.asarray(audio_features, np.float32)).items():
            self.decoder.set(name, value)
        self.decoder.write("k_cache", ..., 0.0)
        self.decoder.write("v_cache", ..., 0.0)

    def embed(self, token: int, position: int) -> dict[str, np.ndarray]:
        """The decoder's token inputs (the MediaTek form looks the embeddings up on the host)."""
        return {"token": np.array([[token]], dtype=np.int32), "position": np.array([position], dtype=np.int32)}

    def decoder_inputs(self, token: int, position: int) -> dict[str, np.ndarray]:
        return {**self.embed(token, position), "mask": self.mask[position][None, None]}

    def advance(self, state: None, token: int, position: int) -> np.ndarray:
        out = self.decoder.run(**self.decoder_inputs(token, position))
        slot = (slice(None), slice(None), position)
        self.decoder.write("k_cache", slot, out["k_new"][:, :, 0])
        self.decoder.write("v_cache", slot, out["v_new"][:, :, 0])
        return out["logits"][0]
