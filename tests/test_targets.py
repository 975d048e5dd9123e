"""The target contract: every registry entry keeps it, a broken declaration is refused naming what
is missing, and every engine obeys the one decoding rule set (real tiny.en artifacts)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from converters.registry import TARGETS, get_target, module_of
from converters.store import ensure
from harness.core.decoding import build_prompt, greedy_decode
from harness.core.errors import HarnessError
from harness.core.target import (
    DEFAULT_THREADS,
    REFERENCE,
    Implementation,
    Runner,
    SelfDecodingRunner,
    Target,
    Tolerance,
)


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_registry_entry_keeps_the_contract(name):
    target = TARGETS[name]
    assert target.name == name and target.description and target.recipe and target.runtime
    # its code is the module named after it, whose IMPLEMENTATION is imported on first use
    assert target.implementation == f"{module_of(name)}:IMPLEMENTATION"
    assert isinstance(target.load(), Implementation)
    assert target.quants and all(t.why.strip() for t in target.tolerances.values())
    assert set(target.calibrated) <= set(target.quants)
    assert target.resource is None or isinstance(target.resource, str)
    availability = target.unavailable()
    assert availability is None or (isinstance(availability, str) and availability)
    # a Runner made as Runner(artifact, threads), and one that batches with a `device` too (a GPU
    # placement hands it one); nothing left abstract
    assert issubclass(target.runner, Runner) and not inspect.isabstract(target.runner)
    params = list(inspect.signature(target.runner).parameters.values())
    expected = ["artifact", "threads", "device"] if target.runner.batching else ["artifact", "threads"]
    assert [p.name for p in params] == expected and params[1].default == DEFAULT_THREADS
    assert not target.runner.batching or params[2].default == "cpu"
    assert target.decodes_itself == issubclass(target.runner, SelfDecodingRunner)
    convert = list(inspect.signature(target.convert).parameters)
    assert convert == ["checkpoint", "model", "quant", "out", "calibration"]
    for quant in target.quants:
        assert target.tolerance(quant) is target.tolerances[quant]
    with pytest.raises(HarnessError, match=rf"target '{name}' offers no quantization 'int9'.*offered: "):
        target.check_quant("int9")


def test_an_unknown_quantization_gets_the_closest_offered_one():
    with pytest.raises(HarnessError, match="did you mean 'int8-weight'"):
        get_target("tflite").check_quant("int8-weights")


REQUIRED = [f.name for f in dataclasses.fields(Target) if f.default is f.default_factory is dataclasses.MISSING]


@pytest.mark.parametrize("field", REQUIRED)
def test_a_declaration_without_a_required_field_fails_naming_it(field):
    declared = {f.name: getattr(TARGETS["onnx"], f.name) for f in dataclasses.fields(Target)}
    del declared[field]
    with pytest.raises(TypeError, match=field):
        Target(**declared)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"runtime": ""}, "runtime is empty"),
        ({"tolerances": {}}, "tolerances is empty"),
        ({"tolerances": {"fp32": Tolerance(80.0, 1e-3, 1.0, "")}}, r"tolerances\['fp32'\] is not a Tolerance"),
        ({"calibrated": frozenset({"int4"})}, "calibrated names quantizations it does not offer"),
        ({"implementation": "converters.onnx_target"}, "is not 'module:attribute'"),
    ],
)
def test_a_declaration_with_a_wrong_field_fails_naming_it(change, message):
    with pytest.raises(TypeError, match=message):
        dataclasses.replace(TARGETS["onnx"], **change)


def test_an_implementation_with_a_wrong_field_fails_naming_it():
    implementation = TARGETS["onnx"].load()
    with pytest.raises(TypeError, match=r"is not a subclass of harness\.core\.target\.Runner"):
        dataclasses.replace(implementation, runner=object)
    with pytest.raises(TypeError, match="convert is not callable"):
        dataclasses.replace(implementation, convert=None)
    # a declaration whose module holds something else under the name: refused when loaded, naming it
    with pytest.raises(TypeError, match=r"converters\.onnx_target:OnnxRunner is not an Implementation"):
        dataclasses.replace(TARGETS["onnx"], implementation="converters.onnx_target:OnnxRunner").load()


@pytest.fixture(scope="module")
def rules_prompt(tiny_dims, embedded_utterances, reference_tokens):
    """The default prompt with the reference's own first word suppressed and a 6-step limit, so
    suppression and the limit decide the output of every engine."""
    prompt = build_prompt(tiny_dims)
    first = reference_tokens(embedded_utterances[0])[0]
    return dataclasses.replace(prompt, suppress=(*prompt.suppress, first), max_new_tokens=6)


@pytest.fixture(scope="module")
def reference_under_rules(reference, rules_prompt, embedded_utterances, tiny_dims):
    return greedy_decode(reference, embedded_utterances[0].audio, tiny_dims, rules_prompt)


@pytest.mark.parametrize("name", [t for t in TARGETS if t != REFERENCE])
def test_every_engine_applies_the_same_decoding_rules(
    name, rules_prompt, reference_under_rules, tiny_checkpoint, models_root, embedded_utterances, tiny_dims
):
    target = get_target(name)
    if reason := target.unavailable():
        pytest.skip(reason)
    artifact, _ = ensure(tiny_checkpoint, "tiny.en", name, "fp32", models_root)
    out = greedy_decode(target.runner(artifact), embedded_utterances[0].audio, tiny_dims, rules_prompt)
    assert not set(out.tokens) & set(rules_prompt.suppress)
    assert out.tokens[0] not in rules_prompt.suppress_at_begin
    assert len(out.tokens) <= out.n_steps <= rules_prompt.step_limit == 6
    # fp32 engines under the same rules: the reference's tokens and step count, exactly
    assert (out.tokens, out.n_steps) == (reference_under_rules.tokens, reference_under_rules.n_steps)
