"""``gft``: fine-tune Gemma on Kubernetes from Python (and ``kubectl gft`` from a terminal).

    import gft

    client = gft.Client(data_store=gft.Claim("datasets"))   # your kubeconfig, its namespace
    run = client.create("pip", model="google/gemma-3-270m-it", data="train.jsonl",
                        training={"maxSteps": 30}, dataset={"format": "chat"})
    client.wait("pip")                      # a progress bar: step, loss, ETA
    client.metrics("pip")                   # pandas DataFrame, one row per step
    client.fetch("pip", "adapter/")         # PeftModel.from_pretrained(base, "adapter/")

The spec is ``gft_api``'s typed model: the client refuses what the API server would, by field.
"""

from gft.client import Client, FineTune
from gft.errors import ApiRefusal, GftError, RunFailed
from gft.files import Placement
from gft.specs import Claim, S3Bucket

__all__ = [
    "ApiRefusal",
    "Claim",
    "Client",
    "FineTune",
    "GftError",
    "Placement",
    "RunFailed",
    "S3Bucket",
]
