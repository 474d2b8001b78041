"""The Dockerfile, parsed (no container engine needed): a base that exists for `docker build`
and is swappable for buildah, the project without extras in a venv, every copied path present
and let through .dockerignore, a non-root user, `skinlesion --help` as the build's last check,
and one image tag shared by the Makefile and the compiled pipeline. `make image-test` builds
and runs the image for real (image/test.sh)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
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


def _runs(dockerfile) -> list[str]:
    return [a for kind, a in dockerfile if kind == "RUN"]


def _ignore_rules() -> list[tuple[re.Pattern, bool]]:
    """.dockerignore as Docker reads it: (pattern, excludes) in order; `*` and `?` stop at
    `/`, `**` crosses it, a leading `!` lets a path back in, the last matching rule wins."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex + r"\Z"), exclude))
    return rules


def _ignored(path: str) -> bool:
    """Whether `path` is left out of the build context (it or a parent matches, last rule wins)."""
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for regex, exclude in _ignore_rules():
        if any(regex.match(p) for p in prefixes):
            ignored = exclude
    return ignored


def _stages(dockerfile) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, FROM first."""
    stages = []
    for kind, a in dockerfile:
        if kind == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((kind, a))
    return stages


def test_base_image_is_an_arg_defaulting_to_python311_slim_bookworm(dockerfile):
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for kind, a in dockerfile if kind == "ARG" and "=" in a}
    froms = [a.split()[0] for kind, a in dockerfile if kind == "FROM"]
    assert froms and set(froms) == {"${BASE_IMAGE}"}, "every stage on the BASE_IMAGE ARG, no other image"
    assert dockerfile[0][0] == "ARG", "the ARG comes before FROM so that FROM can use it"
    # an official tag on Docker Hub that has Debian bookworm's layout and Python 3.11, the
    # version pyproject and the development venv use; `make image` swaps in a local bookworm
    assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm"


def test_python_runs_from_a_venv_made_with_python3_on_path(dockerfile):
    runs = " ".join(_runs(dockerfile))
    # `python3 -m venv` finds /usr/local/bin/python3 (python image) and /usr/bin/python3 (Debian)
    assert re.search(r"\bpython3 -m venv /opt/venv\b", runs)
    assert not re.search(r"/usr(/local)?/bin/python", runs), "no path to one base's python"
    env = " ".join(a for kind, a in dockerfile if kind == "ENV")
    assert re.search(r"\bPATH=/opt/venv/bin:\$PATH\b", env), "the venv's bin first on PATH"
    assert not re.search(r"--break-system-packages|--user\b", runs), "nothing pip-installed outside the venv"


def test_run_time_tools_are_installed(dockerfile):
    installs = [r for r in _runs(dockerfile) if "apt-get install" in r]
    assert installs, "git comes from apt"
    assert re.search(r"\bgit\b", installs[0]), "DVC needs git to read the dataset's git repository"
    assert "--no-install-recommends" in installs[0] and "rm -rf /var/lib/apt/lists" in installs[0]


def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    stage_names = {a.split()[2].lower() for kind, a in dockerfile
                   if kind == "FROM" and len(a.split()) == 3 and a.split()[1].upper() == "AS"}
    copies = [a for kind, a in dockerfile if kind in ("COPY", "ADD")]
    assert copies
    for line in copies:
        words = shlex.split(line)
        froms = [w.split("=", 1)[1] for w in words if w.startswith("--from=")]
        assert all(f.lower() in stage_names for f in froms), f"COPY from an outside image: {line}"
        if froms:
            continue
        *sources, _dest = [w for w in words if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the project"
            assert not _ignored(src), f"COPY {src}: excluded by .dockerignore"


def test_every_package_and_file_pyproject_builds_from_is_copied(dockerfile, project):
    final = _stages(dockerfile)[-1]
    copied = {w.rstrip("/") for kind, a in final if kind == "COPY"
              for w in shlex.split(a)[:-1] if not w.startswith("--")}
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in setup["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"package {package} (pyproject packages.find) is not copied"
        assert (ROOT / package / "__init__.py").is_file()
    assert "pyproject.toml" in copied
    if isinstance(project.get("readme"), str):
        assert project["readme"] in copied, "pyproject's readme must be in the image to build"
    assert "params.yaml" in copied, "steps and `skinlesion pipeline compile` read ./params.yaml"


def test_install_lines_are_pyprojects_without_extras(dockerfile, project):
    installs = [r for r in _runs(dockerfile) if "pip install" in r]
    # dependencies: generated from pyproject.toml's own list, not restated by hand
    generated = [r for r in _runs(dockerfile) if "tomllib" in r and "requirements.txt" in r]
    assert len(generated) == 1 and "['project']['dependencies']" in generated[0]
    assert "optional-dependencies" not in generated[0]
    deps = [r for r in installs if "-r " in r]
    assert len(deps) == 1 and "requirements.txt" in deps[0]
    # the project: `pip install ... .` with no extras, and no second copy of the dependencies
    project_installs = [r for r in installs if re.search(r"pip install[^&;]*\s\.(\s|$)", r)]
    assert len(project_installs) == 1, installs
    assert "--no-deps" in project_installs[0]
    assert not re.search(r"\.\[", project_installs[0]), "no extras in the image"
    assert not re.search(r"pip install[^&;]*\s-e\s", " ".join(installs)), "not an editable install"
    text = "\n".join(f"{kind} {a}" for kind, a in dockerfile)  # comments dropped
    for extra, packages in (project.get("optional-dependencies") or {}).items():
        for dep in packages:
            name = re.split(r"[=<>!~\[; ]", dep)[0]
            assert not re.search(rf"\b{re.escape(name)}\b", text), (
                f"{name} ({extra} extra) must not be installed in the image")
    assert not re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"']*)", " ".join(installs)), (
        "pins live in pyproject.toml only")


def test_runs_as_a_non_root_user_and_checks_skinlesion_help_last(dockerfile):
    kinds = [kind for kind, _ in dockerfile]
    users = [(i, a) for i, (kind, a) in enumerate(dockerfile) if kind == "USER"]
    assert users and users[-1][1].split(":")[0] not in ("root", "0")
    assert any(re.search(r"useradd\b.*\b" + re.escape(users[-1][1].split(":")[0]) + r"\b", r)
               for r in _runs(dockerfile)), "the user is created in the image"
    last_run = max(i for i, kind in enumerate(kinds) if kind == "RUN")
    assert last_run > users[-1][0], "the last check runs as the non-root user"
    assert dockerfile[last_run][1] == "skinlesion --help", "the build ends by running the CLI"
    assert kinds[-1] == "CMD"
    assert json.loads(dockerfile[-1][1]) == ["skinlesion", "--help"]
    assert "skinlesion" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_no_secret_or_host_file_is_copied_or_baked_in(dockerfile):
    text = "\n".join(f"{kind} {a}" for kind, a in dockerfile)
    # the build host's CA bundle and pip config are mounted for a build (image/build.sh),
    # never copied; no credentials in ENV/ARG
    assert not re.search(r"^(COPY|ADD) .*(ssl|certs|pip\.conf|\.aws|\.dvc|\.env)", text, re.M)
    for kind, a in dockerfile:
        if kind in ("ENV", "ARG"):
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", a, re.I), a


def test_dockerignore_lets_only_the_project_through():
    for path in ("data", "data/raw/images/x.jpg", "mlruns", "mlflow.db", ".venv", ".dvc/cache",
                 ".dvc/config.local", ".env", "outputs", "local_outputs", ".git", ".git/config",
                 "tests", "tests/test_x.py", "image", "docs", "benchmarks", "shared", ".ci",
                 "components/__pycache__/x.pyc", "skinlesion.egg-info"):
        assert _ignored(path), f"{path} would be sent to the engine"
    for path in ("components", "components/x.py", "model/y.py", "pipeline", "pyproject.toml",
                 "params.yaml", "README.md"):
        assert not _ignored(path), f"{path} is needed in the image"


def test_makefile_image_tag_is_the_compiled_pipelines_default_on_pyprojects_version(project):
    source = (ROOT / "pipeline" / "kfp_components.py").read_text()
    (default,) = re.findall(r'^DEFAULT_IMAGE = "([^"]+)"$', source, re.M)
    assert default.rsplit(":", 1)[1] == project["version"], (
        f"DEFAULT_IMAGE {default} is not tagged with pyproject's version {project['version']}")
    made = subprocess.run(["make", "-s", "--no-print-directory", "image-name"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert made == default, "`make image` builds the tag that the compiled pipeline names"
