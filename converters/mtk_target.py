"""`mtk`: the MediaTek NPU form of Whisper as LiteRT (.tflite) graphs.

The rules of the MediaTek port (see `torchscript_mtk`), on the static-KV-cache graphs of
`converters.litert.graphs`: fixed shapes; no GATHER, so the decoder takes the token's embedding and its
positional embedding as inputs, looked up on the host in `token_embedding.npy` and
`positional_embedding.npy`; the precomputed additive causal mask comes in as an input row; the
cache is host-owned and the graph returns the new key/value row. The LM head is the tied
embedding matrix, a FULLY_CONNECTED.

Which toolchain produces the .tflite files, in order of preference (the manifest's `path`):
- `mtk_converter` (NeuroPilot; not on PyPI) when importable: each graph is traced to TorchScript
  and converted by `mtk_converter.PyTorchConverter`;
- `litert-torch` otherwise.
When the NeuroPilot SDK for LiteRT (`ai-edge-litert-sdk-mediatek` with its libraries) is present
and `HARNESS_MTK_SOC` names a SoC (e.g. MT6989), the graphs are also compiled ahead of time for
it with `ai_edge_litert.aot` (path `litert-aot:<soc>`, extra files `*.<soc>.tflite`).

Quantizations (ai-edge-quantizer on the float graphs, the rules of `converters.litert.graphs`): fp32;
fp16 weights; int8 = int8 weights per channel with float activations (the NPU's W8 mode).
Full-integer int8 of Whisper is the `tflite` target's `int8-static`, measured there.

Runner: on a board (a node whose environment names its SoC in `HARNESS_MTK_SOC`) the graphs run on
the NPU through LiteRT's CompiledModel API: the SoC's ahead-of-time files when the artifact has
them, else compiled on the device. Elsewhere the CPU-runnable .tflite files run on the LiteRT CPU
interpreter, an emulation of the NPU's arithmetic, or (`HARNESS_MTK_ACCELERATOR=cpu`) on the
CompiledModel path with the CPU accelerator. Every row's `runtime` says which.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from whisper.model import Whisper

from converters.litert import SOC_ENV, soc
from converters.litert import build as litert_build
from converters.litert import graphs as litert_graphs
from converters.litert import runtime as litert_runtime
from harness.core.checkpoint import Checkpoint
from harness.core.target import DEFAULT_THREADS, Artifact, Implementation, Unavailable

ACCELERATOR_ENV = "HARNESS_MTK_ACCELERATOR"  # on a node: what runs the graphs (`execution`)
ACCELERATORS = ("npu", "cpu", "interpreter")
DISPATCH_ENV = "HARNESS_MTK_DISPATCH_DIR"
NO_SDK_LIBRARIES = (
    "ai-edge-litert-sdk-mediatek is installed without its NeuroPilot libraries "
    "(it downloads them when built; offline it installs empty)"
)
_SOC = soc()  # read at import, as the registry reads it for the recipe
RECIPE_OF = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-weight"}  # ai-edge-quantizer recipe per quant
EMBEDDING, POSITIONS = "token_embedding.npy", "positional_embedding.npy"
IO_NAMES = {
    **litert_graphs.IO_NAMES,
    litert_graphs.DECODER: (
        ("token_embedding", "position_embedding", *litert_graphs.CACHE_INPUTS),
        litert_graphs.DECODER_OUTPUTS,
    ),
}


class EmbeddingDecoderGraph(nn.Module):
    """The decoder on host-side embeddings: no GATHER in the graph."""

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.layers = litert_graphs.DecoderLayers(model)

    def forward(
        self, token_embedding, position_embedding, mask, k_cache, v_cache, cross_k, cross_v
    ) -> dict[str, torch.Tensor]:
        return self.layers(token_embedding + position_embedding, mask, k_cache, v_cache, cross_k, cross_v)


def parts(model: Whisper) -> dict[str, litert_graphs.Part]:
    row = torch.zeros(1, 1, model.dims.n_text_state)
    sample = {"token_embedding": row, "position_embedding": row.clone(), **litert_graphs.cache_samples(model)}
    return {**litert_graphs.audio_parts(model), litert_graphs.DECODER: (EmbeddingDecoderGraph(model), sample)}


# --- toolchain paths -----------------------------------------------------------------------------


def mtk_converter_available() -> bool:
    return importlib.util.find_spec("mtk_converter") is not None


class _Positional(nn.Module):
    """A dict-in/dict-out graph as TorchScript wants it: positional tensors in, a tuple out."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.module(**dict(zip(self.names, args, strict=True))).values())


