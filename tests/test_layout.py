"""The package's layout as docs/design.md draws it: which module imports which, drawn from the code.

`python -m tests.test_layout` prints the block that docs/design.md holds between
its ``imports`` markers (``--write`` puts it there; ``make format`` does); the
test fails when the two differ.
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clipjax"
DESIGN = ROOT / "docs" / "design.md"
BEGIN, END = "<!-- imports:begin -->", "<!-- imports:end -->"


def _modules() -> dict[str, pathlib.Path]:
  """'_clipping', '_numerics.sums', ... -> file (the public `__init__` left out)."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).with_suffix("")
    if rel.name != "__init__":  # (a package's __init__ only re-exports its modules)
      out[".".join(rel.parts)] = path
  return out


def _top(name: str) -> str:
  return name.split(".")[0]


def import_graph() -> dict[str, dict[str, int]]:
  """module -> {clipjax module it uses: how many distinct names it takes from it}.

  Counted by package (`_numerics`, `_shaping`) outside them, by module inside.
  A name is an attribute read off an imported module (``_numerics.Split``) or a
  name imported from it (``from clipjax._base import PerLeaf``).
  """
  mods = _modules()
  graph: dict[str, dict[str, set[str]]] = {}
  for mod, path in mods.items():
    tree = ast.parse(path.read_text())
    used: dict[str, set[str]] = {}
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipjax"):
        base = node.module[len("clipjax") :].lstrip(".")
        for a in node.names:
          if not base:  # from clipjax import _axes
            aliases[a.asname or a.name] = a.name
          elif (base + "." + a.name) in mods:  # from clipjax._numerics import sums
            aliases[a.asname or a.name] = base + "." + a.name
          else:
            used.setdefault(base, set()).add(a.name)
    for node in ast.walk(tree):
      if (
          isinstance(node, ast.Attribute)
          and isinstance(node.value, ast.Name)
          and node.value.id in aliases
      ):
        used.setdefault(aliases[node.value.id], set()).add(node.attr)
    same_package = _top(mod) if "." in mod else None
    merged: dict[str, set[str]] = {}
    for target, names in used.items():
      key = target if same_package and _top(target) == same_package else _top(target)
      if key != mod and key != same_package:
        merged.setdefault(key, set()).update(names)
    graph[mod] = merged
  return {m: {t: len(n) for t, n in sorted(d.items())} for m, d in graph.items()}


def block() -> str:
  lines = ["| module | imports (names taken) |", "|---|---|"]
  for mod, deps in import_graph().items():
    cell = ", ".join(f"`{t}` ({n})" for t, n in deps.items()) or "nothing of clipjax"
    lines.append(f"| `{mod}` | {cell} |")
  return "\n".join(lines)


def test_the_import_table_in_design_md_is_the_codes():
  text = DESIGN.read_text()
  found = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
  assert found, f"docs/design.md has no {BEGIN} ... {END} block"
  assert found.group(1) == block(), (
      "docs/design.md's import table is out of date; `python -m tests.test_layout` prints it:\n"
      + block()
  )


def test_numerics_never_reach_into_the_shaping_packages_internals():
  """The seam between what is computed and how it is compiled stays narrow."""
  for mod, path in _modules().items():
    if not mod.startswith("_numerics"):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipjax._shaping"):
        private = [a.name for a in node.names if a.name.startswith("_")]
        assert not private, (mod, private)
  assert "_numerics" not in import_graph()["_shaping.packing"]


def write() -> None:
  """Rewrites the block in docs/design.md (``make format`` runs this)."""
  text = DESIGN.read_text()
  pattern = re.escape(BEGIN) + r"\n.*?\n" + re.escape(END)
  DESIGN.write_text(re.sub(pattern, lambda _: f"{BEGIN}\n{block()}\n{END}", text, flags=re.S))


if __name__ == "__main__":
  import sys

  write() if "--write" in sys.argv else print(block())
