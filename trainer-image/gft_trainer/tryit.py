"""``gft-try``: a finished run's model, served for a person to ask it questions (the
dashboard's "Try it"), with the base model's answer beside each of the run's.

    gft-try --config /etc/gft/config.yaml [--port 8000] [--idle-seconds 600]

It reads the same config file as the run's trainer (the dashboard starts it in a pod made from
the run's own pod template, so it finds the model and the output volume where the trainer
did), loads the base model and what the run saved (``adapter``, ``model``, or the newest
checkpoint of a stopped run), and answers greedily:

- ``GET /healthz``: 200 once the model is loaded (the pod's readiness probe).
- ``GET /info``: what it serves (JSON).
- ``POST /generate`` with ``{"prompt": "...", "maxNewTokens": N}``: newline-delimited JSON, as
  the tokens come: ``{"model": "tuned", "text": "..."}`` pieces, then ``{"model": "tuned",
  "done": true, "truncated": "maxNewTokens" | null}``, then the same for ``"base"``.

One question at a time (the others wait). After ``--idle-seconds`` without a question it
exits 0: the pod ends and gives its GPU back.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gft_api.contract import TrainerConfig
from gft_api.training import DatasetFormat

from gft_trainer import checkpoints, data, modeling, samples

log = logging.getLogger("gft")
MAX_PROMPT_CHARS = 8000
MAX_BODY_BYTES = 64 << 10


class NothingToTry(RuntimeError):
    """The run saved no adapter, model or checkpoint to serve."""


def artifact(out: Path) -> Path:
    """What the run saved: its adapter or model, else its newest checkpoint (a stopped run)."""
    for name in ("adapter", "model"):
        if (out / name).is_dir():
            return out / name
    newest = checkpoints.newest_valid(out / "checkpoints")
    if newest is None:
        raise NothingToTry(
            f"{out} holds no adapter, model or checkpoint: the run saved nothing to try"
        )
    return newest


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def chat_trained(config: TrainerConfig, folder: Path) -> bool:
    """Whether prompts go in as a chat's user turn: the format says so, or (``auto``) the
    trainer wrote the end-of-turn stop it writes for a model trained on chats."""
    fmt = config.data.format
    if fmt != DatasetFormat.AUTO:
        return samples.chat_format(fmt)
    return (folder / "generation_config.json").exists()


@dataclass
class Served:
    """The model with the run's weights, the tokenizer, and how prompts are put."""

    model: Any
    base: Any | None
    """The base model apart (a full fine-tune); None when ``model`` is a PeftModel, whose
    adapter is switched off for the base's answer."""
    tok: data.Tokenizer
    chat: bool
    stops: list[int]
    folder: Path
    base_path: Path

    def prompt_ids(self, text: str) -> list[int]:
        fmt = DatasetFormat.CHAT if self.chat else DatasetFormat.TEXT
        return samples.fixed_prompt(self.tok, text, fmt).ids

    def answer(self, text: str, tuned: bool, max_new_tokens: int) -> Iterator[str | dict]:
        """The answer's pieces as they come, then a dict: ``truncated`` and ``tokens``."""
        import torch
        from transformers import (
            GenerationConfig,
            StoppingCriteria,
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        cancelled = threading.Event()

        class Cancelled(StoppingCriteria):
            """Ends the generation once nobody reads it (the asker went away)."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full(
                    (input_ids.shape[0],), cancelled.is_set(), device=input_ids.device
                )

        model = self.model if tuned or self.base is None else self.base
        device = next(model.parameters()).device
        ids = torch.tensor([self.prompt_ids(text)], device=device)
        streamer = TextIteratorStreamer(self.tok.hf, skip_prompt=True, skip_special_tokens=True)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.stops,
            pad_token_id=self.tok.pad_id,
            use_cache=True,
        )
        produced: list[Any] = []
        failed: list[BaseException] = []

        def work() -> None:
            off = self.model.disable_adapter() if not tuned and self.base is None else None
            try:
                with off or contextlib.nullcontext(), torch.no_grad():
                    produced.append(
                        model.generate(
                            input_ids=ids,
                            attention_mask=torch.ones_like(ids),
                            generation_config=config,
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        )
                    )
            except BaseException as e:  # said to the asker, not lost in a thread
                failed.append(e)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            # Closed early (the asker went away): the model is free for the next question
            # only once this generation has stopped, not when the turn is given back.
            cancelled.set()
            worker.join()
        if failed:
            raise failed[0]
        row = produced[0][0, ids.shape[1] :].tolist()
        yield {"truncated": samples.cut_by(row, self.stops, max_new_tokens), "tokens": len(row)}


def load(config: TrainerConfig) -> Served:
    """The base model and the run's weights, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(config.output.dir)
    folder = artifact(out)
    cache_dir = config.model.cache_dir or str(out / "hub-cache")
    base_path = modeling.resolve(config.model, cache_dir)
    generation = modeling.family_of(modeling.read_model_type(base_path))
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    device = "cuda" if cuda else "cpu"
    tokenizer_from = folder if (folder / "tokenizer_config.json").exists() else base_path
    tok = data.Tokenizer(AutoTokenizer.from_pretrained(tokenizer_from), generation)
    base = None
    if is_adapter(folder):
        from peft import PeftModel

        loaded = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
        model = PeftModel.from_pretrained(loaded, str(folder))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
        base.eval()
    model.eval()
    chat = chat_trained(config, folder)
    stops = [tok.eos_id]
    if chat:
        end = tok.hf.convert_tokens_to_ids(data.end_of_turn(generation))
        if end is not None and end != getattr(tok.hf, "unk_token_id", None):
            stops = sorted({end, tok.eos_id})
    return Served(model, base, tok, chat, stops, folder, base_path)


class Server(ThreadingHTTPServer):
    # Handler threads stay daemons (a client trickling bytes cannot keep the process, and the
    # pod's GPU, alive), and server_close waits a while for them, so that an answer being sent
    # is finished before entrypoint() ends the process.
    daemon_threads = True
    block_on_close = True  # socketserver keeps the threads in self._threads
    join_seconds = 30.0

    def server_close(self) -> None:
        HTTPServer.server_close(self)  # the socket; not ThreadingMixIn's join without an end
        deadline = time.monotonic() + self.join_seconds
        for thread in list(getattr(self, "_threads", [])):
            thread.join(max(0.0, deadline - time.monotonic()))

    def __init__(
        self, address: tuple[str, int], served: Served, max_new_tokens: int, token: str
    ) -> None:
        super().__init__(address, Handler)
        self.token = token
        self.served = served
        self.max_new_tokens = max_new_tokens
        self.turn = threading.Lock()  # one generation at a time
        self.last_question = time.monotonic()
        self.busy = 0


class Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = 60  # seconds a client may stall mid-request: none keeps the pod from ending

    def _allowed(self) -> bool:
        """Whether the request carries the pod's token (GFT_TRY_TOKEN, which the dashboard put
        in the pod and sends): any pod of the cluster may reach this port, and the adapter was
        trained on its team's data. Answers 401 when not."""
        sent = self.headers.get("Authorization") or ""
        if hmac.compare_digest(sent.encode(), f"Bearer {self.server.token}".encode()):
            return True
        self._json(401, {"error": "send the pod's token: Authorization: Bearer GFT_TRY_TOKEN"})
        return False

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._json(200, {"ok": True})
        elif not self._allowed():
            return
        elif self.path == "/info":
            s = self.server.served
            self._json(
                200,
                {
                    "artifact": str(s.folder),
                    "base": str(s.base_path),
                    "chat": s.chat,
                    "maxNewTokens": self.server.max_new_tokens,
                },
            )
        else:
            self._json(404, {"error": "no such page: GET /healthz, /info; POST /generate"})

    def do_POST(self) -> None:
        if not self._allowed():
            return
        if self.path != "/generate":
            self._json(404, {"error": "POST /generate"})
            return
        try:
            prompt, max_new = self._question()
        except ValueError as e:
            self._json(400, {"error": str(e)})
            return
        srv = self.server
        srv.busy += 1
        try:
            with srv.turn:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                for which in ("tuned", "base"):
                    for piece in srv.served.answer(prompt, which == "tuned", max_new):
                        if isinstance(piece, dict):
                            self._line({"model": which, "done": True, **piece})
                        elif piece:
                            self._line({"model": which, "text": piece})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the asker went away, or stopped reading
        except Exception as e:
            log.exception("generation failed")
            with contextlib.suppress(OSError):
                self._line({"error": f"{type(e).__name__}: {e}"})
        finally:
            srv.busy -= 1
            srv.last_question = time.monotonic()

    def _question(self) -> tuple[str, int]:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            raise ValueError(f"send a JSON body of at most {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as e:
            raise ValueError(f"the body is not JSON: {e}") from None
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError('give a "prompt" (a non-empty string)')
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
        cap = self.server.max_new_tokens
        asked = body.get("maxNewTokens", cap)
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
            raise ValueError("maxNewTokens is a whole number of at least 1")
        return prompt, min(asked, cap)

    def _line(self, obj: dict) -> None:
        self.wfile.write(json.dumps(obj).encode() + b"\n")
        self.wfile.flush()

    def _json(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def watch_idle(server: Server, idle_seconds: float, every: float = 2.0) -> None:
    """Shut the server down once no question came for ``idle_seconds``."""
    while True:
        time.sleep(every)
        quiet = time.monotonic() - server.last_question
        if not server.busy and quiet >= idle_seconds:
            log.info("no question for %.0f s: stopping (the pod ends, its GPU is free)", quiet)
            server.shutdown()
            return


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gft-try", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the run's trainer config file")
    p.add_argument("--address", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--idle-seconds", type=float, default=600.0, help="exit after this long without a question"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="the longest answer a question may ask for"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from gft_trainer.cli import setup_logging

    args = parser().parse_args(argv)
    setup_logging()
    token = os.environ.get("GFT_TRY_TOKEN", "")
    if len(token) < 16:
        log.error("set GFT_TRY_TOKEN (16 characters or more): only whoever holds it is answered")
        return 2
    try:
        config = TrainerConfig.load(args.config)
        served = load(config)
    except Exception as e:
        log.error("cannot serve the run: %s", e)
        return 1
    server = Server((args.address, args.port), served, args.max_new_tokens, token)
    log.info(
        "serving %s (base %s, %s prompts) on http://%s:%d/; stops after %.0f s without a question",
        served.folder,
        served.base_path,
        "chat" if served.chat else "plain",
        args.address,
        server.server_address[1],
        args.idle_seconds,
    )
    threading.Thread(target=watch_idle, args=(server, args.idle_seconds), daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()
    return 0


def entrypoint() -> None:
    """``gft-try``: main, then out without the interpreter's finalization. Its work is done,
    and torch's C++ thread pools, used by the generation threads, can abort in their static
    destructors as the interpreter shuts down ("terminate called without an active exception",
    SIGABRT: exit -6 instead of 0, seen in the suite with 3 sessions on 2 cores)."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entrypoint()
