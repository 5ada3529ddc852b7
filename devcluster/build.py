"""Build the proving ground's binaries from the Go module proxy, once, and cache them.

kube-apiserver, kube-controller-manager, kube-scheduler and kubectl come from one ``go build`` of a
small wrapper module that requires ``k8s.io/kubernetes`` and replaces every staging module with the
matching ``v0.X.Y`` (``go install k8s.io/kubernetes/...@v`` cannot work: its go.mod points the
staging modules at local folders). etcd is built the same way; KWOK with ``go install``.

Binaries land in ``$GFT_CACHE/bin/<versions>/`` only when their build succeeded, so an interrupted
build never leaves a half-written binary behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

K8S_VERSION = "1.35.4"
ETCD_VERSION = "3.6.5"
KWOK_VERSION = "0.7.0"
# k8s.io/kubernetes 1.35 declares `go 1.25.0`.
MIN_GO = (1, 25)

K8S_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
# Peers the tests run against the chart: name -> (Go package, version). Each is cached on its own.
TOOLS = {
    "helm": ("helm.sh/helm/v4/cmd/helm", "4.3.2"),
    "kube-score": ("github.com/zegl/kube-score/cmd/kube-score", "1.20.0"),
    # A real S3-compatible server for output.s3 (its newest commit the module proxy serves).
    "weed": ("github.com/seaweedfs/seaweedfs/weed", "0.0.0-20261109003541-7506e5f91cd6"),
    # The queueing controller GPU clusters use (queueName, preemption, spec.active).
    "kueue": ("sigs.k8s.io/kueue/cmd/kueue", "0.17.0"),
    # Cluster DNS, so that pods find each other by name (multi-node training).
    "coredns": ("github.com/coredns/coredns", "1.15.0"),
    # The dashboard's authenticating proxy (dashboard.auth=proxy), as the chart's sidecar runs it.
    "oauth2-proxy": ("github.com/oauth2-proxy/oauth2-proxy/v7", "7.15.6"),
}
# Tools whose go.mod has replace directives, which `go install pkg@version` refuses: they are
# built inside their own module (downloaded to the module cache), as their main module.
IN_MODULE = {"weed": ("github.com/seaweedfs/seaweedfs", "./weed")}
# Each tool's own version variable, so that `--version` says what was built.
TOOL_VERSION_VARS = {
    "helm": "helm.sh/helm/v4/internal/version.version",
    "kube-score": "main.version",
    "weed": "github.com/seaweedfs/seaweedfs/weed/util/version.COMMIT",
    "kueue": "sigs.k8s.io/kueue/pkg/version.GitVersion",
    "coredns": "github.com/coredns/coredns/coremain.GitCommit",
    "oauth2-proxy": "github.com/oauth2-proxy/oauth2-proxy/v7/pkg/version.VERSION",
}
# Files a tool's install needs from its module besides the binary (Kueue's CRDs and webhook
# configurations), copied next to it so that installing needs no Go: name -> (module, paths).
TOOL_FILES = {
    "kueue": (
        "sigs.k8s.io/kueue",
        ("config/components/crd/bases", "config/components/webhook/manifests.yaml"),
    ),
}
ALL_BINARIES = (*K8S_COMMANDS, "etcd", "kwok")


class BuildError(RuntimeError):
    """A build step failed; the message names the command and where its full log is."""


def cache_root() -> Path:
    return Path(os.environ.get("GFT_CACHE", Path.home() / ".cache" / "gemma-finetune"))


def bin_dir() -> Path:
    return cache_root() / "bin" / f"k8s-{K8S_VERSION}_etcd-{ETCD_VERSION}_kwok-{KWOK_VERSION}"


def missing_binaries() -> list[str]:
    return [b for b in ALL_BINARIES if not (bin_dir() / b).is_file()]


@dataclass(frozen=True)
class GoToolchain:
    go: str
    version: tuple[int, int]


def parse_go_version(text: str) -> tuple[int, int] | None:
    """``go version go1.26.8 linux/amd64`` -> (1, 26)."""
    match = re.search(r"go(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find_go() -> GoToolchain:
    go = shutil.which("go")
    if go is None:
        raise BuildError(
            f"Go was not found on PATH. Install Go >= {MIN_GO[0]}.{MIN_GO[1]} "
            "(https://go.dev/doc/install) and run again; the proving ground builds Kubernetes "
            "from source."
        )
    out = subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout
    version = parse_go_version(out)
    if version is None or version < MIN_GO:
        raise BuildError(
            f"{go} reports {out.strip()!r}; Kubernetes {K8S_VERSION} needs Go >= "
            f"{MIN_GO[0]}.{MIN_GO[1]}. Install a newer Go and run again."
        )
    return GoToolchain(go, version)


def _run(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> None:
    """Run one build step, appending to ``log``; on failure name the command and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n$ (cd {cwd} && {' '.join(cmd)})\n")
        out.flush()
        result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise BuildError(
            f"build step failed (exit {result.returncode}): {' '.join(cmd)}\n"
            f"  in {cwd}\n  full log: {log}\n--- last lines ---\n{tail}"
        )


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CGO_ENABLED="0", GOFLAGS="-mod=mod -buildvcs=false")
    return env


