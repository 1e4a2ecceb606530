"""Print the transformers range pyproject.toml declares: `spec` (e.g. >=5.23,<5.25) or its `floor` (5.23.0).

CI reads the range from here, so raising the cap for a new release is a one-line change in pyproject.toml.
Standard library only: it runs before any environment exists.
"""

import re
import sys
from pathlib import Path

import tomllib


def transformers_spec() -> str:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"transformers\s*(.*)", requirement.strip())
        if match:
            return match.group(1).replace(" ", "")
    raise SystemExit("pyproject.toml: no transformers requirement")


def floor(spec: str) -> str:
    match = re.search(r">=\s*([0-9][0-9.]*)", spec)
    if not match:
        raise SystemExit(f"pyproject.toml: transformers{spec} has no >= floor")
    version = match.group(1)
    return version if version.count(".") >= 2 else version + ".0"


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "spec"
    if what not in ("spec", "floor"):
        raise SystemExit("usage: supported_transformers.py [spec|floor]")
    spec = transformers_spec()
    print(spec if what == "spec" else floor(spec))
