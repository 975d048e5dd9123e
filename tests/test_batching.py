"""Batched short-form decoding (`short_form_decode_batch`) against one utterance at a time: the same
tokens, decoder steps and languages on every runner that batches, on real audio; the reference's
batches against `whisper.decode`'s own; the one exception (onnx int8) measured."""

from __future__ import annotations

import numpy as np
import pytest

from converters.registry import get_target
from converters.store import ensure
from harness.core.decoding import (
    AUTO,
    Decoded,
    DecodingOptions,
    Dims,
    TooLong,
    build_prompt,
    short_form_decode,
    short_form_decode_batch,
    too_long,
)
from harness.core.target import Runner, SelfDecodingRunner, Unavailable, device_kind, torch_device
from harness.core.window import SAMPLE_RATE
from tests.conftest import ROOT, decode_with_whisper

N = 8  # tiny.en utterances per runner: one batch of 8, and batches of 3 on the first UNEVEN
UNEVEN = 5  # 3 + 2: the last batch smaller than batch_size
MULTILINGUAL = ("de", "fr", "zh", "ru")  # a clip of each from data/multilingual, decoded with language: auto


def facts(d: Decoded) -> tuple:
    """What batching must not change: tokens, decoder steps, the language decoded in and detected."""
    return d.tokens, d.n_steps, d.language, d.detection and d.detection.language


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as the workers run torch


@pytest.fixture(scope="module")
def utterances(embedded_utterances, tiny_dims):
    return [u for u in embedded_utterances if too_long(u.audio, tiny_dims) is None][:N]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, models_root, tiny_dims, utterances):
    """tiny.en transcripts of the first `n` utterances by a (target, quant) runner: one at a time
    (`batch_size` None) or through `short_form_decode_batch`; each runner loaded, and each set of
    transcripts made, once, on first use."""
    runners: dict[tuple[str, str], Runner] = {}
    made: dict[tuple, list[Decoded]] = {}

    def decoded(target: str, quant: str, batch_size: int | None = None, n: int = N) -> list[Decoded]:
        if (target, quant) not in runners:
            artifact = ensure(tiny_checkpoint, "tiny.en", target, quant, models_root)[0]
            assert artifact.manifest["status"] == "ok", artifact.manifest.get("parity_failures")
            runners[target, quant] = get_target(target).runner(artifact)
        runner, audios = runners[target, quant], [u.audio for u in utterances[:n]]
        if (key := (target, quant, batch_size, n)) not in made:
            made[key] = (
                [short_form_decode(runner, a, tiny_dims, DecodingOptions()) for a in audios]
                if batch_size is None
                else short_form_decode_batch(runner, audios, tiny_dims, [DecodingOptions(batch_size=batch_size)] * n)
            )
        return made[key]

    return decoded


# the integration tier: each runner at batch 8, the reference also at an uneven batch and on several
# languages; the slow tier: the others' uneven batches, CTranslate2's int8 and its languages
slow = pytest.mark.slow


@pytest.mark.parametrize(
    ("target", "quant", "batch_size", "n"),
    [
        *[(target, "fp32", N, N) for target in ("reference", "transformers", "ctranslate2", "onnx")],
        ("reference", "fp32", 3, UNEVEN),
        *[pytest.param(target, "fp32", 3, UNEVEN, marks=slow) for target in ("transformers", "ctranslate2", "onnx")],
        *[pytest.param("ctranslate2", "int8", b, n, marks=slow) for b, n in ((N, N), (3, UNEVEN))],
    ],
)
def test_batched_equals_one_at_a_time(tiny, utterances, target, quant, batch_size, n):
    alone, batched = tiny(target, quant), tiny(target, quant, batch_size, n)
    differ = [u.utt_id for u, a, b in zip(utterances, alone, batched, strict=False) if facts(a) != facts(b)]
    assert differ == [], f"{target} {quant} at batch {batch_size}"
    # every row shared its decoder calls with the rest of its batch: 8; 3, then 2
    assert [d.batch for d in batched] == ([N] * N if batch_size == N else [3, 3, 3, 2, 2])
    assert all(d.encode_ms > 0 and d.decode_ms > 0 for d in batched) and {d.language for d in batched} == {"en"}


