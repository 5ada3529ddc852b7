"""The proving ground's certificates and kubeconfigs, made with the openssl command line.

One CA signs everything: the API server's serving certificate, a client certificate per
component (each with its real Kubernetes identity, so RBAC sees what it sees in a real cluster),
and the key pair that signs ServiceAccount tokens. EC P-256 keys keep this under a second.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml


class PkiError(RuntimeError):
    pass


@dataclass(frozen=True)
class ClientCert:
    name: str
    common_name: str
    organization: str | None = None


# Identities the control plane expects (see the Kubernetes PKI documentation).
CLIENTS = (
    ClientCert("admin", "kubernetes-admin", "system:masters"),
    ClientCert("controller-manager", "system:kube-controller-manager"),
    ClientCert("scheduler", "system:kube-scheduler"),
    ClientCert("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),
)


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise PkiError("openssl not found on PATH; install it (apt-get install openssl)")
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PkiError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _key(path: Path) -> None:
    _openssl(
        "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path), cwd=path.parent
    )


def _sign(pki: Path, name: str, subject: str, extensions: str) -> None:
    _key(pki / f"{name}.key")
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    (pki / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=pki,
    )
    (pki / f"{name}.csr").unlink()
    (pki / f"{name}.ext").unlink()


def make_pki(pki: Path, server_ips: list[str]) -> None:
    """Write ca.{crt,key}, apiserver.{crt,key}, one cert per client, and sa.{key,pub}."""
    pki.mkdir(parents=True, exist_ok=True)
    _key(pki / "ca.key")
    _openssl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=gft-proving-ground-ca",
        "-days",
        "30",
        "-sha256",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    san = ",".join([f"DNS:{n}" for n in names] + [f"IP:{ip}" for ip in server_ips])
    _sign(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n",
    )
    for client in CLIENTS:
        subject = f"/CN={client.common_name}"
        if client.organization:
            subject = f"/O={client.organization}{subject}"
        _sign(
            pki,
            client.name,
            subject,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n",
        )
    _openssl(
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "sa.key",
        cwd=pki,
    )
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def sign_server(pki: Path, name: str, ips: list[str]) -> None:
    """Write ``<name>.{crt,key}``: a serving certificate for ``ips`` signed by the cluster's CA
    (a webhook the API server calls on loopback trusts it through its caBundle)."""
    san = ",".join(f"IP:{ip}" for ip in ips)
    _sign(pki, name, f"/CN={name}",
          "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
          f"extendedKeyUsage=serverAuth\nsubjectAltName={san}\n")  # fmt: skip


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, pki: Path, client: str, user: str) -> None:
    """A kubeconfig that authenticates with ``<client>.crt`` against ``server``."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "gft-proving-ground",
                "cluster": {"server": server, "certificate-authority-data": _b64(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(pki / f"{client}.crt"),
                    "client-key-data": _b64(pki / f"{client}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "gft-proving-ground",
                "context": {"cluster": "gft-proving-ground", "user": user},
            }
        ],
        "current-context": "gft-proving-ground",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
