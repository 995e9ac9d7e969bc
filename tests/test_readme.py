"""The README's quick start runs as written."""

import os
import re


def test_quick_start_runs():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
  with open(path) as f:
    text = f.read()
  section = text.split("## Quick start", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["serving_vars"]["params"]
