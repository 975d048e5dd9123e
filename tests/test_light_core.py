"""Nothing loads a runtime it does not run.

Each check runs in a fresh interpreter (this one has long imported torch): the commands that run
no model import neither torch, whisper nor any target module; and one target whose module fails
to import costs that target only — every other command and target works, and a run reports its
rows `unavailable` with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "whisper", "ray", "datasets")
# what listing runs (`runs`, `history`) must not load either: the data libraries, which only
# reading a run's rows needs
DATA = ("pandas",)
# what each light command imports when it does its work, besides running it (report and compare
# need a history or a finished run to get that far)
LIGHT_MODULES = (
    "harness.cli",
    "harness.job.spec",
    "harness.nightly.gate",
    "harness.nightly.history",
    "harness.report.page",
    "harness.results.record",
    "harness.results.run_dir",
    "converters.registry",
)


def fresh(code: str, *args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_HISTORY"} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


LOADED = """
import json, sys
from harness.cli import main
code = main(sys.argv[1:])
targets = sorted(m for m in sys.modules if m.startswith("converters.") and m.endswith("_target"))
heavy = [m for m in HEAVY + DATA if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy, "targets": targets}))
""".replace("HEAVY + DATA", repr(HEAVY + DATA))


@pytest.mark.unit
@pytest.mark.parametrize(
    "args",
    [
        ("validate", "jobs/quant_sweep_base.yaml", "jobs/librispeech_tiny_en.yaml"),
        ("runs", "--out", "{tmp}"),
        ("history", "--history", "{tmp}/history.sqlite"),
    ],
    ids=lambda a: a[0],
)
def test_a_command_that_runs_no_model_imports_no_runtime(args, tmp_path):
    from harness.nightly.history import History

    with History(str(tmp_path / "history.sqlite")):  # an empty history to list
        pass
    done = fresh(LOADED, *(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    # validate checks the dataset with `datasets` (and reads its metadata with pandas); nothing else may come along
    # validate reads a local audiofolder's metadata with the standard library: no data library either
    assert loaded["code"] == 0 and loaded["heavy"] == [] and loaded["targets"] == [], loaded


@pytest.mark.unit
def test_the_light_commands_modules_import_no_runtime():
    done = fresh(
        f"""
        import importlib, sys
        for name in {LIGHT_MODULES!r}:
            importlib.import_module(name)
        targets = [m for m in sys.modules if m.startswith("converters.") and m.endswith("_target")]
        print([m for m in {HEAVY!r} if m in sys.modules], targets)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"


# A target module whose SDK fails at import, as a broken native wheel does: the finder below makes
# `converters.onnx_target` raise for real, in the fresh interpreter only.
BREAK_ONNX = """
import sys
class Broken:
    def find_spec(self, name, path=None, target=None):
        if name == "converters.onnx_target":
            raise ImportError("libonnxruntime.so: cannot open shared object file (on purpose)")
sys.meta_path.insert(0, Broken())
"""


@pytest.mark.unit
def test_a_target_whose_module_fails_to_import_is_unavailable_and_the_others_work():
    done = fresh(
        BREAK_ONNX
        + """
from converters.registry import TARGETS
from harness.cli import main
reasons = {name: target.unavailable() for name, target in TARGETS.items()}
assert "libonnxruntime.so" in reasons["onnx"] and "converters.onnx_target failed to import" in reasons["onnx"]
for name, target in TARGETS.items():
    if name != "onnx":
        target.load()  # every other target's code still imports
assert main(["validate", "jobs/quant_sweep_base.yaml"]) == 0  # a job naming onnx still validates
print("ok")
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_a_run_with_a_broken_target_reports_its_rows_unavailable(tmp_path):
    """A real run (tiny.en, two utterances): the reference decodes, the broken target's rows read
    `unavailable` with the import's error as the reason."""
    job = tmp_path / "broken.yaml"
    job.write_text(
        f"name: broken_onnx\ndataset: {{path: {ROOT / 'data' / 'librispeech-eval'}}}\n"
        "models: {sizes: [tiny.en], targets: {onnx: [fp32]}}\ncluster: {shard_size: 2}\n"
    )
    out = tmp_path / "results"
    done = fresh(
        BREAK_ONNX
        + """
import sys
from harness.cli import main
sys.exit(main(sys.argv[1:]))
""",
        "run",
        str(job),
        "--limit",
        "2",
        "--out",
        str(out),
        "--models",
        str(ROOT / "models"),
        "--history",
        str(tmp_path / "history.sqlite"),
        timeout=600,
    )
    # exit 4: the run finished, some models were unavailable (harness.exit_codes)
    assert done.returncode == 4, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = (out / "broken_onnx").iterdir()
    rows = pd.read_parquet(run / "utterances.parquet")
    onnx = rows[rows.target == "onnx"]
    assert len(onnx) == 2 and set(onnx.status) == {"unavailable"}
    assert onnx.error.str.contains("converters.onnx_target failed to import").all()
    reference = rows[rows.target == "reference"]
    assert len(reference) == 2 and set(reference.status) == {"ok"}
