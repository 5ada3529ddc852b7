"""The cluster admin's bounds on what a fine-tune's author may ask for.

Creating a GemmaFineTune makes the operator run a pod, create an Ingress and annotate pods with
the author's choices; whoever may create a GemmaFineTune must not get more than they could do by
hand. ``violations`` is pure: the spec and the policy in, what is refused out (each naming the
field and what is allowed). The operator reports them as ``Pending/PolicyViolation`` and creates
nothing for the fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gft_api.v1alpha1 import GemmaFineTuneSpec


@dataclass(frozen=True)
class Policy:
    allowed_image_prefixes: tuple[str, ...] = ()
    """Trainer and TensorBoard images must start with one of these; empty: any."""
    allowed_ingress_host_suffixes: tuple[str, ...] = ()
    allowed_ingress_classes: tuple[str, ...] = ()
    allowed_pod_annotation_prefixes: tuple[str, ...] = ()
    allowed_ingress_annotation_keys: tuple[str, ...] = ()
    """Keys a fine-tune's Ingress annotations may have (``key``, or ``prefix*``); empty: any.
    An Ingress annotation can configure the ingress controller for every host it serves."""
    require_ingress_tls: bool = False
    ingress_annotations: dict[str, str] = field(default_factory=dict)
    """Put on every fine-tune's Ingress, over the author's (authentication, for one)."""
    network_policy: bool = False
    """Give every fine-tune a NetworkPolicy: only the operator (and the namespaces below) reach
    its trainer's metrics port and its TensorBoard."""
    network_policy_namespaces: tuple[str, ...] = ()
    operator_namespace: str = "gft-system"


def _allowed(value: str, prefixes: tuple[str, ...], suffix: bool = False) -> bool:
    if not prefixes:
        return True
    return any(value.endswith(p) if suffix else value.startswith(p) for p in prefixes)


def key_allowed(key: str, allowed: tuple[str, ...]) -> bool:
    """An exact key, or a prefix ending in ``*``; empty: any."""
    return not allowed or any(
        key == a or (a.endswith("*") and key.startswith(a[:-1])) for a in allowed
    )


def violations(spec: GemmaFineTuneSpec, default_image: str, policy: Policy) -> list[str]:
    """What in ``spec`` the policy refuses, one sentence each."""
    return run_violations(spec, default_image, policy) + ingress_violations(spec, policy)


def run_violations(spec: GemmaFineTuneSpec, default_image: str, policy: Policy) -> list[str]:
    """What the policy refuses of the training pod (fixed at creation)."""
    found: list[str] = []
    prefixes = policy.allowed_image_prefixes
    images = {"spec.image": spec.image or default_image}
    if spec.tensorboard.enabled and spec.tensorboard.image:
        images["spec.tensorboard.image"] = spec.tensorboard.image
    for where, image in images.items():
        if not _allowed(image, prefixes):
            found.append(f"{where} {image} is not under an allowed prefix ({', '.join(prefixes)})")
    keys = policy.allowed_pod_annotation_prefixes
    for key in sorted(spec.pod_annotations):
        if not _allowed(key, keys):
            found.append(
                f"spec.podAnnotations {key} is not under an allowed prefix ({', '.join(keys)})"
            )
    return found


def ingress_violations(spec: GemmaFineTuneSpec, policy: Policy) -> list[str]:
    """What the policy refuses of the TensorBoard Ingress (which may change at any time)."""
    found: list[str] = []
    ing = spec.tensorboard.ingress if spec.tensorboard.enabled else None
    if ing is not None:
        suffixes = policy.allowed_ingress_host_suffixes
        if not _allowed(ing.host, suffixes, suffix=True):
            found.append(
                f"spec.tensorboard.ingress.host {ing.host} does not end with an allowed suffix "
                f"({', '.join(suffixes)})"
            )
        classes = policy.allowed_ingress_classes
        if classes and ing.ingress_class_name and ing.ingress_class_name not in classes:
            found.append(
                f"spec.tensorboard.ingress.ingressClassName {ing.ingress_class_name} is not "
                f"allowed ({', '.join(classes)})"
            )
        if policy.require_ingress_tls and not ing.tls_secret_name:
            found.append(
                "spec.tensorboard.ingress.tlsSecretName is required: TensorBoard has no "
                "authentication of its own, so it is exposed over TLS only"
            )
        allowed = policy.allowed_ingress_annotation_keys
        for key in sorted(ing.annotations):
            if not key_allowed(key, allowed):
                found.append(
                    f"spec.tensorboard.ingress.annotations {key} is not allowed "
                    f"({', '.join(allowed)})"
                )
    return found