def export_mtk_converter(module: nn.Module, sample: dict[str, torch.Tensor], path: Path) -> None:
    """PyTorch → TorchScript → .tflite with NeuroPilot's converter (float; quantized afterwards
    with the shared recipes). Inputs and outputs keep the traced order (`IO_NAMES`)."""
    import mtk_converter
    from whisper.model import disable_sdpa

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), disable_sdpa():
        script = torch.jit.trace(_Positional(module.eval(), tuple(sample)), tuple(sample.values()), check_trace=False)
        traced = Path(tmp) / "graph.pt"
        torch.jit.save(script, str(traced))
        converter = mtk_converter.PyTorchConverter.from_script_module_file(
            str(traced),
            input_shapes=[list(t.shape) for t in sample.values()],
            input_types=[t.dtype for t in sample.values()],
        )
        converter.quantize = False
        converter.convert_to_tflite(output_file=str(path))


def soc_target(soc: str):  # -> ai_edge_litert.aot.vendors.mediatek.target.Target
    from ai_edge_litert.aot.vendors.mediatek import target as mediatek

    try:
        return mediatek.Target(mediatek.SocModel(soc))
    except ValueError:
        known = ", ".join(s.value for s in mediatek.SocModel if s != mediatek.SocModel.ALL)
        raise Unavailable(f"{SOC_ENV}={soc!r} is not a MediaTek SoC LiteRT knows ({known})") from None


def neuropilot_sdk(soc: str) -> str | None:
    """Why LiteRT cannot compile for `soc`'s NPU here, or None when it can."""
    from ai_edge_litert.aot.vendors.mediatek import target as mediatek

    if importlib.util.find_spec("ai_edge_litert_sdk_mediatek") is None:
        return "ai-edge-litert-sdk-mediatek is not installed"
    import ai_edge_litert_sdk_mediatek

    version = mediatek.map_soc_to_np_version(soc_target(soc).soc_model)
    try:
        # it prints a warning of its own when its libraries are missing: the reason is said once, here
        with contextlib.redirect_stderr(io.StringIO()):
            where = ai_edge_litert_sdk_mediatek.path_to_sdk_libs(version)
    except NotImplementedError as exc:  # a host other than Linux x86, or a NeuroPilot version it lacks
        return f"ai-edge-litert-sdk-mediatek cannot compile for {soc} here ({exc})"
    if where is None:  # the package fetches its libraries when pip builds it; offline it installs empty
        return NO_SDK_LIBRARIES
    libs = Path(where)
    if not libs.is_dir() or not any(libs.iterdir()):
        return f"ai-edge-litert-sdk-mediatek holds no NeuroPilot {version} libraries ({libs})"
    return None


def aot_compile(out: Path, names: list[str], soc: str) -> dict[str, str]:
    """Compile each CPU graph in `out` for `soc` into `<stem>.<soc>.tflite`; returns file → report."""
    from ai_edge_litert.aot import aot_compile as aot

    target = soc_target(soc)
    reports = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            result = aot.aot_compile(str(out / name), output_dir=tmp, target=target, keep_going=True)
            if result.failed_backends or not result.models_with_backend:
                raise Unavailable(f"LiteRT could not compile {name} for {soc}: {result.compilation_report()}")
            (_, model), *_ = result.models_with_backend
            compiled = out / f"{Path(name).stem}.{soc.lower()}.tflite"
            model.save(compiled, export_only=True)
        reports[compiled.name] = result.compilation_report()
    return reports


def convert(
    checkpoint: Checkpoint, model: Whisper, quant: str, out: Path, calibration: Sequence[np.ndarray]
) -> dict[str, Any]:
    if _SOC and (reason := neuropilot_sdk(_SOC)):
        raise Unavailable(f"{SOC_ENV}={_SOC} asks for an ahead-of-time MediaTek build, but {reason}")
    decoder = model.decoder
    embedding = decoder.token_embedding.weight.detach().numpy().astype(np.float32)
    positions = decoder.positional_embedding.detach().numpy().astype(np.float32)
    np.save(out / EMBEDDING, embedding)  # first: the Runner that build() may start reads them
    np.save(out / POSITIONS, positions)
    if mtk_converter_available():
        facts = litert_build.build(model, RECIPE_OF[quant], out, parts(model), Runner, exporter=export_mtk_converter)
        path = "mtk_converter"
    else:
        facts = litert_build.build(model, RECIPE_OF[quant], out, parts(model), Runner)
        path = "litert-torch"
    facts["io"][EMBEDDING] = {"shape": list(embedding.shape), "dtype": "float32"}
    facts["io"][POSITIONS] = {"shape": list(positions.shape), "dtype": "float32"}
    if _SOC:
        facts["aot"] = aot_compile(out, list(IO_NAMES), _SOC)
        path = f"litert-aot:{_SOC}"
    return {**facts, "path": path, "runtime": "litert-cpu (MediaTek emulation)"}


