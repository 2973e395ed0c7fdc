"""Find what in a torch.export program (its serialized JSON) would run code when loaded or run.

torch 2.13's deserializer (`torch/_export/serde/serialize.py`) turns strings of the JSON into
code in three places, none of them pickle:

- node targets (and operator arguments) are looked up by dotted name under `torch`,
  `_operator` and `math`, and any callable found becomes a graph node: `torch.os.system`
  resolves. Allowed here: PyTorch operators (`torch.ops...`) other than the ones that read or
  write files, and the symbolic arithmetic torch itself emits.
- shape expressions (`expr_str`) go through `sympy.sympify`, which evaluates Python:
  ``__import__('os').system(...)`` runs. Allowed here: sympy's printed arithmetic only.
- input/output structures (`in_spec`/`out_spec`, pytree treespecs) may name a `defaultdict`
  factory module or an `__enum__`, both imported with `importlib.import_module`.

Names that become attributes (parameter, buffer, constant, submodule names) must not hold
quotes or control characters: FX pastes them into generated Python source.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import operator
import re
import tokenize
from typing import Any

import torch

# Ops that touch the file system: `from_file(shared=True)` maps a file writably.
FILE_OPERATORS = {"aten::from_file", "aten::save", "debugprims::load_tensor"}
_SYMBOLIC_CALLABLES = {
    operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt,
    operator.neg, operator.pos, operator.mul, operator.add, operator.sub, operator.floordiv,
    operator.mod, operator.pow, operator.truediv, operator.and_, operator.or_,
    operator.lshift, operator.rshift, operator.getitem, operator.not_, operator.abs,
    math.trunc, math.ceil, math.floor,
    torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max,
    torch.sym_min, torch.sym_sqrt,
}  # torch's _SYM_OPS and the verifier's allowed builtins
_ROOTS = {"torch": torch, "_operator": operator, "math": math}
# sympy names the printed form (`srepr`/`str`) of a shape expression may use.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "Piecewise", "ExprCondPair", "Tuple", "true", "false", "BooleanTrue", "BooleanFalse",
    "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "NaN", "ComplexInfinity", "One",
    "Zero", "NegativeOne", "Half", "int_oo", "IntInfinity", "NegativeIntInfinity",
    "True", "False", "None",
    # torch.utils._sympy.functions, as the deserializer lists them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
}
_SYMPY_KEYWORDS = {
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
    "infinite", "zero", "nonzero", "even", "odd", "rational", "commutative", "extended_real",
    "precision", "evaluate",
}
_SYMPY_FUNCTION_PATTERN = re.compile(r"^(OpaqueUnaryFn|BitwiseFn)_[a-z0-9_]+$")
_SYMBOL_NAME = re.compile(r"^[a-z]{1,6}[0-9]+$")
_STRING_ARGUMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*|[-+0-9.eE]+)$")
_OPERATORS = {"(", ")", ",", "+", "-", "*", "/", "//", "%", "**", "=", "==", "!=", "<", "<=",
              ">", ">=", "&", "|", "~", "^"}
_UNSAFE_NAME_CHARACTERS = re.compile(r"[\"'\\\x00-\x1f\x7f]")
_NAME_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name",
              "fqn"}
_MAX_FINDINGS = 5


def program_findings(program: Any) -> list[str]:
    """What in a serialized program (parsed JSON) would run code; empty when nothing."""
    findings: list[str] = []
    stack: list[tuple[Any, str | None]] = [(program, None)]
    while stack and len(findings) < _MAX_FINDINGS:
        obj, key = stack.pop()
        if isinstance(obj, list):
            stack.extend((item, key) for item in obj if isinstance(item, (dict, list)))
            continue
        if not isinstance(obj, dict):
            continue
        for name, value in obj.items():
            if isinstance(value, (dict, list)):
                stack.append((value, name))
            elif isinstance(value, str):
                problem = _string_problem(name, value, obj, key)
                if problem:
                    findings.append(problem)
        if key == "as_custom_obj" or (key == "custom_obj_values" and obj):
            findings.append("its graph uses TorchBind custom objects, which are unpickled")
    return findings


def name_problem(name: str) -> str | None:
    """Why an attribute name (e.g. a state_dict key) is unsafe to paste into code, or None."""
    if _UNSAFE_NAME_CHARACTERS.search(name):
        return f"the name {name[:60]!r} holds quotes or control characters (FX pastes names " \
               "into generated Python code)"
    return None


def operator_problem(target: str) -> str | None:
    """Why a node target would run something other than a PyTorch operator, or None."""
    parts = target.split(".")
    if parts[0] not in _ROOTS or not all(p.isidentifier() for p in parts):
        return f"a graph node calls {target[:80]!r}, which is not a PyTorch operator"
    obj: Any = _ROOTS[parts[0]]
    for part in parts[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return f"a graph node calls {target[:80]!r}, which this torch does not define"
    if isinstance(obj, torch._ops.OpOverload):
        if obj._schema.name in FILE_OPERATORS:
            return f"a graph node calls {target}, which reads or writes files"
        return None
    if isinstance(obj, torch._ops.HigherOrderOperator):
        return None
    try:
        if obj in _SYMBOLIC_CALLABLES:
            return None
    except TypeError:  # unhashable
        pass
    return f"a graph node calls {target[:80]!r}, which is not a PyTorch operator"


def expression_problem(text: str) -> str | None:
    """Why a shape expression is more than sympy arithmetic (sympify would `eval` it)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return f"the shape expression {text[:60]!r} is not arithmetic"
    meaningful = [t for t in tokens if t.type not in (tokenize.NEWLINE, tokenize.NL,
                                                      tokenize.ENDMARKER)]
    for i, token in enumerate(meaningful):
        following = meaningful[i + 1].string if i + 1 < len(meaningful) else ""
        if token.type == tokenize.NUMBER:
            continue
        if token.type == tokenize.OP and token.string in _OPERATORS:
            continue
        if token.type == tokenize.STRING:
            try:
                value = _string_literal(token.string)
            except ValueError:
                value = None
            if value is not None and _STRING_ARGUMENT.match(value):
                continue
        if token.type == tokenize.NAME and _allowed_sympy_name(token.string, following):
            continue
        return (f"the shape expression {text[:60]!r} is not plain arithmetic (sympify "
                "evaluates it as Python)")
    return None


