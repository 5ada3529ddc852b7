"""Copies of the artifacts beyond the volume: a hub repository (a local stand-in for the hub's
upload API, since the hub cannot be reached here) and, in test_export_s3.py, a real
S3-compatible server."""

from __future__ import annotations

from pathlib import Path

import pytest
from gft_api.contract import ExitCode, HubTarget
from gft_trainer import export
from gft_trainer.errors import TrainerError

from trainer.hub_server import hub_server


def artifact(root: Path) -> Path:
    folder = root / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "sub" / "chat_template.jinja").write_text("{{ messages }}")
    return folder


def test_the_folder_is_committed_to_a_repository_created_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = artifact(tmp_path)
    with hub_server() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("GFT_HUB_EXPORT_TOKEN", "hf_write")
        url = export.to_hub(folder, HubTarget(repo="me/pip-adapter"))
    assert url == f"{hub.url}/me/pip-adapter"
    assert hub.repos["me/pip-adapter"]["visibility"] == "private"
    sent = hub.files["me/pip-adapter"]
    assert sent == {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in export.files_of(folder)
    }
    assert all(t == "Bearer hf_write" for t in hub.tokens)


@pytest.mark.parametrize(
    ("status", "error", "code", "words"),
    [
        (401, export.ExportDenied, ExitCode.NOT_PERMITTED, "output.hub.tokenSecretRef"),
        (403, export.ExportDenied, ExitCode.NOT_PERMITTED, "write access"),
        (404, export.ExportTargetNotFound, ExitCode.CONFIG_ERROR, "output.hub.repo"),
    ],
)
def test_refusals_are_not_retried_and_name_the_field(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    error: type[TrainerError],
    code: ExitCode,
    words: str,
) -> None:
    with hub_server() as hub:
        hub.refuse = status
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("GFT_HUB_EXPORT_TOKEN", "hf_wrong")
        with pytest.raises(error) as raised:
            export.to_hub(artifact(tmp_path), HubTarget(repo="me/pip-adapter"))
    assert raised.value.exit_code == code and code != ExitCode.RETRYABLE
    assert words in str(raised.value) and "me/pip-adapter" in str(raised.value)
    assert hub.files == {}


def test_no_token_is_refused_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GFT_HUB_EXPORT_TOKEN", raising=False)
    with pytest.raises(export.ExportDenied, match=r"output\.hub\.tokenSecretRef"):
        export.to_hub(artifact(tmp_path), HubTarget(repo="me/pip-adapter"))
