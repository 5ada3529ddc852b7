"""The proving ground's decisions and its messages for a bad environment, without a cluster."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from pathlib import Path

import pytest

from devcluster import build, cluster


def test_pod_cidr_skips_ranges_that_routes_use() -> None:
    routes = [
        "default via 192.0.2.1 dev eth0",
        "10.244.0.0/16 dev gftbr1 proto kernel scope link src 10.244.0.1",
        "10.245.3.0/24 via 192.0.2.9 dev eth0",
        "192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2",
        "local 127.0.0.1 dev lo table local proto kernel scope host src 127.0.0.1",
    ]
    assert cluster.choose_pod_cidr(routes) == ipaddress.ip_network("10.246.0.0/16")


def test_pod_cidr_never_holds_a_dns_resolver(tmp_path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example\nnameserver 10.244.0.53\nnameserver ::1\n")
    taken = [f"{ns}/32" for ns in cluster.nameservers(resolv)]
    assert taken == ["10.244.0.53/32"]
    assert cluster.choose_pod_cidr([], taken) == ipaddress.ip_network("10.245.0.0/16")
    assert cluster.nameservers(tmp_path / "missing") == []


def test_pod_cidr_ignores_the_default_route() -> None:
    assert cluster.choose_pod_cidr(["default via 10.244.0.1 dev eth0"]) == ipaddress.ip_network(
        "10.244.0.0/16"
    )


def test_pod_cidr_refuses_when_every_range_is_taken() -> None:
    with pytest.raises(cluster.ClusterError, match="overlaps a route"):
        cluster.choose_pod_cidr(["10.0.0.0/8 dev eth1", "172.16.0.0/12 dev eth2"])


def test_bridge_name_fits_a_linux_interface_name(tmp_path: Path) -> None:
    name = cluster.bridge_name(tmp_path / ("x" * 200))
    assert len(name) <= 15 and name.startswith("gftbr")
    assert name != cluster.bridge_name(tmp_path / "other")


def _fake_tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_go_missing_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.BuildError, match=r"Go was not found on PATH.*Go >= 1\.25"):
        build.find_go()


def test_go_too_old_names_the_version_needed(monkeypatch, tmp_path: Path) -> None:
    _fake_tool(tmp_path / "bin", "go", 'echo "go version go1.21.4 linux/amd64"')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(build.BuildError, match=r"go1\.21\.4.*needs Go >= 1\.25"):
        build.find_go()


def test_failed_build_step_names_the_command_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "build-x.log"
    with pytest.raises(build.BuildError) as caught:
        build._run(
            ["sh", "-c", "echo compiling; echo 'undefined: Foo' >&2; exit 3"],
            tmp_path,
            log,
            dict(os.environ),
        )
    message = str(caught.value)
    assert "exit 3" in message and "sh -c" in message
    assert str(log) in message and "undefined: Foo" in message
    assert "undefined: Foo" in log.read_text()


def test_exhausted_ports_give_a_clear_message(monkeypatch) -> None:
    def refuse(self, address):
        raise OSError(99, "Cannot assign requested address")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(cluster.ClusterError, match="ephemeral ports are exhausted"):
        cluster.free_port()


def test_network_namespaces_not_permitted_is_explained(monkeypatch, tmp_path: Path) -> None:
    _fake_tool(
        tmp_path / "bin",
        "ip",
        'echo "mount --make-shared /run/netns failed: Operation not permitted" >&2; exit 1',
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(cluster.ClusterError, match="network namespaces are not permitted"):
        cluster._check_netns_permitted()


def test_kwok_stages_are_valid_yaml_templates() -> None:
    stages = cluster._kwok_stages()
    names = [s["metadata"]["name"] for s in stages]
    assert names == ["pod-ready", "pod-fail-on-purpose", "pod-complete", "pod-delete"]
    for s in stages:
        assert s["spec"]["resourceRef"] == {"apiGroup": "v1", "kind": "Pod"}
