"""Print the transformers range pyproject.toml declares: `spec` (e.g. >=5.23,<5.25) or its `floor` (5.23.0);
`contains VERSION` exits 0 when VERSION lies in that range and 1 when it does not (scripts/setup.sh asks this, with
the new environment's python, which has `packaging`).

CI reads the range from here, so raising the cap for a new release is a one-line change in pyproject.toml.
`spec` and `floor` use the standard library only: CI asks them before any environment exists.
"""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: read the one line by pattern instead
    tomllib = None


def transformers_spec() -> str:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    if tomllib:
        requirements = tomllib.loads(text)["project"]["dependencies"]
    else:
        requirements = re.findall(r'^\s*"([^"]+)"', text, re.M)
    for requirement in requirements:
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


def contains(spec: str, version: str) -> bool:
    """Whether `version` lies in `spec` (needs `packaging`: run with the environment's python, as setup.sh does)."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(version, prereleases=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "spec"
    if what not in ("spec", "floor", "contains") or (what == "contains") != (len(sys.argv) == 3):
        raise SystemExit("usage: supported_transformers.py [spec|floor|contains VERSION]")
    spec = transformers_spec()
    if what == "contains":
        sys.exit(0 if contains(spec, sys.argv[2]) else 1)
    print(spec if what == "spec" else floor(spec))
