"""A tiny Go text/template evaluator: just what the Modelfile templates use, to check them against Jinja.

Supported: text and ``{{ }}`` actions with ``{{-``/``-}}`` trimming; ``if``/``else if``/``else``/``end``;
``range $i, $x := PIPE``; ``$v := PIPE`` (declare) and ``$v = PIPE`` (assign, as Go 1.11+: it changes the
variable where it was declared, across range iterations); the functions ``eq ne lt le gt ge and or not
len slice``; ``.Field``, ``$.Field``, ``$var``, ``"string"`` literals, integers, ``true``/``false`` and
parentheses. Values are what Ollama passes: ``System``, ``Messages`` (``Role``, ``Content``,
``Thinking``), ``Think``, ``IsThinkSet``. Go's truth: empty strings, lists, 0 and false are false.
"""

from __future__ import annotations

import re

_FUNCS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "not": lambda a: not a, "len": len,
    "slice": lambda s, i: s[i:],
}


def _lex(template: str) -> list[tuple]:
    tokens, pos = [], 0
    for mt in re.finditer(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", template, re.S):
        tokens.append(("text", template[pos:mt.start()]))
        tokens.append(("action", mt.group(2), mt.group(1) == "-", mt.group(3) == "-"))
        pos = mt.end()
    tokens.append(("text", template[pos:]))
    for i, t in enumerate(tokens):  # trim markers eat the neighbouring whitespace
        if t[0] == "action":
            if t[2]:
                tokens[i - 1] = ("text", tokens[i - 1][1].rstrip())
            if t[3]:
                tokens[i + 1] = ("text", tokens[i + 1][1].lstrip())
    return tokens


def _parse(tokens: list[tuple], i: int = 0) -> tuple[list, int]:
    """Nodes up to the next end/else at this level, and the index of that token."""
    nodes = []
    while i < len(tokens):
        t = tokens[i]
        if t[0] == "text":
            nodes.append(("text", t[1]))
            i += 1
            continue
        a = t[1]
        if a == "end" or a.startswith("else"):
            return nodes, i
        if a.startswith("if "):
            branches, cond = [], a[3:]
            while True:
                body, i = _parse(tokens, i + 1)
                branches.append((cond, body))
                a = tokens[i][1]
                if a == "end":
                    break
                cond = a[8:] if a.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif a.startswith("range "):
            body, i = _parse(tokens, i + 1)
            nodes.append(("range", a, body))
        elif re.match(r"\$\w+\s*:?=", a):
            var, op, expr = re.match(r"(\$\w+)\s*(:?=)\s*(.+)", a, re.S).groups()
            nodes.append(("declare" if op == ":=" else "assign", var, expr))
        else:
            nodes.append(("expr", a))
        i += 1
    return nodes, i


def _split_args(s: str) -> list[str]:
    out, depth, cur, quoted = [], 0, "", False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if not quoted:
            depth += (ch == "(") - (ch == ")")
        if ch == " " and depth == 0 and not quoted:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + ([cur] if cur else [])


class _Scope:
    """Variables: a stack of frames; ``assign`` changes the innermost frame that declares the name."""

    def __init__(self):
        self.frames: list[dict] = [{}]

    def get(self, name):
        for f in reversed(self.frames):
            if name in f:
                return f[name]
        raise KeyError(f"undefined variable {name}")

    def assign(self, name, value):
        for f in reversed(self.frames):
            if name in f:
                f[name] = value
                return
        raise KeyError(f"undefined variable {name}")


def _eval(expr: str, dot, root: dict, scope: _Scope):
    args = _split_args(expr.strip())
    if len(args) > 1:
        values = [_eval(x, dot, root, scope) for x in args[1:]]
        if args[0] == "and":
            return next((v for v in values if not v), values[-1])
        if args[0] == "or":
            return next((v for v in values if v), values[-1])
        return _FUNCS[args[0]](*values)
    a = args[0]
    if a.startswith("("):
        return _eval(a[1:-1], dot, root, scope)
    if a.startswith('"'):
        return a[1:-1]
    if a in ("true", "false"):
        return a == "true"
    if a.startswith("$."):
        return root[a[2:]]
    if a.startswith("$"):
        return scope.get(a)
    if a.startswith("."):
        return dot[a[1:]]
    return int(a)


def _run(nodes: list, dot, root: dict, scope: _Scope) -> str:
    out = ""
    for n in nodes:
        if n[0] == "text":
            out += n[1]
        elif n[0] == "expr":
            out += str(_eval(n[1], dot, root, scope))
        elif n[0] == "declare":
            scope.frames[-1][n[1]] = _eval(n[2], dot, root, scope)
        elif n[0] == "assign":
            scope.assign(n[1], _eval(n[2], dot, root, scope))
        elif n[0] == "if":
            for cond, body in n[1]:
                if _eval(cond, dot, root, scope):
                    scope.frames.append({})
                    out += _run(body, dot, root, scope)
                    scope.frames.pop()
                    break
        elif n[0] == "range":
            mt = re.match(r"range (\$\w+), (\$\w+) := (.+)", n[1])
            for idx, item in enumerate(_eval(mt.group(3), dot, root, scope)):
                scope.frames.append({mt.group(1): idx, mt.group(2): item})
                out += _run(n[2], item, root, scope)
                scope.frames.pop()
    return out


def render_go(template: str, *, system: str, messages: list[dict], think: bool | None = None) -> str:
    """The template rendered as Ollama would: messages as given (``thinking`` optional), ``think`` None:
    the request did not set it."""
    nodes, _ = _parse(_lex(template))
    msgs = [{"Role": m["role"], "Content": m["content"], "Thinking": m.get("thinking", "")} for m in messages]
    root = {"System": system, "Messages": msgs, "Think": bool(think), "IsThinkSet": think is not None}
    return _run(nodes, root, root, _Scope())