def dispatch_library() -> Path | None:
    """The folder of the MediaTek NPU dispatch library LiteRT loads (`HARNESS_MTK_DISPATCH_DIR`, else
    the one `ai-edge-litert` ships for MediaTek), or None when this machine has none."""
    import ai_edge_litert

    given = os.environ.get(DISPATCH_ENV)
    where = Path(given) if given else Path(ai_edge_litert.__file__).parent / "vendors" / "mediatek" / "dispatch"
    return where if any(where.glob("libLiteRtDispatch_*.so")) else None


def execution(artifact: Artifact) -> tuple[str, Any, list[str]] | None:
    """How this node runs `artifact` on LiteRT's CompiledModel: (runtime label, accelerators, graph
    files), or None for the LiteRT CPU interpreter (the default emulation).

    - A board says what it is: `HARNESS_MTK_SOC` in the environment of its `ray start`. The NPU then
      runs the graphs compiled ahead of time for that SoC when the artifact has them, else the CPU
      graphs that LiteRT compiles for the NPU on the device. No dispatch library: unavailable,
      never a silent CPU fallback.
    - `HARNESS_MTK_ACCELERATOR=cpu` runs the same CompiledModel path with the CPU accelerator: the
      board's code path, checked where there is no board.
    """
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator

    board = soc()
    accelerator = os.environ.get(ACCELERATOR_ENV, "npu" if board else "interpreter").strip().lower()
    if accelerator not in ACCELERATORS:
        raise Unavailable(f"{ACCELERATOR_ENV}={accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    if accelerator == "interpreter":
        return None
    if accelerator == "cpu":
        return "litert-compiled-cpu (MediaTek emulation)", HardwareAccelerator.CPU, list(IO_NAMES)
    if not board:
        raise Unavailable(f"{ACCELERATOR_ENV}=npu needs the node's SoC in {SOC_ENV} (e.g. MT6989)")
    if dispatch_library() is None:
        raise Unavailable(f"no MediaTek NPU dispatch library on this node (set {DISPATCH_ENV} to its folder)")
    compiled = [f"{Path(name).stem}.{board.lower()}.tflite" for name in IO_NAMES]
    if all(name in artifact.manifest["files"] for name in compiled):
        return f"litert-npu:{board} (ahead-of-time)", HardwareAccelerator.NPU | HardwareAccelerator.CPU, compiled
    return (
        f"litert-npu:{board} (compiled on the device)",
        HardwareAccelerator.NPU | HardwareAccelerator.CPU,
        list(IO_NAMES),
    )


class Runner(litert_runtime.Runner):
    """The `tflite` Runner with the MediaTek decoder's host-side embedding lookups, on a board's NPU
    (or the CompiledModel CPU path) where `execution` says so."""

    io_names = IO_NAMES

    def load(self, artifact: Artifact, threads: int) -> tuple[Any, ...]:
        chosen = execution(artifact)
        if chosen is None:
            return super().load(artifact, threads)
        from ai_edge_litert.environment import Environment

        label, accelerators, files = chosen
        dispatch = dispatch_library()
        environment = Environment.create(dispatch_library_path=str(dispatch) if dispatch else "")
        graphs = tuple(
            litert_runtime.CompiledGraph(artifact.file(name), accelerators, threads, environment) for name in files
        )
        partly = [name for name, graph in zip(files, graphs, strict=True) if not graph.fully_accelerated]
        # what executed, per row: where the NPU could not take a whole graph, the CPU ran the rest
        self.runtime = label + (f" + cpu for part of {', '.join(partly)}" if partly and "npu" in label else "")
        return graphs

    def __init__(self, artifact: Artifact, threads: int = DEFAULT_THREADS) -> None:
        super().__init__(artifact, threads)
        self.token_embedding = np.load(artifact.file(EMBEDDING))
        self.positional_embedding = np.load(artifact.file(POSITIONS))

    def embed(self, token: int, position: int) -> dict[str, np.ndarray]:
        return {
            "token_embedding": self.token_embedding[token][None, None],
            "position_embedding": self.positional_embedding[position][None, None],
        }


IMPLEMENTATION = Implementation(convert=convert, runner=Runner, unavailable=litert_runtime.runtime_unavailable)
