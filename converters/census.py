"""What executes where inside an artifact, read from its files: for each graph, operators by type
and how many of them run inside the accelerator's partitions (XNNPACK for LiteRT and ExecuTorch)
rather than the fallback kernels; the weights' bytes per precision (is the "int8" model int8 where
it matters?); the largest tensors; and the checks a device form promises (none of
`converters.litert.NPU_UNSUPPORTED_OPS` in the MediaTek graphs, no dimension past the Apple Neural
Engine's 16,384 in the Core ML form).

One function per file format, each importing only its own reader. ExecuTorch's census is made
when the program is lowered (`converters.executorch_target.census`: a .pte keeps no record of
which operators a partition swallowed) and read from the manifest here.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.litert import NPU_UNSUPPORTED_OPS
from harness.core.target import Artifact, Unavailable

CENSUS_FILE = "census.json"  # a run's: every converted model's census, by label
LARGEST = 5  # tensors listed per file
ANE_MAX_DIM = 16_384  # the Apple Neural Engine's cap on one dimension
MATMUL_OPS = frozenset({"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL"})  # LiteRT's products


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclass(frozen=True)
class GraphCensus:
    """One graph file: `ops` every operator by type; `delegated` those of them inside the
    accelerator's partitions (None: the runtime has no delegate to report, every op on `engine`);
    `weights` constant bytes per dtype; `largest` the biggest constants."""

    file: str
    engine: str
    ops: dict[str, int]
    delegated: dict[str, int] | None = None
    partitions: int | None = None
    weights: dict[str, int] = field(default_factory=dict)
    largest: tuple[Tensor, ...] = ()
    # multiply-accumulates of one call of the graph's matrix products and convolutions, by the
    # precision of their weight operand (an activation's, for an activation x activation product);
    # None where the file has no static shapes to count them by (ONNX's are dynamic)
    compute: dict[str, int] | None = None

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def delegated_share(self) -> float | None:
        return None if self.delegated is None else sum(self.delegated.values()) / max(self.n_ops, 1)

    def weight_share(self, dtype: str) -> float:
        return self.weights.get(dtype, 0) / max(sum(self.weights.values()), 1)

    def compute_share(self, dtype: str) -> float | None:
        return None if self.compute is None else self.compute.get(dtype, 0) / max(sum(self.compute.values()), 1)


@dataclass(frozen=True)
class Census:
    model: str  # size/target/quant
    graphs: tuple[GraphCensus, ...]
    checks: dict[str, str]  # a device form's promise → "ok" or what breaks it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, facts: dict[str, Any]) -> Census:
        graphs = tuple(
            GraphCensus(**{**g, "largest": tuple(Tensor(**{**t, "shape": tuple(t["shape"])}) for t in g["largest"])})
            for g in facts["graphs"]
        )
        return cls(facts["model"], graphs, facts["checks"])


def _largest(tensors: Iterable[Tensor]) -> tuple[Tensor, ...]:
    return tuple(sorted(tensors, key=lambda t: -t.bytes)[:LARGEST])


def _weights(tensors: Iterable[Tensor]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for t in tensors:
        out[t.dtype] += t.bytes
    return dict(out)


def tflite_census(path: Path) -> GraphCensus:
    """A .tflite graph: its operators, and those the default delegate (XNNPACK) took when LiteRT
    applied it: each DELEGATE node of the execution plan stands for the nodes between its inputs
    and its outputs in the plain graph."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    plain = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    nodes = plain._get_ops_details()
    ops = Counter(n["op_name"] for n in nodes)
    with_delegate = Interpreter(model_path=str(path))
    with_delegate.allocate_tensors()
    delegates = [n for n in with_delegate._get_ops_details() if n["op_name"] == "DELEGATE"]
    produced_by = {int(t): n for n in nodes for t in n["outputs"]}
    taken: dict[int, str] = {}
    for delegate in delegates:  # walk back from its outputs to its inputs
        inputs, todo = {int(t) for t in delegate["inputs"]}, [int(t) for t in delegate["outputs"]]
        while todo:
            node = produced_by.get(todo.pop())
            if node is None or node["index"] in taken:
                continue
            taken[node["index"]] = node["op_name"]
            todo += [int(t) for t in node["inputs"] if int(t) >= 0 and int(t) not in inputs]
    constants = tflite_constants(path.read_bytes())
    return GraphCensus(path.name, "LiteRT CPU (XNNPACK)", dict(ops), dict(Counter(taken.values())), len(delegates),
                       _weights(constants), _largest(constants), tflite_compute(plain, nodes))  # fmt: skip


