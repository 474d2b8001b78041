"""The Dockerfile, parsed (no Docker engine needed): base image on pyproject's torch, every
copied path present and not dockerignored, the install line is pyproject's without extras,
a non-root user, `skinlesion --help` as the default command."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pin(project: dict, name: str) -> str:
    for dep in project["dependencies"]:
        if re.split(r"[=<>!~\[; ]", dep)[0] == name:
            assert "==" in dep, f"{name} is not pinned in pyproject.toml: {dep}"
            return dep.split("==")[1].strip()
    raise AssertionError(f"{name} not in pyproject dependencies")


def _ignore_patterns() -> list[str]:
    return [p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()
            if p.strip() and not p.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    path = path.rstrip("/")
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pat) for pat in patterns if not pat.startswith("!")
               for prefix in prefixes)


def test_base_image_is_a_cuda_pytorch_runtime_with_pyprojects_torch(dockerfile, project):
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kind, a in dockerfile if kind == "ARG" and "=" in a}
    froms = [a for kind, a in dockerfile if kind == "FROM"]
    assert froms == ["${BASE_IMAGE}"], "one stage, its base pinned in the BASE_IMAGE ARG"
    repo, _, tag = args["BASE_IMAGE"].partition(":")
    assert repo == "pytorch/pytorch"
    torch_pin = _pin(project, "torch")
    assert re.fullmatch(rf"{re.escape(torch_pin)}-cuda\d+\.\d+-cudnn\d+-runtime", tag), (
        f"base tag {tag!r} does not carry pyproject's torch=={torch_pin} as a CUDA runtime")


def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    patterns = _ignore_patterns()
    copies = [a for kind, a in dockerfile if kind in ("COPY", "ADD")]
    assert copies
    for line in copies:
        words = [w for w in shlex.split(line) if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in shlex.split(line))
        *sources, _dest = words
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the project"
            assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"


def test_every_package_and_file_pyproject_builds_from_is_copied(dockerfile, project):
    copied = {w.rstrip("/") for kind, a in dockerfile if kind == "COPY"
              for w in shlex.split(a)[:-1]}
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in setup["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"package {package} (pyproject packages.find) is not copied"
    assert "pyproject.toml" in copied
    if isinstance(project.get("readme"), str):
        assert project["readme"] in copied, "pyproject's readme must be in the image to build"
    assert "params.yaml" in copied, "steps and `skinlesion pipeline compile` read ./params.yaml"


def test_install_lines_are_pyprojects_without_extras(dockerfile, project):
    runs = [a for kind, a in dockerfile if kind == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    # dependencies: generated from pyproject.toml's own list, not restated by hand
    deps = [r for r in installs if "-r " in r]
    assert len(deps) == 1 and "tomllib" in deps[0] and "['project']['dependencies']" in deps[0]
    # the project: `pip install ... .` with no extras
    project_installs = [r for r in installs if re.search(r"pip install[^&;]*\s\.(\s|$)", r)]
    assert len(project_installs) == 1, installs
    assert not re.search(r"\.\[", project_installs[0]), "no extras in the image"
    text = "\n".join(f"{kind} {a}" for kind, a in dockerfile)  # comments dropped
    for extra, packages in (project.get("optional-dependencies") or {}).items():
        for dep in packages:
            name = re.split(r"[=<>!~\[; ]", dep)[0]
            assert not re.search(rf"\b{re.escape(name)}\b", text), (
                f"{name} ({extra} extra) must not be installed in the image")
    # no package is pinned in the Dockerfile against pyproject's pin
    for dep in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"']*)", " ".join(installs)):
        assert _pin(project, dep[0]) == dep[1]


def test_runs_as_a_non_root_user_with_skinlesion_help_as_default(dockerfile, project):
    kinds = [kind for kind, _ in dockerfile]
    users = [a for kind, a in dockerfile if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("CMD")
    assert kinds[-1] == "CMD"
    cmd = json.loads(dict((k, a) for k, a in dockerfile)["CMD"])
    assert cmd == ["skinlesion", "--help"]
    assert "skinlesion" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_dockerignore_keeps_data_stores_and_venv_out():
    patterns = _ignore_patterns()
    for path in ("data", "data/raw/images/x.jpg", "mlruns", "mlflow.db", ".venv", ".dvc/cache",
                 "outputs", "local_outputs", ".git"):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("components", "model", "pipeline", "pyproject.toml", "params.yaml"):
        assert not _ignored(path, patterns), f"{path} is needed in the image"