def treespec_problem(text: str) -> str | None:
    """Why a serialized pytree treespec would import a module while being read, or None."""
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        return "an input/output structure (treespec) is not valid JSON"
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("type") == "collections.defaultdict":
                return "an input/output structure holds a defaultdict, whose factory module " \
                       "would be imported"
            if "__enum__" in node:
                return "an input/output structure names an enum, whose module would be imported"
            context = node.get("context")
            if isinstance(context, str):
                with contextlib.suppress(ValueError, RecursionError):
                    stack.append(json.loads(context))
            stack.extend(v for k, v in node.items() if k != "context")
    return None


def _string_problem(key: str, value: str, owner: dict, parent: str | None) -> str | None:
    if key == "target" and "inputs" in owner:
        return operator_problem(value)
    if key == "as_operator":
        return operator_problem(value)
    if key == "expr_str":
        return expression_problem(value)
    if key in ("in_spec", "out_spec"):
        return treespec_problem(value)
    if key in _NAME_KEYS or (key == "target" and "inputs" not in owner) or (
            key == "name" and parent == "as_graph"):
        return name_problem(value)
    return None


def _allowed_sympy_name(name: str, following: str) -> bool:
    if name in _SYMPY_NAMES or _SYMPY_FUNCTION_PATTERN.match(name):
        return True
    if name in _SYMPY_KEYWORDS:
        return following == "="
    return bool(_SYMBOL_NAME.match(name)) and following != "("


def _string_literal(token: str) -> str:
    """The value of a plain one-line string literal token (no prefixes), else ValueError."""
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"" and \
            "\\" not in token and token.count(token[0]) == 2:
        return token[1:-1]
    raise ValueError(token)
