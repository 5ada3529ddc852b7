"""The GemmaFineTune API and the contract between the operator and the trainer.

Kept free of heavy imports: the operator imports it without torch, the trainer without kopf.

- ``gft_api.training``: the ML sections of the spec (model, dataset, method, training),
  shared word for word by the CRD and the trainer's config file.
- ``gft_api.contract``: the trainer's config file, its exit codes and its termination message.
"""

GROUP = "finetune.gemma.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "GemmaFineTune"
PLURAL = "gemmafinetunes"
SHORT_NAME = "gft"