def test_reference_batch_equals_whisper_decode_batch(tiny, utterances, tiny_checkpoint, tiny_dims):
    """The independent path: `whisper.decode` given the same mels at once."""
    import torch

    theirs = decode_with_whisper(tiny_checkpoint, utterances, tiny_dims)
    torch.set_num_threads(1)  # decode_with_whisper leaves torch on 2 threads
    assert [list(d.tokens) for d in tiny("reference", "fp32", N)] == [theirs[u.utt_id].tokens for u in utterances]


def test_a_worker_batches_across_the_timed_rows_and_keeps_the_shard_order(
    ray_local, tiny, tiny_artifacts, embedded_utterances, utterances
):
    """The latency sample is spread over a shard: the rows between its rows still fill whole
    batches (3, 3 here, not 1, 2, 3), the timed rows are decoded alone, and the rows come out in
    the shard's order, each with the tokens it has alone."""
    import ray
    import torch

    from harness.job.spec import DatasetSpec, ModelCell
    from harness.run.artifact_server import start_server
    from harness.run.dataset import Rows, Shard
    from harness.run.node_cache import publish
    from harness.run.worker import ModelWorker, WorkerSetup

    assert [u.utt_id for u in embedded_utterances[:N]] == [u.utt_id for u in utterances]  # all short
    artifact, threads = tiny_artifacts["reference"], torch.get_num_threads()
    dims, options = Dims.of(artifact.manifest["dims"]), DecodingOptions(batch_size=3)
    server = start_server()
    try:
        cell = ModelCell("tiny.en", artifact.target, artifact.quant)
        rows = Rows.of([DatasetSpec(ROOT / "data" / "librispeech-eval")], [N])
        setup = WorkerSetup(cell, publish(server, artifact), dims, build_prompt(dims, options), options, rows,
                            timed=frozenset({1, 4}))  # fmt: skip
        out = list(ModelWorker(setup).run_shard(Shard(0, 0, N)))
    finally:
        ray.kill(server)
        torch.set_num_threads(threads)
    assert [r["utt_id"] for r in out] == [u.utt_id for u in utterances]
    assert [r["timed"] for r in out] == [i in (1, 4) for i in range(N)]
    assert [r["batch"] for r in out] == [3, 1, 3, 3, 1, 3, 3, 3]
    assert [r["hyp_tokens"] for r in out] == [list(d.tokens) for d in tiny("reference", "fp32")]


def test_onnx_int8_does_not_batch(tiny_checkpoint, models_root, utterances, tiny_dims, tmp_path):
    """The exception, measured: onnx int8 quantizes every activation with one scale over the whole
    tensor (`DynamicQuantizeLinear`), so in a batch each row is quantized by the range of all rows:
    features and logits move by far more than rounding, and 6 of 32 transcripts change at batch 8
    (converters/onnx_target.py). Its runner therefore does not batch (`short_form_decode_batch`
    decodes its items one at a time). A batch of copies of one utterance has that one's range and
    gives its batch-1 numbers bit for bit: the shared scale is the whole difference."""
    from converters import onnx_target
    from harness.core.audio import log_mel
    from harness.core.target import Artifact

    fp32 = ensure(tiny_checkpoint, "tiny.en", "onnx", "fp32", models_root)[0]
    onnx_target.quantize_int8(fp32.path, tmp_path)  # the int8 step of `convert`, without a second export
    runner = onnx_target.OnnxRunner(Artifact("tiny.en", "onnx", "int8", tmp_path, {}))
    assert onnx_target.OnnxRunner.batching and not runner.batching

    mels = [log_mel(u.audio, tiny_dims.n_mels) for u in utterances[:2]]
    first, second = (runner.encode(m) for m in mels)
    # the encoder graph given both rows in one call, and the decoder's first step given both
    assert np.abs(runner.encode(np.concatenate(mels))[:1] - first).max() > 0.1
    prompt = list(build_prompt(tiny_dims, DecodingOptions()).tokens)
    alone, _ = runner.step(prompt, first, None)
    mixed, _ = runner.step_batch([prompt, prompt], np.concatenate([first, second]), None)
    copies, _ = runner.step_batch([prompt, prompt], np.concatenate([first, first]), None)
    assert np.abs(mixed[0] - alone).max() > 0.1
    assert np.array_equal(copies[0], alone) and np.array_equal(copies[1], alone)


