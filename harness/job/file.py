"""Reading a job file safely: bounded size, UTF-8, YAML without anchors or repeated keys; what it says is checked
by `harness.job.spec`. Every refusal is one line naming the file (and the line, where YAML has one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from harness.core.errors import HarnessError, clip, quote

# Job files are a few hundred bytes. PyYAML's pure-Python loader needs seconds and hundreds of MB
# for a few MB (2 MB: 16 s, 437 MB; 1 MiB: 13 to 40 s here), so a larger file is refused unread.
MAX_JOB_BYTES = 64 * 1024
_MERGE = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses, but that a job file may not hold."""


class _JobLoader(yaml.SafeLoader):
    """`yaml.safe_load` without anchors and aliases (`&name`, `*name`), and without a key twice in
    one mapping. A job file never needs to share a node, and refusing them outright ends "billion
    laughs" files (a few lines whose nested aliases expand to millions of items once anything walks
    them), where a cap on their number would still let a handful of nested aliases multiply. A
    repeated key is a mistake YAML hides: the later value silently replaces the earlier one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            problem = "anchors and aliases (&name, *name) are not allowed in job files; write the value out"
            raise _Refused(problem=problem, problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # `<<:` merges a mapping in, whose keys the ones beside it override
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = first_line.get(key)
            except TypeError:  # an unhashable key: the base class refuses it with its own message
                continue
            if first is not None:
                problem = f"duplicate key {quote(key)} (first on line {first}); keep one of them"
                raise _Refused(problem=problem, problem_mark=key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_job_yaml(path: Path) -> Any:
    """The YAML document in `path`, or one HarnessError line saying why it cannot be read."""
    if not path.is_file():
        raise HarnessError(f"{path}: no such job file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_JOB_BYTES + 1)
    except OSError as exc:
        raise HarnessError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_JOB_BYTES:
        raise HarnessError(f"{path}: larger than {MAX_JOB_BYTES // 1024} KiB, the limit for a job file; not parsed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        raw = yaml.load(text, Loader=_JobLoader)  # a SafeLoader, stricter still
    except _Refused as exc:
        raise HarnessError(f"{path}: line {exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise HarnessError(f"{path}:{where} is not valid YAML ({clip(str(getattr(exc, 'problem', exc)))})") from None
    except RecursionError:
        raise HarnessError(f"{path}: nested too deeply for a job file") from None
    except ValueError as exc:  # a value YAML reads but Python cannot hold: month 13, an int of 5000 digits
        raise HarnessError(f"{path}: is not valid YAML ({clip(str(exc))})") from None
    return raw
