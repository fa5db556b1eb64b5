"""The package as a user gets it: build, inspect, install alone, run the README's quick start.

Run by `make package` (part of `make test`):

1. builds the sdist, and the wheel from that sdist (``python -m build``), so a
   file missing from the sdist breaks the wheel too;
2. checks that both carry the LICENSE, the wheel carries ``py.typed``, the
   licence is the SPDX expression, and the wheel's requirements without extras
   are jax, optax, chex and numpy only;
3. installs the wheel, with no extras, in a new virtual environment, and there
   imports clipjax, checks that no experiment dependency came along, and runs
   the README's quick start (its Python blocks before "## The two commands").
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = {"jax", "optax", "chex", "numpy"}
# absl-py is not on the list: optax and chex require it.
NOT_INSTALLED = ["flax", "orbax", "ml_collections", "tensorboardX", "matplotlib", "tqdm"]


def run(*cmd: str | pathlib.Path) -> None:
  subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def readme_quick_start() -> str:
  text = (ROOT / "README.md").read_text()
  head = text.split("## The two commands", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", head, flags=re.S)
  if not blocks:
    raise SystemExit("README.md has no ```python block before '## The two commands'")
  return "\n".join(blocks)


def check_wheel(wheel: pathlib.Path) -> None:
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = z.read(meta_name).decode()
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
  assert "clipjax/py.typed" in names, names
  assert "License-Expression: Apache-2.0" in meta, meta[:2000]
  requires = [
      ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")
  ]
  core = {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r}
  assert core == CORE, f"the wheel requires {sorted(core)} without extras, expected {sorted(CORE)}"
  assert not any(n.startswith(("experiments/", "tests/", "benchmarks/")) for n in names), names


def check_sdist(sdist: pathlib.Path) -> None:
  with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
  for needed in (
      "LICENSE",
      "README.md",
      "pyproject.toml",
      "clipjax/__init__.py",
      "clipjax/py.typed",
  ):
    assert needed in names, (needed, sorted(names))


def main() -> None:
  with tempfile.TemporaryDirectory() as tmp_name:
    tmp = pathlib.Path(tmp_name)
    run(sys.executable, "-m", "build", "--outdir", tmp / "dist", ROOT)
    (wheel,) = (tmp / "dist").glob("clipjax-*.whl")
    (sdist,) = (tmp / "dist").glob("clipjax-*.tar.gz")
    check_wheel(wheel)
    check_sdist(sdist)
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel)
    absent = "; ".join(
        f"assert importlib.util.find_spec({m!r}) is None, '{m} came with clipjax'"
        for m in NOT_INSTALLED
    )
    run(python, "-c", f"import importlib.util; {absent}")
    # From the temporary directory: the installed clipjax, not the checkout's.
    subprocess.run(
        [
            str(python),
            "-c",
            readme_quick_start() + "\nprint('quick start ok', clipjax.__version__)",
        ],
        check=True,
        cwd=tmp,
    )
    print(f"package ok: {wheel.name}, {sdist.name}")


if __name__ == "__main__":
  main()
