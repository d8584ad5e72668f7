"""Reading YAML with line numbers: a tree of :class:`Node` (value, dotted key, line).

PyYAML's composer gives every node its position; :class:`Builder` turns the
composed nodes into plain values wrapped in :class:`Node`, refusing what a
configuration never needs (aliases, merge keys, custom tags, non-string
keys, duplicate keys) with a located :class:`~shmd.config.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from shmd.config.errors import ConfigError


@dataclass
class Node:
    """A YAML value with the dotted key path and 1-based line it came from."""

    value: Any  # dict[str, Node] | list[Node] | a constructed scalar
    key: str
    line: int


_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


def describe(value: Any) -> str:
    """How a wrong value reads in an error message: 'boolean true', 'a list'..."""
    if isinstance(value, Node):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    shapes: tuple[tuple[type, str], ...] = ((dict, "a mapping"), (list, "a list"))
    for shape, text in shapes:
        if isinstance(value, shape):
            return text
    scalars: tuple[tuple[type, str], ...] = ((str, "string"), (int, "integer"), (float, "number"))
    for scalar, text in scalars:
        if isinstance(value, scalar):
            return f"{text} {value!r}"
    return f"{type(value).__name__} {value!r}"


class Builder:
    """Builds the Node tree (needs the loader) and raises located errors."""

    def __init__(self, loader: yaml.SafeLoader | None, path: str) -> None:
        self.loader = loader
        self.path = path
        # ids of the YAML nodes already turned into Nodes: an alias hands
        # the composer's node for its anchor out again (see tree()).
        self._seen: set[int] = set()
        # segment.topics once read: the topic keys of the later sections
        # (reader topics, sources' topic) may name them.
        self.topics: Mapping[str, int] = {}

    def construct(self, node: yaml.Node) -> Any:
        assert self.loader is not None  # only tree() calls this, with a loader
        return self.loader.construct_object(node, deep=True)

    def fail(self, message: str, line: int | None, key: str | None) -> NoReturn:
        raise ConfigError(message, path=self.path, line=line, key=key)

    def tree(self, node: yaml.Node, key: str, line: int) -> Node:
        # The composer shares an anchored node with every alias of it, so
        # nine levels of nine aliases compose in microseconds and would
        # expand here into 9**9 nodes (a "billion laughs").  No setting
        # needs an alias: refuse the first one.
        if id(node) in self._seen:
            self.fail(
                "YAML anchors and aliases (& and *) are not supported; write the value out",
                line,
                key or None,
            )
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP_TAG:
                self.fail(f"unsupported YAML tag {node.tag}", line, key or None)
            items: dict[str, Node] = {}
            for knode, vnode in node.value:
                kline = knode.start_mark.line + 1
                if knode.tag == _MERGE_TAG:
                    self.fail(
                        "YAML merge keys (<<) are not supported; shared reader "
                        "settings belong in reader.defaults",
                        kline,
                        key or None,
                    )
                if not isinstance(knode, yaml.ScalarNode):
                    self.fail("a key must be a plain string", kline, key or None)
                raw = self.construct(knode)
                if isinstance(raw, bool) or not isinstance(raw, str | int):
                    self.fail(
                        f"a key must be a plain string (got {describe(raw)})", kline, key or None
                    )
                name = str(raw)
                child = f"{key}.{name}" if key else name
                if name in items:
                    self.fail(
                        f"duplicate key (first given on line {items[name].line})", kline, child
                    )
                items[name] = self.tree(vnode, child, kline)
            return Node(items, key, line)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                self.fail(f"unsupported YAML tag {node.tag}", line, key or None)
            return Node(
                [
                    self.tree(item, f"{key}[{i}]", item.start_mark.line + 1)
                    for i, item in enumerate(node.value)
                ],
                key,
                line,
            )
        return Node(self.construct(node), key, line)


def parse_yaml(text: str, path: str) -> Node:
    loader: yaml.SafeLoader | None = None
    try:
        # The constructor already scans the text for characters YAML forbids.
        loader = yaml.SafeLoader(text)
        root = loader.get_single_node()
        if root is None:
            return Node({}, "", 1)
        tree = Builder(loader, path).tree(root, "", root.start_mark.line + 1)
    except RecursionError:
        # PyYAML's composer and tree() recurse once per nesting level.
        raise ConfigError(
            "Failed to parse YAML since it is nested deeper than Python's "
            "recursion limit (a configuration needs a few levels)",
            path=path,
        ) from None
    except yaml.reader.ReaderError as exc:
        line = text[: max(0, exc.position)].count("\n") + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(
            f"Failed to parse YAML since it contains the character "
            f"U+{char:04X}, which YAML does not allow",
            path=path,
            line=line,
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            f"Failed to parse YAML since {problem}",
            path=path,
            line=None if mark is None else mark.line + 1,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Failed to parse YAML since {exc}", path=path) from None
    finally:
        if loader is not None:
            loader.dispose()
    if tree.value is None:
        return Node({}, "", tree.line)
    if not isinstance(tree.value, dict):
        raise ConfigError(
            f"the file must be a mapping of sections (got {describe(tree)})",
            path=path,
            line=tree.line,
        )
    return tree
