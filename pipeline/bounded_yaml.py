"""YAML as people write it, read with bounds: the text of a config file or of a `--set` value, as plain data.

A config is a few kB that people write, so what goes far beyond that is a mistake (or an attack) and is refused,
as one line saying where, before anything walks it: a file larger than MAX_CONFIG_BYTES (read no further, so
/dev/zero ends too), nesting deeper than MAX_YAML_DEPTH, more than MAX_YAML_VALUES keys and values (an alias
counting all its anchor holds, so an alias bomb stops at its first alias too many; one Budget spans a file and
every override), an integer too large to print, a date that is none. What people write by mistake is refused
rather than read one way: a duplicate key (naming the line of both), a merge key (<<). What the values mean is
pipeline.config's business; merging them onto the defaults is pipeline.config_loading's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.messages import shorten
from stages.common.errors import BadInputError
from stages.training.train_settings import CLIP, clip

# A config is a few kB that people write: these bounds are far above any real one, and far below what hurts.
MAX_CONFIG_BYTES = 1 << 20  # read at most this much of a file: a huge file (or /dev/zero) is a mistake
MAX_YAML_VALUES = 10_000  # keys and values of one YAML document, an alias counting all its anchor holds
MAX_YAML_DEPTH = 32  # nesting of one YAML document (the deepest setting is 4 levels down); bounds recursion


def read_bounded(path: Path) -> str:
    """The file's text; refused when larger than MAX_CONFIG_BYTES, reading no more than that."""
    with path.open("rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise BadInputError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    return data.decode()


@dataclass
class Budget:
    """Keys and values the YAML of one config may still expand to, an alias counting all its anchor holds."""

    values: int = MAX_YAML_VALUES


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that no config needs: too big, too deep, a duplicate or merge key, an impossible value."""


class _Loader(yaml.SafeLoader):
    """A SafeLoader that bounds what a document expands to, and refuses duplicate keys and merge keys.

    PyYAML shares an aliased node, so loading is cheap, but walking the result (validating, printing a bad value)
    visits every alias again: 447 bytes of nested aliases make billions of values. Counting each alias as all its
    anchor holds while composing stops such a document at its first alias too many. YAML 1.1 reads `1e-3` as a
    string; like YAML 1.2 (and every user's expectation), this loader reads it as a float.
    """

    def __init__(self, stream: str, budget: Budget) -> None:
        super().__init__(stream)
        self._budget = budget
        self._depth = 0
        self._values = 0  # keys and values composed, an alias counting all its anchor holds
        self._sizes: dict[int, int] = {}  # id of an anchored node (kept alive in self.anchors) -> values it holds

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._count_alias(event)
            return super().compose_node(parent, index)
        if self._depth >= MAX_YAML_DEPTH:  # refused before the composer's recursion overflows the stack
            raise _Refused(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        before = self._values
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1, event.start_mark)
        if event.anchor is not None:
            self._sizes[id(node)] = self._values - before
        return node

    def _count_alias(self, event: yaml.AliasEvent) -> None:
        node = self.anchors.get(event.anchor)
        if node is None:
            return  # an undefined alias: the composer says so
        size = self._sizes.get(id(node))
        if size is None:  # its anchor is still being composed: a cycle, infinite once walked
            raise _Refused(None, None, f"alias *{event.anchor[:CLIP]} is inside its own anchor", event.start_mark)
        self._count(size, event.start_mark)

    def _count(self, values: int, mark: yaml.Mark) -> None:
        self._values += values
        self._budget.values -= values
        if self._budget.values < 0:
            raise _Refused(
                None, None, f"more than {MAX_YAML_VALUES:,} keys and values in all (each alias counts all its "
                "anchor holds): not a config", mark,
            )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # a merge repeats its mappings' keys: refused rather than bounded, as writing the keys out is clearer
                raise _Refused(None, None, "merge keys (<<) are not supported: write the keys out", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first_seen:
                    first = _place(first_seen[key], key_node.start_mark)
                    raise _Refused(None, None, f"duplicate key {clip(key)} (first at {first})", key_node.start_mark)
                first_seen[key] = key_node.start_mark
            except TypeError:
                pass  # an unhashable key: the base class refuses it
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            value = super().construct_yaml_int(node)
        except ValueError:  # more than 4300 decimal digits
            value = None
        if value is None or value.bit_length() > 64:  # no setting is that large; its repr could not even be printed
            raise _Refused(None, None, f"integer {node.value[:20]}… is too large", node.start_mark)
        return value

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as error:  # 2024-13-45 looks like a date to YAML
            raise _Refused(
                None, None, f"{clip(node.value)} is not a date ({error}; quote it for a text)", node.start_mark
            ) from None


def _place(first: yaml.Mark, then: yaml.Mark) -> str:
    """Where `first` is, as seen from `then`: its line, or its column when both share a line (a --set value)."""
    return f"line {first.line + 1}" if first.line != then.line else f"column {first.column + 1} of the same line"


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|" r"^[-+]?(?:\d[\d_]*)\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)
# the base class registered its own functions: register the overrides
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)


def parse_yaml(text: str, where: str, budget: Budget) -> Any:
    """The one YAML document in `text` as plain data, counted against `budget`; BadInputError names `where`."""
    if len(text) > MAX_CONFIG_BYTES:  # a run's config.yaml from a URI, a value given to --set
        raise BadInputError(f"{where}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config")
    loader = _Loader(text, budget)  # what yaml.load does, with the budget
    try:
        return loader.get_single_data()
    except _Refused as error:
        raise BadInputError(f"{where}: line {error.problem_mark.line + 1}: {error.problem}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise BadInputError(f"{where}: invalid YAML{position}: {shorten(problem)}") from None
    finally:
        loader.dispose()
