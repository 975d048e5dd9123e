"""`executorch`: Whisper as ExecuTorch programs (.pte) lowered to XNNPACK, run by `executorch.runtime`.

The graphs are the LiteRT forms' (`converters.litert.graphs`: the same fixed shapes and the
host-owned static KV cache, so a phone app drives both alike): `encoder.pte`, `cross_kv.pte` (every
layer's prescaled cross-attention keys and values, once per utterance) and `decoder.pte` (one
token per call against the cache; the host writes the step's keys and values into slot
`position`). Each is exported with `torch.export`, lowered with `to_edge_transform_and_lower` and
the XNNPACK partitioner, and its census written to the manifest: operators by type, inside an
XNNPACK partition or left to the portable CPU kernels, and how many partitions.

Quantizations:

- fp32: the exported graphs.
- int8: XNNPACK's quantizer through torchao's PT2E flow, dynamic per-channel (int8 weights per
  output channel, activations quantized per call), on every linear (the LM head included) and
  convolution. `convert_pt2e` leaves `_assert_tensor_metadata` checks on the float weights it
  replaced; they are dropped, or the program keeps every fp32 weight as well (tiny.en's encoder:
  40 MB instead of 11.7 MB).

What was found when the form was measured (tiny.en, 1 thread), and what the export does about it:

- whisper's SDPA path lowers badly (the encoder at 1056 ms against 432 ms written out): attention
  is written out (`whisper.model.disable_sdpa`); the logits are `F.linear` on the embedding
  (`x @ W.T` is not delegated).
- XNNPACK 1.5.1 takes no LayerNorm, nor a mean over the last dimension alone: left as they are,
  they split the decoder into 30 partitions. Each LayerNorm is exported written out, its two
  means as `F.linear` on a 1/d row (`LinearMeanLayerNorm`), so XNNPACK takes it.
- a 4-D matmul lowers to `expand_copy` (same shape: a copy of every cached key and value, per layer
  and step, in the portable kernels); XNNPACK's own no-op pass removes them before partitioning.
- the decoder takes each layer's cache and cross-attention keys and values as inputs of their own:
  selecting a layer from a stacked input is a `select_copy` of it at every step.
- the token embedding is a gather left to the portable kernels while the tied LM head is packed
  into XNNPACK, so the decoder stores that matrix twice (tiny.en fp32: 80 MB each copy).

Graph inputs are not memory-planned (`alloc_graph_input=False`): a step hands the runtime the
host's cache tensors themselves, so no step copies the cache or the cross-attention keys.
"""

from __future__ import annotations

import copy
import operator
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from whisper.model import Whisper

from converters.forms.static_cache import StaticCacheRunner
from converters.litert import graphs as litert_graphs
from harness.core.checkpoint import Checkpoint
from harness.core.target import DEFAULT_THREADS, Artifact, Implementation, Unavailable, needs, require

ENCODER, CROSS_KV, DECODER = "encoder.pte", "cross_kv.pte", "decoder.pte"
FILES = {litert_graphs.ENCODER: ENCODER, litert_graphs.CROSS_KV: CROSS_KV, litert_graphs.DECODER: DECODER}
IO_NAMES = {FILES[name]: names for name, names in litert_graphs.IO_NAMES.items()}
QUANTS = ("fp32", "int8")
RUNTIME = "executorch-xnnpack"
DELEGATE_CALL = "executorch_call_delegate"
PER_LAYER = ("k_cache", "v_cache", "cross_k", "cross_v")  # the decoder's inputs given one tensor per layer


class LinearMeanLayerNorm(nn.Module):
    """whisper's LayerNorm written out for XNNPACK, the means over the channels as `F.linear` on a
    1/d row (XNNPACK's mean reduces the two innermost dimensions of a 4-D tensor only)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        (d,) = norm.normalized_shape
        self.register_buffer("row", torch.full((1, d), 1.0 / d), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - F.linear(x, self.row)
        variance = F.linear(centred * centred, self.row)
        return centred * torch.rsqrt(variance + self.eps) * self.weight + self.bias


def for_xnnpack(module: nn.Module) -> nn.Module:
    """A copy of `module` with its LayerNorms as `LinearMeanLayerNorm` (the model stays as it is)."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, LinearMeanLayerNorm(child))
    return module.eval()


