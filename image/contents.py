"""What the image holds, checked from inside it (run as root, by image/test.sh).

    python3 /image/contents.py [--host-ca /hostca/ca-certificates.crt] [--skip DIR ...]

Fails (exit 1) on any of: a `.git` folder; the project's tests, data or experiment stores in
/app or the installed package; pip/AWS/git/docker credential or config files; an environment
variable named like a secret; a private key or an AWS access key id in the project's files
or in the config folders; the build host's own CA certificates (mounted for the build's pip,
never copied); pytest or moto installed. Prints one line per check and the image's size.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path

PROJECT_DIRS = ("model", "components", "pipeline")
SECRET_FILES = [
    "/etc/pip.conf", "/etc/xdg/pip", "/root/.pip", "/root/.config/pip",
    "/root/.aws", "/home/skinlesion/.aws", "/root/.netrc", "/home/skinlesion/.netrc",
    "/root/.git-credentials", "/home/skinlesion/.git-credentials", "/root/.gitconfig",
    "/root/.docker", "/home/skinlesion/.docker", "/root/.config/dvc", "/root/.ssh",
    "/home/skinlesion/.ssh", "/app/.dvc", "/app/.env",
]
NOT_IN_APP = ["tests", "data", "outputs", "local_outputs", "mlruns", "mlartifacts", "mlflow.db",
              ".git", ".dvc", ".venv", "benchmarks", "image", "docs", ".ci", "shared", "pipeline.yaml"]
SECRET_ENV = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|PASSWD", re.I)
SECRET_TEXT = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"
                         rb"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)

failures: list[str] = []


def check(name: str, problems: list[str]) -> None:
    print(f"  {'ok  ' if not problems else 'FAIL'} {name}" + (f": {problems[:10]}" if problems else ""))
    if problems:
        failures.append(name)


def walk(root: str, skip: set[str]):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        yield dirpath, dirnames, filenames


def scan_text(roots: list[str], skip: set[str]) -> list[str]:
    hits = []
    for root in roots:
        for dirpath, _, filenames in walk(root, skip):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        if SECRET_TEXT.search(f.read(5_000_000)):
                            hits.append(path)
                except OSError:
                    pass
    return hits


def site_packages() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host-ca", help="the build host's CA bundle, mounted read-only")
    ap.add_argument("--skip", action="append", default=[], help="mounted folders to leave out")
    args = ap.parse_args(argv)
    skip = {"/proc", "/sys", "/dev", "/run", *args.skip}

    # .git anywhere; size of the whole tree on the way
    gits, size, files = [], 0, 0
    for dirpath, dirnames, filenames in walk("/", skip):
        if ".git" in dirnames or ".git" in filenames:
            gits.append(os.path.join(dirpath, ".git"))
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            size += st.st_size
            files += 1
    check("no .git anywhere", gits)

    app = Path("/app")
    check("/app holds only the project (no tests, data, stores, dev folders)",
          [str(app / n) for n in NOT_IN_APP if (app / n).exists()])
    sp = site_packages()
    record = next(sp.glob("skinlesion-*.dist-info/RECORD")).read_text().splitlines()
    tops = {line.split("/", 1)[0] for line in record if line and not line.startswith("..")}
    unexpected = sorted(t.split(",")[0] for t in tops
                        if t not in PROJECT_DIRS and not t.startswith("skinlesion-"))
    check("installed project = model/, components/, pipeline/ (no tests)", unexpected)
    check("no top-level `tests` package in site-packages", [str(sp / "tests")] if (sp / "tests").exists() else [])
    data_files = [str(p) for root in [app, *(sp / d for d in PROJECT_DIRS), Path("/home/skinlesion")]
                  for p in root.rglob("*")
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".csv", ".db", ".pt", ".safetensors", ".dvc")]
    check("no data files (images, csv, db, checkpoints, .dvc) in /app, the package or $HOME", data_files)
    check("no test tools installed (pytest, moto)",
          [m for m in ("pytest", "moto") if importlib.util.find_spec(m) is not None])

    check("no credential or pip/AWS/git/docker config files",
          [p for p in SECRET_FILES if os.path.lexists(p)])
    check("no secret-named environment variables",
          [k for k in os.environ if SECRET_ENV.search(k)])
    text_roots = ["/app", "/home", "/root", "/etc", "/tmp", "/var/tmp", "/opt/venv/bin",
                  *(str(sp / d) for d in PROJECT_DIRS)]
    check("no private key or AWS key id in the project, $HOME, /etc, /tmp",
          scan_text([r for r in text_roots if os.path.isdir(r)], skip))

    if args.host_ca:
        host = set(PEM.findall(Path(args.host_ca).read_bytes()))
        own = set(PEM.findall(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()))
        extra = host - own
        if not extra:
            print("  --   host CA bundle has no CA beyond the image's: nothing to compare")
        else:
            found = []
            for root in ("/etc", "/usr/local/share", "/usr/share/ca-certificates", "/opt/venv"):
                for dirpath, _, filenames in walk(root, skip):
                    for name in filenames:
                        if name.endswith((".crt", ".pem")):
                            path = os.path.join(dirpath, name)
                            try:
                                blob = Path(path).read_bytes()
                            except OSError:
                                continue
                            if any(cert in blob for cert in extra):
                                found.append(path)
            check(f"the build host's own CA ({len(extra)} cert(s)) is not in the image", found)

    venv = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk("/opt/venv") for f in fs)
    print(f"  size: {size / 1e9:.2f} GB in {files} files, /opt/venv {venv / 1e9:.2f} GB")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