def test_a_runner_that_does_not_batch_decodes_one_at_a_time(tiny_artifacts, utterances, tiny_dims):
    runner = get_target("torchscript-mtk").runner(tiny_artifacts["torchscript-mtk"])
    assert not runner.batching
    audios, options = [u.audio for u in sorted(utterances, key=lambda u: u.audio.size)[:2]], DecodingOptions()
    batched = short_form_decode_batch(runner, audios, tiny_dims, [options] * 2)
    assert [facts(d) for d in batched] == [facts(short_form_decode(runner, a, tiny_dims, options)) for a in audios]
    assert {d.batch for d in batched} == {1} and batched[0].costs()["batch"] == 1


def test_an_item_past_the_window_is_too_long(reference, utterances, tiny_dims):
    """Short form only: an item past the window raises its `TooLong`; the caller sends short items."""
    long = np.zeros(31 * SAMPLE_RATE, dtype=np.float32)
    with pytest.raises(TooLong, match=r"31\.0 s, longer than the 30 s window"):
        short_form_decode_batch(reference, [utterances[0].audio, long], tiny_dims, [DecodingOptions()] * 2)


@pytest.mark.parametrize("target", ["reference", "transformers", "ctranslate2", "onnx"])
def test_cuda_is_unavailable_on_a_cpu_machine(tiny_checkpoint, models_root, target):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    artifact = ensure(tiny_checkpoint, "tiny.en", target, "fp32", models_root)[0]
    reason = {
        "reference": "torch .* sees no CUDA device",
        "transformers": "torch .* sees no CUDA device",
        "ctranslate2": r"ctranslate2 .* sees 0 CUDA device\(s\)",
        "onnx": "onnxruntime .* has no CUDAExecutionProvider",
    }[target]
    with pytest.raises(Unavailable, match=f"device 'cuda': {reason}"):
        get_target(target).runner(artifact, 1, device="cuda")


@pytest.fixture(scope="module")
def clips():
    """The first clip of each language of MULTILINGUAL in data/multilingual."""
    from harness.job.spec import DatasetSpec
    from harness.run.dataset import count_rows, plan_shards, read_shard

    spec = DatasetSpec(path=ROOT / "data" / "multilingual", language_column="language")
    (shard,) = plan_shards(count_rows(spec), 1000)
    every = read_shard(spec, shard)
    return [next(u for u in every if u.language == language) for language in MULTILINGUAL]


@pytest.mark.parametrize("target", ["reference", pytest.param("ctranslate2", marks=slow)])
def test_multilingual_auto_batched_equals_one_at_a_time(models_root, clips, target):
    """base, `language: auto`: each row detected (in one batched step) and decoded in its own language."""
    from harness.core.weights import resolve_checkpoint

    artifact = ensure(resolve_checkpoint("base"), "base", target, "fp32", models_root)[0]
    runner, dims = get_target(target).runner(artifact), Dims.of(artifact.manifest["dims"])
    options = DecodingOptions(language=AUTO)
    alone = [short_form_decode(runner, c.audio, dims, options) for c in clips]
    batched = short_form_decode_batch(runner, [c.audio for c in clips], dims, [options] * len(clips))
    assert [facts(d) for d in batched] == [facts(d) for d in alone]
    assert [d.language for d in batched] == list(MULTILINGUAL)  # each clip's own language, detected
    assert {d.batch for d in batched} == {len(clips)}
    probabilities = ([d.detection.probability for d in ds] for ds in (batched, alone))
    np.testing.assert_allclose(*probabilities, rtol=1e-5)


@pytest.mark.unit
def test_devices_are_named_and_a_missing_one_is_unavailable():
    import torch

    assert [device_kind(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda", "cuda"]
    for bad in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(Unavailable, match=f"device '{bad}': expected 'cpu', 'cuda' or 'cuda:N'"):
            device_kind(bad)
    assert torch_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(Unavailable, match=r"device 'cuda:1': torch .* sees no CUDA device \(a CPU-only build"):
            torch_device("cuda:1")


@pytest.mark.unit
def test_a_class_that_claims_batching_implements_it():
    """Checked when the class is made, naming what is missing (the engines' methods for an engine)."""
    with pytest.raises(TypeError, match=r"Half sets batching but does not implement step_batch$"):
        type("Half", (Runner,), {"batching": True, "encode_batch": lambda self, mel: mel})
    with pytest.raises(TypeError, match=r"Engine sets batching but does not implement encode_batch, generate_batch$"):
        type("Engine", (SelfDecodingRunner,), {"batching": True, "detect_language_batch": lambda self, f: []})
