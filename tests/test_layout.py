"""student_sync.py's sections lean only upward.

The module docstring promises that each bannered section uses only names defined in
itself or in the sections above it.  This reads the banners and the module's syntax
tree and fails on any top-level name used (at module level, inside a function or class
body, in a default value or decorator) in a section above the one that defines it.

Annotations count as uses too, string ones included (they are parsed): a signature that
names a type from a later section is a back-reference a reader has to follow downward.
There are no TYPE_CHECKING-only imports to exempt.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "student_sync.py"
BANNER = re.compile(r"^# =+\n# (?P<title>[^\n]+)\n# =+$", re.MULTILINE)


def sections(text: str) -> list[tuple[int, str]]:
    """(first line, title) of every bannered section, top to bottom."""
    return [(text.count("\n", 0, m.start()) + 1, m.group("title")) for m in BANNER.finditer(text)]


def section_at(line: int, starts: list[tuple[int, str]]) -> int:
    """The index of the section holding `line`; -1 above the first banner (imports)."""
    index = -1
    for i, (first, _) in enumerate(starts):
        if first <= line:
            index = i
    return index


def defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def used_names(node: ast.AST) -> set[str]:
    """Every name read inside `node`, string annotations included."""
    names = set()
    for inner in ast.walk(node):
        if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Load):
            names.add(inner.id)
        elif isinstance(inner, ast.Constant) and isinstance(inner.value, str) and _is_annotation(inner, node):
            try:
                names |= used_names(ast.parse(inner.value, mode="eval"))
            except SyntaxError:
                pass
    return names


def _is_annotation(constant: ast.Constant, root: ast.AST) -> bool:
    for inner in ast.walk(root):
        annotations = []
        if isinstance(inner, ast.arg):
            annotations = [inner.annotation]
        elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [inner.returns]
        elif isinstance(inner, ast.AnnAssign):
            annotations = [inner.annotation]
        for annotation in annotations:
            if annotation is not None and any(n is constant for n in ast.walk(annotation)):
                return True
    return False


def back_references(text: str) -> list[str]:
    starts = sections(text)
    tree = ast.parse(text)
    home: dict[str, int] = {}
    for node in tree.body:
        for name in defined_names(node):
            home.setdefault(name, section_at(node.lineno, starts))
    found = []
    for node in tree.body:
        where = section_at(node.lineno, starts)
        for name in sorted(used_names(node)):
            if name in home and home[name] > where:
                found.append(f"line {node.lineno} ({starts[where][1]}) uses {name}, "
                             f"defined below in {starts[home[name]][1]}")
    return found


def test_the_file_has_the_sections_the_docstring_names_in_that_order():
    text = SOURCE.read_text(encoding="utf-8")
    titles = [title for _, title in sections(text)]
    docstring = ast.get_docstring(ast.parse(text)) or ""
    listed = [m.group(1) for m in re.finditer(r"^  ([A-Z][A-Za-z ]+): ", docstring, re.MULTILINE)]
    assert titles == ["Prelude", "Settings", "PowerSchool", "PowerSchool API", "Google", "Plan", "Safety rules", "Apply",
                      "Run files", "Report", "Runs", "Command line"]
    assert listed == titles


def test_no_section_uses_a_name_defined_in_a_section_below_it():
    assert back_references(SOURCE.read_text(encoding="utf-8")) == []


def test_the_check_finds_a_back_reference():
    text = ("# ====\n# Top\n# ====\ndef top() -> int:\n    return bottom()\n\n\n"
            "# ====\n# Bottom\n# ====\ndef bottom() -> int:\n    return 1\n")
    assert back_references(text) == ["line 4 (Top) uses bottom, defined below in Bottom"]
    annotated = text.replace("def top() -> int:\n    return bottom()", 'def top(x: "Later") -> None:\n    pass') \
        + "\n\nclass Later:\n    pass\n"
    assert back_references(annotated) == ["line 4 (Top) uses Later, defined below in Bottom"]
