"""Runs a test worker script in a fresh CPU-only process and returns its JSON result.

Workers that need several simulated devices set ``XLA_FLAGS`` themselves before importing
jax; the parent's ``XLA_FLAGS`` is dropped so that it cannot conflict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_json_worker(path: str) -> dict:
  """``path``'s last ``JSON:`` line of stdout, decoded; asserts the worker succeeded."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, path], capture_output=True, text=True,
                        timeout=600, env=env, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("JSON:")]
  assert proc.returncode == 0 and lines, (
      f"worker {os.path.basename(path)} failed (rc={proc.returncode}):\n"
      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return json.loads(lines[-1][len("JSON:"):])