def layerwise(sample: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The decoder's sample with each stacked per-layer input (caches, cross K/V) as a tuple of
    its layers: `DecoderLayers` indexes either alike, and the program gets one input per layer."""
    return {k: tuple(v.unbind(0)) if k in PER_LAYER else v for k, v in sample.items()}


class Probed(nn.Module):
    """A graph that also returns the outputs of its blocks (`blocks`: name → the block's path in
    the graph; a block returning several: its first), named `encoder.blocks.<i>` /
    `decoder.blocks.<i>` after the graph's own outputs: the probes the layer drift reads
    (`converters.layer_drift`), fixed here, at conversion. Forward hooks, set for one call, collect
    them, so the graph's code stays as it is; the export traces them into ordinary outputs."""

    def __init__(self, graph: nn.Module, blocks: dict[str, str]) -> None:
        super().__init__()
        self.inner, self.blocks = graph, blocks  # not `graph`: an exported module's own attribute

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.blocks)

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Any:
            return lambda _module, _inputs, out: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)

        hooks = [self.inner.get_submodule(path).register_forward_hook(keep(n)) for n, path in self.blocks.items()]
        try:
            outputs = self.inner(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return {**outputs, **{name: seen[name] for name in self.blocks}}


def probed(name: str, graph: nn.Module) -> nn.Module:
    """The encoder and decoder graphs with their blocks' outputs (cross K/V has no blocks)."""
    if name == ENCODER:
        return Probed(graph, {f"encoder.blocks.{i}": f"encoder.blocks.{i}" for i in range(len(graph.encoder.blocks))})
    if name == DECODER:
        return Probed(graph, {f"decoder.blocks.{i}": f"layers.blocks.{i}" for i in range(len(graph.layers.blocks))})
    return graph


def quantized(module: nn.Module, sample: dict[str, Any]) -> nn.Module:
    """`module` through torchao's PT2E flow with XNNPACK's dynamic per-channel int8 config (the
    LayerNorms' means excepted), its leftover metadata checks dropped (they would keep the float
    weights alive)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(module, args=(), kwargs=sample, strict=False).module()
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    quantizer = XNNPACKQuantizer().set_global(config)
    # the normalisations' means stay float: int8 activations there cost ~8 dB of encoder SNR (tiny.en)
    quantizer.set_module_type(LinearMeanLayerNorm, None)
    prepared = prepare_pt2e(graph, quantizer)
    prepared(**sample)  # dynamic activations need no ranges; one call settles the observers
    converted = convert_pt2e(prepared)
    for node in list(converted.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            converted.graph.erase_node(node)
    converted.graph.eliminate_dead_code()
    converted.recompile()
    return converted


def lower(module: nn.Module, sample: dict[str, Any], quant: str) -> tuple[bytes, dict[str, Any]]:
    """One graph as an XNNPACK-lowered ExecuTorch program, and its census."""
    from executorch.backends.xnnpack._passes.remove_noop_expand_copy_pass import RemoveNoopExpandCopyPass
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from whisper.model import disable_sdpa

    with torch.no_grad(), disable_sdpa():
        graph = quantized(for_xnnpack(module), sample) if quant == "int8" else for_xnnpack(module)
        exported = torch.export.export(graph, args=(), kwargs=sample, strict=False)
        edge = to_edge_transform_and_lower(
            exported, transform_passes=[RemoveNoopExpandCopyPass()], partitioner=[XnnpackPartitioner()]
        )
        census_of = {
            **delegation(edge.exported_program()),
            "constants": constants(exported),
            "compute": compute(exported),
        }
        program = edge.to_executorch(
            ExecutorchBackendConfig(memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False))
        )
    return program.buffer, census_of


def delegation(program: Any) -> dict[str, Any]:
    """What executes where in a lowered program: each operator's count inside XNNPACK partitions
    and in the portable kernels, and the number of partitions."""
    delegated: Counter[str] = Counter()
    portable: Counter[str] = Counter()
    partitions = 0
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if getattr(node.target, "__name__", "") == DELEGATE_CALL:
            partitions += 1
            lowered = getattr(program.graph_module, node.args[0].target)
            inside = [n for n in lowered.original_module.graph.nodes if n.op == "call_function"]
            delegated.update(_op_name(n.target) for n in inside if n.target is not operator.getitem)
        else:
            portable[_op_name(node.target)] += 1
    return {
        "backend": "XnnpackBackend",
        "partitions": partitions,
        "delegated": dict(delegated),
        "portable": dict(portable),
    }


def constants(program: Any) -> list[dict[str, Any]]:
    """The weights an exported program uses (before lowering, where each is one tensor): name,
    shape, dtype and bytes; int8 after quantization where the quantizer took them. Parameters no
    node reads any more (the float weights a quantized product replaced) are not counted."""
    signature = program.graph_signature
    lifted = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }
    tensors = {**program.state_dict, **program.constants}
    used = [lifted[n.name] for n in program.graph.nodes if n.op == "placeholder" and n.users and n.name in lifted]
    return [
        {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
         "bytes": t.numel() * t.element_size()}
        for name in used
        if isinstance(t := tensors.get(name), torch.Tensor)
    ]  # fmt: skip


PRODUCTS = {"linear", "conv1d", "conv2d", "convolution", "mm", "bmm", "matmul", "addmm"}


def compute(program: Any) -> dict[str, int]:
    """MACs of one call per precision (before lowering, shapes static): each product's output
    elements x its reduced dimension, by its weight's dtype (int8 where the weight comes out of a
    dequantize of int8 values, as the quantizer writes it)."""
    out: Counter[str] = Counter()
    for node in program.graph.nodes:
        if node.op != "call_function" or _op_name(node.target) not in PRODUCTS:
            continue
        weight = node.args[1]
        shape = weight.meta["val"].shape
        reduced = int(shape[-2]) if _op_name(node.target) in ("bmm", "matmul", "mm") else int(np.prod(shape[1:]))
        source = weight.args[0] if weight.op == "call_function" and "dequantize" in str(weight.target) else weight
        dtype = str(source.meta["val"].dtype).removeprefix("torch.")
        out[dtype] += int(np.prod(node.meta["val"].shape)) * reduced
    return dict(out)


def _op_name(target: Any) -> str:
    """An operator's short name: `aten.linear.default` → `linear`."""
    name = getattr(target, "__name__", str(target))
    return name.split(".")[-2] if name.count(".") >= 2 else name.split(".")[0]


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    require("executorch", "torchao")
    if quant not in QUANTS:
        raise Unavailable(f"quantization {quant!r} has no ExecuTorch recipe (known: {', '.join(QUANTS)})")
    seconds: dict[str, float] = {}
    census_of: dict[str, Any] = {}
    io: dict[str, Any] = {}
    probes: dict[str, list[str]] = {}  # per file: the block outputs after its own, in order
    for graph, (module, sample) in litert_graphs.parts(model).items():
        name, started = FILES[graph], time.time()
        assert tuple(sample) == IO_NAMES[name][0], name  # the Runner feeds these names, in this order
        graph_module = probed(name, module)
        buffer, census_of[name] = lower(graph_module, layerwise(sample) if name == DECODER else sample, quant)
        if isinstance(graph_module, Probed):
            probes[name] = list(graph_module.names)
        (out / name).write_bytes(buffer)
        seconds[name] = round(time.time() - started, 2)
        io[name] = {"inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                               for k, v in sample.items()},
                    "outputs": list(IO_NAMES[name][1])}  # fmt: skip
    return {
        "io": io,
        "quantization": (
            {"tool": "torchao pt2e + XNNPACKQuantizer", "recipe": "dynamic int8, per channel"}
            if quant == "int8"
            else None
        ),
        "convert_s": seconds,
        "census": census_of,
        "probes": probes,
        "kv_cache": {
            "slots": model.dims.n_text_ctx,
            "masked": litert_graphs.MASKED,
            "owner": "host",
            "inputs": "one per layer: " + ", ".join(PER_LAYER),
        },
        "path": "torch.export + to_edge_transform_and_lower(XnnpackPartitioner)",
        "runtime": RUNTIME,
    }