def tflite_compute(interpreter: Any, nodes: list[dict]) -> dict[str, int]:
    """MACs per precision of a .tflite graph's products (static shapes): output elements x the
    reduced dimension, by the dtype of the weight operand (the second input)."""
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    out: Counter[str] = Counter()
    for node in nodes:
        if node["op_name"] not in MATMUL_OPS:
            continue
        weight, output = tensors[int(node["inputs"][1])], tensors[int(node["outputs"][0])]
        reduced = int(np.prod(weight["shape"][1:])) if node["op_name"] != "BATCH_MATMUL" else int(weight["shape"][-2])
        out[np.dtype(weight["dtype"]).name] += int(np.prod(output["shape"])) * reduced
    return dict(out)


TFLITE_DTYPES = {
    0: "float32",
    1: "float16",
    2: "int32",
    3: "uint8",
    4: "int64",
    6: "bool",
    7: "int16",
    9: "int8",
    10: "float64",
    17: "int4",
    18: "bfloat16",
}  # fmt: skip  (schema.fbs TensorType)


def tflite_constants(data: bytes) -> list[Tensor]:
    """The tensors of a .tflite file's main graph that carry data in the file (its weights):
    the flatbuffer read directly, since the interpreter does not tell weights from activations."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    out = []
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        buffer = model.Buffers(tensor.Buffer())
        size = buffer.DataLength() or buffer.Size()  # inline data, or an offset past the flatbuffer
        if size:
            shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
            out.append(Tensor(tensor.Name().decode(), shape, TFLITE_DTYPES.get(tensor.Type(), str(tensor.Type())),
                              int(size)))  # fmt: skip
    return out


def onnx_census(path: Path) -> GraphCensus:
    """An .onnx graph: its operators and initializers (onnxruntime's CPU provider runs them all)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    constants = []
    for init in model.graph.initializer:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
        shape = tuple(int(d) for d in init.dims)
        constants.append(Tensor(init.name, shape, dtype.name, int(np.prod(shape)) * dtype.itemsize))
    return GraphCensus(path.name, "onnxruntime CPUExecutionProvider", dict(ops), None, None,
                       _weights(constants), _largest(constants))  # fmt: skip


def torchscript_census(path: Path) -> GraphCensus:
    """A TorchScript file: the operators of its inlined forward graph and its parameters."""
    import torch

    module = torch.jit.load(str(path), map_location="cpu")
    graph = module.forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    ops = Counter(n.kind().removeprefix("aten::") for n in graph.nodes() if n.kind().startswith("aten::"))
    constants = [
        Tensor(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
        for name, t in module.state_dict().items()
    ]
    return GraphCensus(path.name, "torch (eager kernels)", dict(ops), None, None, _weights(constants),
                       _largest(constants))  # fmt: skip


SAFETENSORS_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "I8": ("int8", 1),
                      "I64": ("int64", 8), "I32": ("int32", 4)}  # fmt: skip


def safetensors_census(path: Path) -> GraphCensus:
    """A .safetensors file (transformers): its tensors from the JSON header; no graph in the file."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    constants = []
    for name, facts in header.items():
        if name == "__metadata__":
            continue
        dtype, size = SAFETENSORS_DTYPES.get(facts["dtype"], (facts["dtype"].lower(), 0))
        shape = tuple(facts["shape"])
        constants.append(Tensor(name, shape, dtype, int(np.prod(shape)) * size))
    return GraphCensus(path.name, "torch (transformers)", {}, None, None, _weights(constants), _largest(constants))


def ct2_census(path: Path) -> GraphCensus:
    """CTranslate2's model.bin: its variables (the engine's kernels are fixed: no graph in the file)."""
    from harness.core.ct2_model_bin import parse_model_bin

    variables = parse_model_bin(path.read_bytes())
    constants = [
        Tensor(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
        for name, t in variables.items()
    ]
    return GraphCensus(path.name, "CTranslate2 CPU", {}, None, None, _weights(constants), _largest(constants))


def executorch_census(path: Path, manifest: dict[str, Any]) -> GraphCensus:
    """A .pte program: the census recorded when it was lowered (`converters.executorch_target`)."""
    facts = manifest.get("census", {}).get(path.name)
    if facts is None:
        return GraphCensus(path.name, "ExecuTorch (XNNPACK)", {})
    delegated, portable = facts["delegated"], facts["portable"]
    ops = Counter(delegated) + Counter(portable)
    constants = [Tensor(t["name"], tuple(t["shape"]), t["dtype"], t["bytes"]) for t in facts.get("constants", [])]
    return GraphCensus(path.name, "ExecuTorch (XNNPACK)", dict(ops), dict(delegated), facts["partitions"],
                       _weights(constants), _largest(constants), facts.get("compute"))  # fmt: skip


READERS: dict[str, Callable[[Path], GraphCensus]] = {
    ".tflite": tflite_census,
    ".onnx": onnx_census,
    ".pt": torchscript_census,
    ".safetensors": safetensors_census,
}


def census(artifact: Artifact) -> Census:
    """The census of every graph file of `artifact`, and its device form's checks."""
    graphs = []
    for name in sorted(artifact.manifest.get("files", {})):
        path = artifact.path / name
        try:
            if path.suffix == ".pte":
                graphs.append(executorch_census(path, artifact.manifest))
            elif name == "model.bin":
                graphs.append(ct2_census(path))
            elif path.suffix in READERS:
                graphs.append(READERS[path.suffix](path))
        except ImportError as exc:  # the reader's runtime is not installed on this machine
            raise Unavailable(f"{artifact.path.name}/{name}: reading it needs {exc.name}, not installed here") from None
    return Census(f"{artifact.size}/{artifact.target}/{artifact.quant}", tuple(graphs), checks(artifact, graphs))