def _staging_replaces(go: str, version: str, work: Path, log: Path) -> list[str]:
    """The ``=> ./staging/...`` modules of k8s.io/kubernetes@version, from its own go.mod."""
    env = _go_env()
    out = work / "download.json"
    with out.open("w") as f:
        result = subprocess.run(
            [go, "mod", "download", "-json", f"k8s.io/kubernetes@v{version}"],
            cwd=work,
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    if result.returncode != 0:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(result.stderr)
        raise BuildError(
            f"go mod download k8s.io/kubernetes@v{version} failed; log: {log}\n"
            f"{result.stderr[-2000:]}"
        )
    gomod = Path(json.loads(out.read_text())["GoMod"]).read_text()
    return re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, re.MULTILINE)


def _wrapper_module(
    work: Path, name: str, require: str, replaces: dict[str, str], imports: list[str]
) -> None:
    lines = [f"module gft.local/{name}", "", "go 1.25.0", "", f"require {require}", ""]
    if replaces:
        lines.append("replace (")
        lines += [f"\t{mod} => {target}" for mod, target in sorted(replaces.items())]
        lines.append(")")
    (work / "go.mod").write_text("\n".join(lines) + "\n")
    body = "\n".join(f'\t_ "{imp}"' for imp in imports)
    (work / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{body}\n)\n")