def set_threads(threads: int) -> None:
    """ExecuTorch's XNNPACK threadpool is one per process: the worker's thread count."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    if _threadpool_get_thread_count() != threads:
        _unsafe_reset_threadpool(threads)


class Runner(StaticCacheRunner):
    """Encoder, cross-K/V once per utterance, then the decoder one token at a time against the
    host's static cache (torch tensors handed to the runtime as they are, written in place)."""

    runtime = RUNTIME

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS) -> None:
        require("executorch")
        from executorch.runtime import Runtime

        set_threads(threads)
        runtime = Runtime.get()
        self.encoder, self.cross_kv, self.decoder = (
            runtime.load_program(artifact.file(name)).load_method("forward") for name in (ENCODER, CROSS_KV, DECODER)
        )
        shapes = artifact.manifest["io"][DECODER]["inputs"]
        slots = shapes["mask"]["shape"][-1]
        # the precomputed additive causal mask: row p lets position p see slots 0 .. p-1
        mask = torch.where(torch.arange(slots)[None] < torch.arange(slots)[:, None], 0.0, litert_graphs.MASKED)
        self.mask = mask.to(torch.float32)
        self.k_cache = torch.zeros(shapes["k_cache"]["shape"])
        self.v_cache = torch.zeros(shapes["v_cache"]["shape"])
        self.layers: list[torch.Tensor] = []
        # the blocks' outputs of the last encode and decoder step (`converters.layer_drift`)
        self.probe_names: dict[str, list[str]] = artifact.manifest.get("probes", {})
        self.probes: dict[str, torch.Tensor] = {}

    def encode(self, mel: np.ndarray) -> np.ndarray:
        features, *blocks = self.encoder.execute([torch.from_numpy(np.ascontiguousarray(mel, np.float32))])
        self.probes.update(zip(self.probe_names.get(ENCODER, ()), blocks, strict=True))
        return features.numpy()

    def start(self, audio_features: Any) -> None:
        features = torch.from_numpy(np.ascontiguousarray(audio_features, np.float32))
        cross_k, cross_v = self.cross_kv.execute([features])
        cross = (cross_k.clone(), cross_v.clone())  # the runtime may reuse its output buffers
        # the decoder's per-layer inputs: views of the host's tensors, written in place, never copied
        self.layers = [layer for stacked in (self.k_cache, self.v_cache, *cross) for layer in stacked.unbind(0)]
        self.k_cache.zero_()
        self.v_cache.zero_()

    def advance(self, state: None, token: int, position: int) -> np.ndarray:
        inputs = [
            torch.tensor([[token]], dtype=torch.int32),
            torch.tensor([position], dtype=torch.int32),
            self.mask[position][None, None],
            *self.layers,
        ]
        logits, k_new, v_new, *blocks = self.decoder.execute(inputs)
        self.probes.update(zip(self.probe_names.get(DECODER, ()), blocks, strict=True))
        self.k_cache[:, :, position] = k_new[:, :, 0]
        self.v_cache[:, :, position] = v_new[:, :, 0]
        return logits[0].numpy()


IMPLEMENTATION = Implementation(convert=convert, runner=Runner, unavailable=needs("executorch"))