def checks(artifact: Artifact, graphs: list[GraphCensus]) -> dict[str, str]:
    """The promises of the device forms, kept or broken."""
    out = {}
    if artifact.target == "mtk":
        found = [f"{g.file}: {op}" for g in graphs for op in g.ops if op in NPU_UNSUPPORTED_OPS]
        out["no GATHER or cache write (MediaTek NPU)"] = "ok" if not found else "found " + ", ".join(found)
    if artifact.target == "coreml":
        chunks, n_vocab = artifact.manifest.get("vocab_chunks"), artifact.manifest["dims"]["n_vocab"]
        widest = -(-n_vocab // chunks) if chunks else n_vocab  # the vocabulary projection's widest chunk
        out[f"no dimension past {ANE_MAX_DIM} (ANE)"] = (
            "ok" if widest <= ANE_MAX_DIM else f"the vocabulary projection's chunks are {widest} wide"
        )
    return out


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def precision_line(weights: dict[str, int]) -> str:
    """`int8 74%, float32 26% of 32.8 MB`: the weights' bytes per dtype, largest first."""
    total = sum(weights.values())
    if not total:
        return "-"
    shares = sorted(weights.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{dtype} {n / total:.0%}" for dtype, n in shares if n / total >= 0.005) + f" of {mb(total)}"


def compute_line(compute: dict[str, int] | None) -> str:
    """`int8 97%, float32 3% of 1.2 GMAC`: a graph's products by precision, or why not counted."""
    if compute is None:
        return "not counted (dynamic shapes)"
    total = sum(compute.values())
    if not total:
        return "-"
    shares = sorted(compute.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{dtype} {n / total:.0%}" for dtype, n in shares if n / total >= 0.005)
    return text + f" of {total / 1e9:.2f} GMAC"


def delegation_line(graph: GraphCensus) -> str:
    """`382 ops, 375 (98%) in 1 XNNPACK partition; fallback: RESHAPE 2, ADD 1`, or the engine's
    ops when it has no delegate to report."""
    if graph.delegated is None:
        return f"{graph.n_ops} ops" if graph.ops else "no graph in the file (the engine's own kernels)"
    fallback = Counter(graph.ops) - Counter(graph.delegated)
    share = graph.delegated_share or 0.0
    text = f"{graph.n_ops} ops, {sum(graph.delegated.values())} ({share:.0%}) in {graph.partitions} partition(s)"
    return text + ("; fallback: " + ", ".join(f"{op} {n}" for op, n in fallback.most_common()) if fallback else "")


def short_name(name: str) -> str:
    """A tensor's name for a table: a scoped converter name (`a.b.Graph/c.d.Block_3/e.Linear_0`)
    as its last two scopes without module paths (`Block_3/Linear_0`); any other as it is. The full
    one is in `inspect --json`."""
    if "/" not in name:
        return name
    scopes = name.split(";")[0].split("/")
    return "/".join(scope.rsplit(".", 1)[-1] for scope in scopes[-2:])


def format_census(c: Census) -> str:
    """What `harness inspect` prints: a block per graph file, then the device form's checks."""
    lines = [c.model]
    for g in c.graphs:
        lines.append(f"  {g.file} on {g.engine}")
        lines.append(f"    operators: {delegation_line(g)}")
        if g.ops:
            top = ", ".join(f"{op} {n}" for op, n in Counter(g.ops).most_common(8))
            lines.append(f"    by type: {top}")
        lines.append(f"    weights: {precision_line(g.weights)}")
        if g.ops:
            lines.append(f"    compute: {compute_line(g.compute)}")
        if g.largest:
            big = ", ".join(f"{short_name(t.name)} {list(t.shape)} {t.dtype} {mb(t.bytes)}" for t in g.largest[:3])
            lines.append(f"    largest: {big}")
    lines += [f"  check: {name}: {verdict}" for name, verdict in c.checks.items()]
    return "\n".join(lines)


def find_artifact(models_root: Path, model: str) -> Path:
    """An artifact folder named by its path, or by `size/target/quant` in the store (the newest
    build where several keys exist). One-line errors name what was looked for."""
    from converters.registry import get_target
    from harness.core.errors import HarnessError

    as_path = Path(model)
    if (as_path / "manifest.json").is_file():
        return as_path
    parts = model.split("/")
    if len(parts) != 3:
        raise HarnessError(f"{model}: neither an artifact folder (no manifest.json) nor size/target/quant")
    size, target, quant = parts
    get_target(target).tolerance(quant)  # an unknown target or quantization: its did-you-mean line
    prefix = f"{target}-{quant}-"
    found = sorted(
        (
            p
            for p in (models_root / size).glob(prefix + "*")
            if "-" not in p.name[len(prefix) :] and (p / "manifest.json").is_file()  # not int8 for int8-dynamic
        ),
        key=lambda p: (p / "manifest.json").stat().st_mtime,
    )
    if not found:
        raise HarnessError(f"{model}: no artifact in {models_root} (build it: python -m harness convert "
                           f"--sizes {size} --targets {target} --quant {quant})")  # fmt: skip
    return found[-1]