def build_kubernetes(go: str, out_dir: Path, log: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="gft-k8s-"))
    try:
        minor = K8S_VERSION.split(".")[1]
        staging = _staging_replaces(go, K8S_VERSION, work, log)
        replaces = {mod: f"{mod} v0.{K8S_VERSION.split('.', 1)[1]}" for mod in staging}
        _wrapper_module(
            work,
            "k8s",
            f"k8s.io/kubernetes v{K8S_VERSION}",
            replaces,
            [f"k8s.io/kubernetes/cmd/{c}" for c in K8S_COMMANDS],
        )
        env = _go_env()
        _run([go, "mod", "tidy"], work, log, env)
        ldflags = " ".join(
            [
                "-s -w",
                f"-X k8s.io/component-base/version.gitVersion=v{K8S_VERSION}",
                "-X k8s.io/component-base/version.gitMajor=1",
                f"-X k8s.io/component-base/version.gitMinor={minor}",
                "-X k8s.io/component-base/version.gitTreeState=clean",
            ]
        )
        _run(
            [
                go,
                "build",
                "-trimpath",
                "-ldflags",
                ldflags,
                "-o",
                str(out_dir) + "/",
                *[f"k8s.io/kubernetes/cmd/{c}" for c in K8S_COMMANDS],
            ],
            work,
            log,
            env,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_etcd(go: str, out_dir: Path, log: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="gft-etcd-"))
    try:
        _wrapper_module(
            work,
            "etcd",
            f"go.etcd.io/etcd/server/v3 v{ETCD_VERSION}",
            {},
            ["go.etcd.io/etcd/server/v3"],
        )
        env = _go_env()
        _run([go, "mod", "tidy"], work, log, env)
        _run(
            [
                go,
                "build",
                "-trimpath",
                "-ldflags",
                "-s -w",
                "-o",
                str(out_dir / "etcd"),
                "go.etcd.io/etcd/server/v3",
            ],
            work,
            log,
            env,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_kwok(go: str, out_dir: Path, log: Path) -> None:
    env = _go_env()
    env["GOBIN"] = str(out_dir)
    env["GOFLAGS"] = "-buildvcs=false"
    _run(
        [
            go,
            "install",
            "-trimpath",
            "-ldflags",
            "-s -w",
            f"sigs.k8s.io/kwok/cmd/kwok@v{KWOK_VERSION}",
        ],
        out_dir,
        log,
        env,
    )


def tool(name: str) -> Path:
    """Where the cached build of one of ``TOOLS`` lives."""
    _, version = TOOLS[name]
    return cache_root() / "bin" / "tools" / f"{name}-{version}" / name


def build_tools(say=print) -> None:
    """``go install`` whichever of ``TOOLS`` is not cached yet."""
    for name, (package, version) in TOOLS.items():
        target = tool(name)
        if target.is_file():
            continue
        toolchain = find_go()
        log = cache_root() / "logs" / f"build-{name}.log"
        log.unlink(missing_ok=True)
        say(f"building {name} v{version} with {toolchain.go} (first time only; log: {log})")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="gft-tool-", dir=target.parent.parent))
        try:
            env = _go_env()
            env.update(GOBIN=str(staging), GOFLAGS="-buildvcs=false")
            ldflags = f"-s -w -X {TOOL_VERSION_VARS[name]}=v{version}"
            if name in IN_MODULE:
                module, main = IN_MODULE[name]
                source = _module_dir(toolchain.go, f"{module}@v{version}", staging, log, env)
                env["GOFLAGS"] = "-mod=readonly -buildvcs=false"
                _run(
                    [
                        toolchain.go,
                        "build",
                        "-trimpath",
                        "-ldflags",
                        ldflags,
                        "-o",
                        str(staging / name),
                        main,
                    ],
                    source,
                    log,
                    env,
                )
            else:
                _run(
                    [
                        toolchain.go,
                        "install",
                        "-trimpath",
                        "-ldflags",
                        ldflags,
                        f"{package}@v{version}",
                    ],
                    staging,
                    log,
                    env,
                )
            if name in TOOL_FILES:
                module, paths = TOOL_FILES[name]
                source = _module_dir(toolchain.go, f"{module}@v{version}", staging, log, env)
                for rel in paths:
                    if (source / rel).is_dir():
                        shutil.copytree(source / rel, target.parent / Path(rel).name,
                                        dirs_exist_ok=True)  # fmt: skip
                    else:
                        shutil.copyfile(source / rel, target.parent / Path(rel).name)
            os.replace(staging / name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _module_dir(go: str, module_at: str, cwd: Path, log: Path, env: dict[str, str]) -> Path:
    """Download a module to the module cache; returns its folder there."""
    out = subprocess.run([go, "mod", "download", "-json", module_at], cwd=cwd, env=env,
                         capture_output=True, text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out.stdout + out.stderr)
        raise BuildError(f"go mod download {module_at} failed; log: {log}\n{out.stderr[-2000:]}")
    return Path(json.loads(out.stdout)["Dir"])


# Small Go programs of our own (each a folder with go.mod, go.sum and main.go), built from the
# module proxy and cached per version of their source: name -> (folder, binary).
OWN_PROGRAMS = {
    # The runner's port-forward helper (the kubelet's own streaming code).
    "portforward": (Path(__file__).resolve().parent / "portforward", "gft-portforward"),
    # A real OpenID Connect provider (github.com/oauth2-proxy/mockoidc) for the dashboard's
    # proxy-mode login tests.
    "mockoidc": (Path(__file__).resolve().parent / "mockoidc", "gft-mockoidc"),
}


def own_binary(name: str) -> Path:
    """Where the cached build of one of ``OWN_PROGRAMS`` lives (a folder per source digest)."""
    source, binary = OWN_PROGRAMS[name]
    digest = hashlib.sha256()
    for file in ("go.mod", "go.sum", "main.go"):
        digest.update((source / file).read_bytes())
    return cache_root() / "bin" / "tools" / f"{binary}-{digest.hexdigest()[:16]}" / binary


def port_forward_binary() -> Path:
    return own_binary("portforward")


def build_own(name: str, say=print) -> Path:
    """Build one of ``OWN_PROGRAMS`` unless cached."""
    target = own_binary(name)
    if target.is_file():
        return target
    source, binary = OWN_PROGRAMS[name]
    toolchain = find_go()
    log = cache_root() / "logs" / f"build-{binary}.log"
    log.unlink(missing_ok=True)
    say(f"building {binary} with {toolchain.go} (log: {log})")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{binary}-", dir=target.parent.parent))
    try:
        for file in ("go.mod", "go.sum", "main.go"):
            shutil.copy(source / file, work / file)
        _run(
            [
                toolchain.go,
                "build",
                "-trimpath",
                "-ldflags",
                "-s -w",
                "-o",
                str(work / binary),
                ".",
            ],
            work,
            log,
            _go_env(),
        )
        os.replace(work / binary, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def build(say=print) -> Path:
    """Build whatever is missing; return the folder holding all the binaries."""
    build_tools(say)
    for name in OWN_PROGRAMS:
        build_own(name, say)
    target = bin_dir()
    missing = missing_binaries()
    if not missing:
        return target
    toolchain = find_go()
    target.mkdir(parents=True, exist_ok=True)
    logs = cache_root() / "logs"
    steps = [
        ("Kubernetes v" + K8S_VERSION, K8S_COMMANDS, build_kubernetes),
        ("etcd v" + ETCD_VERSION, ("etcd",), build_etcd),
        ("KWOK v" + KWOK_VERSION, ("kwok",), build_kwok),
    ]
    for label, produced, step in steps:
        if not any(b in missing for b in produced):
            continue
        log = logs / f"build-{produced[0]}.log"
        log.unlink(missing_ok=True)
        say(f"building {label} with {toolchain.go} (first time only; log: {log})")
        staging = Path(tempfile.mkdtemp(prefix="gft-bin-", dir=target.parent))
        try:
            step(toolchain.go, staging, log)
            for name in produced:
                if not (staging / name).is_file():
                    raise BuildError(f"{label}: the build produced no {name}; log: {log}")
                os.replace(staging / name, target / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
