"""The proving ground: a real Kubernetes control plane on this machine, with no Docker.

- ``devcluster.build``: builds (once, cached under ``$GFT_CACHE``) kube-apiserver,
  kube-controller-manager, kube-scheduler and kubectl of one pinned release, etcd and KWOK.
- ``devcluster.cluster``: starts and stops them (TLS, RBAC, PodSecurity, ServiceAccount
  tokens, garbage collection, the Job controller, a default StorageClass), KWOK for fake
  nodes (some with ``nvidia.com/gpu``), and the runner.
- ``devcluster.runner``: plays the kubelet for one node so pods really run here.

``python -m devcluster up|down|build|status|demo`` is what ``make cluster-up`` and friends call.
"""
