"""``manifests/`` rendered from the Helm chart, so that the plain-YAML install and the chart never
disagree. ``make manifests`` runs it with ``--write``; a test renders again and compares.

    python -m chart.render --write      # regenerate (the CRD template too, from the API model)
    python -m chart.render              # exit 1 and name the stale files
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "gemma-finetune-operator"
MANIFESTS = REPO / "manifests"
NAMESPACE = "gft-system"
RELEASE = "gft"

HEADER = (
    "# Rendered from charts/gemma-finetune-operator by `make manifests` "
    "(helm template {release} -n {namespace}{flags}). Do not edit.\n"
)

# file -> (chart templates shown, extra values)
FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "crd.yaml": (("templates/crd.yaml",), ()),
    "rbac.yaml": (("templates/serviceaccount.yaml", "templates/rbac.yaml"), ()),
    # The operator on a laptop reads the trainers' metrics through the API server's pod proxy,
    # and may be started with --kueue.
    "rbac-out-of-cluster.yaml": (
        ("templates/serviceaccount.yaml", "templates/rbac.yaml"),
        ("metrics.access=proxy", "kueue.enabled=true"),
    ),
    "operator.yaml": (
        (
            "templates/deployment.yaml",
            "templates/service.yaml",
            "templates/pdb.yaml",
            "templates/networkpolicy.yaml",
        ),
        (),
    ),
    "dashboard.yaml": (("templates/dashboard.yaml",), ()),
    "monitoring/podmonitors.yaml": (
        ("templates/monitoring.yaml",),
        ("metrics.podMonitors.enabled=true",),
    ),
    "monitoring/grafana-dashboard-configmap.yaml": (
        ("templates/grafana-dashboard.yaml",),
        ("grafanaDashboard.enabled=true",),
    ),
}


def helm() -> str:
    from devcluster.build import tool

    path = tool("helm")
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `make tools` first")
    return str(path)


def crd_template() -> str:
    from gft_api.crd import render_chart_template

    return render_chart_template()


def render(name: str) -> str:
    shown, values = FILES[name]
    cmd = [helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for template in shown:
        cmd += ["--show-only", template]
    for value in values:
        cmd += ["--set", value]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    flags = "".join(f" --set {v}" for v in values)
    return HEADER.format(release=RELEASE, namespace=NAMESPACE, flags=flags) + out


def expected() -> dict[Path, str]:
    """Every generated file and what it should hold (the CRD template first: the rest is
    rendered from it)."""
    files = {CHART / "templates" / "crd.yaml": crd_template()}
    files[MANIFESTS / "monitoring" / "grafana-dashboard.json"] = (
        CHART / "files" / "grafana-dashboard.json"
    ).read_text()
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="regenerate the files")
    args = p.parse_args(argv)
    stale = []
    for path, text in expected().items():
        if args.write:
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(path)
    for name in FILES:
        path = MANIFESTS / name
        text = render(name)  # after the CRD template is written
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(path)
    for path in stale:
        print(f"stale: {path.relative_to(REPO)} (run `make manifests`)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
