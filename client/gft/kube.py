"""The connection to the cluster: the user's kubeconfig (or the pod's service account inside a
cluster), the namespace it names, the typed API clients, and raw requests through the API
server (a helper pod's proxy) with the same credentials."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gft_api import GROUP, PLURAL, VERSION

from gft.errors import GftError, refusal

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass
class Kube:
    api: Any  # kubernetes.client.ApiClient
    namespace: str

    @classmethod
    def connect(
        cls,
        namespace: str | None = None,
        kubeconfig: str | os.PathLike | None = None,
        context: str | None = None,
    ) -> Kube:
        """Log in as kubectl would: ``kubeconfig`` (else ``$KUBECONFIG``, else ~/.kube/config)
        and its current context's namespace; inside a pod, its service account."""
        from kubernetes import config

        path = str(kubeconfig) if kubeconfig else None
        in_cluster = (
            path is None
            and not os.environ.get("KUBECONFIG")
            and not Path(config.KUBE_CONFIG_DEFAULT_LOCATION).expanduser().exists()
            and "KUBERNETES_SERVICE_HOST" in os.environ
        )
        try:
            if in_cluster:
                from kubernetes.client import ApiClient

                config.load_incluster_config()
                api = ApiClient()
                default_ns = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
            else:
                api = config.new_client_from_config(config_file=path, context=context)
                default_ns = _context_namespace(path, context)
        except (config.ConfigException, OSError) as e:
            raise GftError(
                f"cannot load a kubeconfig ({e}); set KUBECONFIG or pass kubeconfig=/--kubeconfig"
            ) from None
        return cls(api, namespace or default_ns)

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    @property
    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api)

    @property
    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api)

    # -- GemmaFineTunes -----------------------------------------------------------------------

    def get_finetune(self, name: str) -> dict:
        return self.call(
            self.custom.get_namespaced_custom_object,
            GROUP, VERSION, self.namespace, PLURAL, name, what=name,
        )  # fmt: skip

    def list_finetunes(self) -> list[dict]:
        got = self.call(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL
        )
        return list(got.get("items", []))

    def create_finetune(self, body: dict) -> dict:
        name = body.get("metadata", {}).get("name", "")
        return self.call(
            self.custom.create_namespaced_custom_object,
            GROUP, VERSION, self.namespace, PLURAL, body, what=name,
        )  # fmt: skip

    def patch_finetune(self, name: str, patch: dict) -> dict:
        return self.call(
            self.custom.patch_namespaced_custom_object,
            GROUP, VERSION, self.namespace, PLURAL, name, patch, what=name,
        )  # fmt: skip

    def delete_finetune(self, name: str) -> dict:
        return self.call(
            self.custom.delete_namespaced_custom_object,
            GROUP, VERSION, self.namespace, PLURAL, name, what=name,
        )  # fmt: skip

    def call(self, method: Any, *args: Any, what: str = "", **kwargs: Any) -> Any:
        """One API call; a refusal becomes an ``ApiRefusal`` in the API server's words."""
        from kubernetes.client.exceptions import ApiException

        try:
            return method(*args, **kwargs)
        except ApiException as e:
            raise refusal(e, what, self.namespace) from None
        except OSError as e:  # urllib3's connection errors derive from it
            raise GftError(
                f"cannot reach the API server at {self.api.configuration.host}: {e}; check "
                "your kubeconfig's cluster and your network"
            ) from None

    # -- raw requests through the API server ---------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float | tuple[float, float] = (15, 300),
    ) -> Any:
        """``method path`` on the API server with the user's credentials, streamed (a urllib3
        response, not read): for a pod's proxy, whose bodies are files, not JSON."""
        import urllib3

        headers = dict(headers or {})
        self.api.update_params_for_auth(headers, [], ["BearerToken"], path, method, None)
        url = self.api.configuration.host.rstrip("/") + path
        if isinstance(timeout, tuple):
            limit = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        else:
            limit = urllib3.Timeout(total=timeout)
        try:
            return self.api.rest_client.pool_manager.request(
                method, url, body=body, headers=headers, preload_content=False, timeout=limit,
                retries=False,
            )  # fmt: skip
        except urllib3.exceptions.HTTPError as e:
            raise GftError(f"{method} {path}: {e}") from None


def _context_namespace(path: str | None, context: str | None) -> str:
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=path)
    except config.ConfigException:
        return "default"
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"
