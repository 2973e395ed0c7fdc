"""Module hierarchy of op nodes: parsing it from export metadata and telling module calls apart.

Export records `nn_module_stack` (key -> (qualified name, class)); TorchScript records
`inner(Inner).fc(Linear)` per node, which the converter hook stores as the custom metadata
`jaccli_frames`. Both become tuples of `ModuleFrame`s, outermost first, root omitted. Calls of
the same module are told apart by the graph itself (ops of one call are connected), so every
format numbers them alike: `relu#0`, `relu#1`, ...
"""

from __future__ import annotations

import re

from .opgraph import DIFFERENTIATED, ModuleFrame, OpGraph

FRAMES_META = "jaccli_frames"
_TS_FRAME = re.compile(r"([^().]+)\(([^()]*)\)")
_TS_NOT_MODULES = ("SELF", "UNKNOWN_INSTANCE")


def short_type(type_name: str) -> str:
    """`torch.nn.modules.conv.Conv2d` -> `Conv2d`."""
    return type_name.rsplit(".", 1)[-1]


def qualified_name(path: str) -> str:
    """Normalize export paths (`L['self'].features[0]`, `_modules['x']`) to `features.0`."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.strip(".")


def frames_from_module_stack(stack: dict | None) -> list[tuple[str, str, str]]:
    """`nn_module_stack` -> [(qualified name, class, call key)], root dropped."""
    out = []
    for key, value in (stack or {}).items():
        path, type_name = value[0], value[1]
        name = qualified_name(str(path))
        if name and not key.startswith("_empty_nn_module_stack"):
            out.append((name, short_type(str(type_name)), str(key)))
    return out


def frames_from_torchscript(hierarchy: str) -> list[tuple[str, str, str]]:
    """`layer1(Sequential).0(BasicBlock).conv1(Conv2d)` -> frames with call key = name."""
    out, names = [], []
    for attribute, type_name in _TS_FRAME.findall(hierarchy or ""):
        if attribute in _TS_NOT_MODULES:  # a method of the same module, or a free function
            continue
        names.append(attribute)
        qualified = ".".join(names)
        out.append((qualified, short_type(type_name), qualified))
    return out


def raw_frames(meta: dict) -> list[tuple[str, str, str]]:
    """The frames recorded on an fx node: our own custom metadata first, then export's."""
    custom = meta.get("custom") or {}
    if FRAMES_META in custom:
        return [tuple(f) for f in custom[FRAMES_META]]
    return frames_from_module_stack(meta.get("nn_module_stack"))


def assign_calls(graph: OpGraph) -> None:
    """Replace raw call keys by `name` (one call) or `name#0`, `name#1`, ... (several),
    numbering the connected calls of a module.

    Within one raw key, differentiated nodes joined by an edge or reading the same tensor
    belong to one call; calls are numbered in the order they first run.
    """
    nodes = [n for n in graph.nodes.values() if n.kind in DIFFERENTIATED and n.stack]
    order = {name: i for i, name in enumerate(graph.nodes)}
    depth_keys = dict.fromkeys((d, f.call) for n in nodes for d, f in enumerate(n.stack))
    component_of: dict[tuple[int, str, str], int] = {}
    calls = []
    for depth, key in depth_keys:
        members = [n.name for n in nodes if len(n.stack) > depth and n.stack[depth].call == key]
        for index, component in enumerate(_components(graph, members)):
            first = min(order[name] for name in component)
            calls.append((first, depth, key, index, graph.nodes[component[0]].stack[depth]))
            for name in component:
                component_of[(depth, key, name)] = index
    call_names: dict[tuple[int, str, int], str] = {}
    counts: dict[str, int] = {}
    total: dict[str, int] = {}
    for *_, frame in calls:
        total[frame.name] = total.get(frame.name, 0) + 1
    for _, depth, key, index, frame in sorted(calls, key=lambda c: (c[0], c[1])):
        count = counts.get(frame.name, 0)
        counts[frame.name] = count + 1
        # A module called once keeps its name; each call of one called k times is `name#i`.
        call_names[(depth, key, index)] = (frame.name if total[frame.name] == 1
                                           else f"{frame.name}#{count}")
    for n in nodes:
        n.stack = tuple(
            ModuleFrame(f.name, f.type, call_names[(d, f.call, component_of[(d, f.call, n.name)])])
            for d, f in enumerate(n.stack))


def _components(graph: OpGraph, names: list[str]) -> list[list[str]]:
    parent = {name: name for name in names}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    readers: dict[str, str] = {}
    for name in names:
        for ref in graph.nodes[name].refs():
            if ref in parent:
                parent[find(name)] = find(ref)
            elif graph.nodes[ref].kind in DIFFERENTIATED:
                if ref in readers:
                    parent[find(name)] = find(readers[ref])
                else:
                    readers[ref] = name
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())


def repair_regenerated(graph: OpGraph) -> None:
    """Views that functionalization regenerated carry the module of their first later use;
    give them the deepest module shared by their producer and all their consumers."""
    for node in graph.nodes.values():
        if not node.regenerated or node.kind not in DIFFERENTIATED:
            continue
        stacks = [graph.nodes[r].stack for r in node.refs()
                  if graph.nodes[r].kind in DIFFERENTIATED]
        stacks += [graph.nodes[c].stack for c in graph.consumers[node.name]]
        if not stacks:
            continue
        common = []
        for frames in zip(*stacks, strict=False):
            if any(f.call != frames[0].call for f in frames):
                break
            common.append(frames[0])
        node.stack = tuple(common)
