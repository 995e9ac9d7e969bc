"""The layout rules of the codebase (issue 16), checked on the source text.

* no module of ``jaxq/`` or ``pallas_kernels/`` over 450 lines (one concept per module);
* no private name imported across modules (``from jaxq.x import _y``, ``x._y`` on an
  imported jaxq module, a private module of another package);
* the Pallas kernels reached only through :mod:`jaxq.kernels`;
* data flows one way: the lower tier imports nothing from the layers above it;
* ``import jaxq`` alone makes every submodule available as ``jaxq.X``;
* one bit-packing layout: the int4 kernels' ``pack_int4`` is ``pack_bits`` along K.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxq
from jaxq import bitpack, kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jaxq", "pallas_kernels")
MAX_LINES = 450

#: The lower tier (numerics -> estimators -> spec/qarray -> params): none of them may
#: import the quantization layer, the Flax adapters, act, optim or anything above.
LOWER_TIER = (
    "jaxq.numerics", "jaxq.bitpack", "jaxq.estimators", "jaxq.allocation", "jaxq.spec",
    "jaxq.sample_bits", "jaxq.nf4", "jaxq.qarray_layout", "jaxq.qarray", "jaxq.quantizer",
    "jaxq.calibration", "jaxq.param_tree", "jaxq.params", "jaxq.mesh")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      out[name] = path
  return out


MODULES = _modules()


def _package(name: str, path: pathlib.Path) -> str:
  return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(node: ast.ImportFrom, name: str, path: pathlib.Path) -> str | None:
  if node.level == 0:
    return node.module
  base = _package(name, path).split(".")
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _ours(module: str | None) -> bool:
  return module is not None and module.split(".")[0] in PACKAGES


def _private(part: str) -> bool:
  return part.startswith("_") and not part.startswith("__")


def _imports(name: str, path: pathlib.Path):
  """``(lineno, imported module, imported names, bound aliases of jaxq modules)``."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for a in node.names:
        if _ours(a.name):
          yield node.lineno, a.name, (), {a.asname or a.name.split(".")[0]: a.name}
    elif isinstance(node, ast.ImportFrom):
      module = _resolve(node, name, path)
      if _ours(module):
        names = tuple(a.name for a in node.names)
        aliases = {a.asname or a.name: f"{module}.{a.name}" for a in node.names
                   if f"{module}.{a.name}" in MODULES}
        yield node.lineno, module, names, aliases


def test_no_module_over_450_lines():
  long = {name: n for name, path in MODULES.items()
          if (n := len(path.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_no_private_names_across_modules():
  bad = []
  for name, path in MODULES.items():
    pkg = _package(name, path)
    aliases: dict[str, str] = {}
    for lineno, module, names, bound in _imports(name, path):
      aliases.update(bound)
      where = f"{path.relative_to(ROOT)}:{lineno}"
      bad += [f"{where}: from {module} import {n}" for n in names if _private(n)]
      private_parts = [p for p in module.split(".") if _private(p)]
      if private_parts and not module.startswith(pkg + "."):
        bad.append(f"{where}: imports the private module {module}")
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and _private(node.attr)
          and isinstance(node.value, ast.Name) and node.value.id in aliases):
        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                   f"{node.value.id}.{node.attr} ({aliases[node.value.id]})")
  assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_kernels_only_through_jaxq_kernels():
  bad = [f"{MODULES[name].relative_to(ROOT)}:{lineno}: {module}"
         for name in MODULES if name.startswith("jaxq") and name != "jaxq.kernels"
         for lineno, module, _, _ in _imports(name, MODULES[name])
         if module.startswith("pallas_kernels")]
  assert not bad, "import pallas_kernels only in jaxq/kernels.py:\n" + "\n".join(bad)


def test_lower_tier_imports_only_lower_tier():
  allowed = set(LOWER_TIER) | {"jaxq.kernels"}
  bad = []
  for name in LOWER_TIER:
    for module_name, path in MODULES.items():
      if module_name != name and not module_name.startswith(name + "."):
        continue
      for lineno, module, names, _ in _imports(module_name, path):
        targets = [f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names]
        for t in targets or [module]:
          if t == "jaxq" or not any(t == a or t.startswith(a + ".") for a in allowed):
            bad.append(f"{path.relative_to(ROOT)}:{lineno}: {t}")
  assert not bad, "the lower tier imports upward:\n" + "\n".join(bad)


def test_import_jaxq_exposes_every_submodule():
  subs = sorted({name.split(".")[1] for name in MODULES
                 if name.startswith("jaxq.") and not _private(name.split(".")[1])})
  code = ("import jaxq\n"
          f"missing = [s for s in {subs!r} if not hasattr(jaxq, s)]\n"
          "assert not missing, missing\n"
          "jaxq.optim, jaxq.fold, jaxq.export, jaxq.analysis, jaxq.checkpoint, jaxq.sharding\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]


def test_int4_kernel_packing_is_pack_bits_along_k():
  w = jax.random.randint(jax.random.key(0), (6, 5), -8, 8, dtype=np.int8)
  np.testing.assert_array_equal(kernels.pack_int4(w), bitpack.pack_bits(w, 4, axis=0))


@pytest.mark.parametrize("bits", [0, 3, 9, 2.0, True])
def test_one_packing_width_check(bits):
  for check in (bitpack.check_pack_bits, jaxq.act.pack.check_bits):
    with pytest.raises(ValueError, match=r"bits must be one of 1, 2, 4, 8"):
      check(bits)
