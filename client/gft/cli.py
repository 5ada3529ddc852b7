"""``kubectl gft``: the kubectl plugin, on the same client as ``import gft``.

Installed as the ``kubectl-gft`` executable; kubectl finds it on PATH (``kubectl plugin list``)
and runs it for ``kubectl gft ...``. Its help reads like kubectl's own: a description, examples,
options, usage.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from gft.errors import GftError, RunFailed
from gft.files import Placement
from gft.specs import Claim, DataStore, S3Bucket

PROG = "kubectl gft"
WIDTH = 100
GLOBAL_FOOTER = (
    'Use "kubectl gft options" for a list of global command-line options (applies to all commands).'
)


@dataclass
class Command:
    name: str
    group: str
    short: str
    long: str
    usage: str
    examples: list[tuple[str, str]]
    run: Callable[[argparse.Namespace, IO[str]], int]
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    parser: argparse.ArgumentParser = field(init=False)


COMMANDS: dict[str, Command] = {}


def command(**kw: Any) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        COMMANDS[kw["name"]] = Command(run=fn, **kw)
        return fn

    return register


# ------------------------------------------------------------------------------ global options


def global_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("global")
    g.add_argument(
        "-n",
        "--namespace",
        default=None,
        help="If present, the namespace scope for this CLI request.",
    )
    g.add_argument(
        "--kubeconfig", default=None, help="Path to the kubeconfig file to use for CLI requests."
    )
    g.add_argument("--context", default=None, help="The name of the kubeconfig context to use.")
    g.add_argument(
        "--image",
        default=None,
        help="Image of the helper pod that moves files (it needs gft_trainer); the "
        "run's trainer image by default.",
    )
    g.add_argument(
        "--node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Node label the helper pod must match (repeatable); the run's own by default.",
    )
    g.add_argument(
        "--toleration",
        action="append",
        default=[],
        metavar="KEY[=VALUE]:EFFECT",
        help="Taint the helper pod tolerates (repeatable); the run's own by default.",
    )


def _client(args: argparse.Namespace, data_store: DataStore | None = None) -> Any:
    from gft.client import Client

    placement = None
    if args.node_selector or args.toleration:
        placement = Placement(
            node_selector=dict(_pair(s, "--node-selector") for s in args.node_selector),
            tolerations=[_toleration(t) for t in args.toleration],
        )
    return Client(
        args.namespace, kubeconfig=args.kubeconfig, context=args.context,
        data_store=data_store, image=args.image, placement=placement,
    )  # fmt: skip


def _pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise GftError(f"{flag} {text!r}: write KEY=VALUE")
    return key, value


def _toleration(text: str) -> dict[str, str]:
    """``key[=value]:Effect`` as in ``kubectl taint``."""
    head, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise GftError(f"--toleration {text!r}: write KEY[=VALUE]:NoSchedule|PreferNoSchedule|"
                       "NoExecute")  # fmt: skip
    key, eq, value = head.partition("=")
    if eq:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def s3_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--s3-endpoint",
        default=None,
        help="URL of the S3-compatible service the training pod reads from; AWS when empty.",
    )
    parser.add_argument(
        "--s3-upload-endpoint",
        default=None,
        help="URL this machine uploads through, when it differs from --s3-endpoint.",
    )
    parser.add_argument("--s3-region", default="us-east-1", help="The bucket's region.")
    parser.add_argument("--s3-secret", default=None,
                        help="Secret (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) the training "
                             "pod reads the bucket with; anonymous when empty. Uploads use your "
                             "AWS_* variables or profile.")  # fmt: skip


def store_of(dest: str | None, args: argparse.Namespace, size: str = "10Gi") -> DataStore | None:
    """``pvc://CLAIM[/FOLDER]`` or ``s3://BUCKET[/PREFIX]``."""
    if dest is None:
        return None
    if dest.startswith("pvc://"):
        claim, _, folder = dest[6:].partition("/")
        if not claim:
            raise GftError(f"{dest}: write pvc://CLAIM[/FOLDER]")
        return Claim(claim, folder.strip("/") or "gft-datasets", size=size)
    if dest.startswith("s3://"):
        bucket, _, prefix = dest[5:].partition("/")
        if not bucket:
            raise GftError(f"{dest}: write s3://BUCKET[/PREFIX]")
        return S3Bucket(
            bucket, prefix.strip("/") or "gft-datasets", endpoint=args.s3_endpoint,
            region=args.s3_region, credentials_secret=args.s3_secret,
            upload_endpoint=args.s3_upload_endpoint,
        )  # fmt: skip
    raise GftError(f"{dest}: write pvc://CLAIM[/FOLDER] or s3://BUCKET[/PREFIX]")


# ------------------------------------------------------------------------------------ commands


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--filename",
        required=True,
        help="The GemmaFineTune manifest (YAML or JSON); - reads standard input.",
    )
    p.add_argument(
        "--name", default=None, help="Name of the fine-tune (instead of the manifest's)."
    )
    p.add_argument(
        "--data",
        default=None,
        help="The training records instead of the manifest's: a local file, "
        "s3://BUCKET/KEY, hf://ORG/NAME or pvc://CLAIM/PATH.",
    )
    p.add_argument(
        "--upload-to",
        default=None,
        help="Where a local --data file goes: pvc://CLAIM[/FOLDER] (created when "
        "missing) or s3://BUCKET[/PREFIX].",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="Follow the run to its end with a progress bar (step, loss, ETA).",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="With --follow: give up after this many seconds (0: never).",
    )
    s3_options(p)


@command(
    name="run", group="Run and follow",
    short="Create a fine-tune from a manifest (with a local dataset if you like) and follow it",
    long="Create a GemmaFineTune from a manifest. With --data, the training records come from a "
         "local file (uploaded first, with a progress bar, to --upload-to), a bucket, the hub "
         "or a claim instead of the manifest's own source; the manifest's format and shaping "
         "stay. With --follow, watch it to the end with a progress bar and exit 0 only if it "
         "succeeded.",
    usage="kubectl gft run -f FILENAME [--data SOURCE [--upload-to DEST]] [--follow] [options]",
    examples=[
        ("Start the fine-tune in finetune.yaml and follow it to the end",
         "kubectl gft run -f finetune.yaml --follow"),
        ("Train on a local JSONL, uploaded to the claim 'datasets' (created when missing)",
         "kubectl gft run -f finetune.yaml --data train.jsonl --upload-to pvc://datasets --follow"),
        ("Train on a local JSONL, uploaded to a bucket the pods read with Secret s3-keys",
         "kubectl gft run -f finetune.yaml --data train.jsonl --upload-to s3://data/team \\\n"
         "      --s3-endpoint http://minio.storage:9000 --s3-secret s3-keys"),
    ],
    arguments=_run_arguments,
)  # fmt: skip
def run_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    manifest = yaml.safe_load(text)
    if not isinstance(manifest, dict):
        raise GftError(f"{args.filename}: not a GemmaFineTune manifest")
    if args.name:
        manifest.setdefault("metadata", {})["name"] = args.name
    if args.namespace is None:  # as kubectl apply: the manifest's namespace, unless -n says
        args.namespace = (manifest.get("metadata") or {}).get("namespace")
    client = _client(args, store_of(args.upload_to, args))
    if args.data:
        from gft import specs

        source = specs.data_source(args.data, client.data_store)
        if isinstance(source, specs.LocalFile):
            source = client.upload(source.path)
        spec = manifest.setdefault("spec", {})
        dataset = {k: v for k, v in (spec.get("dataset") or {}).items() if k not in SOURCES}
        spec["dataset"] = {**dataset, **source}
    ft = client.submit(manifest)
    print(f"gemmafinetune.finetune.gemma.dev/{ft.name} created", file=out)
    if not args.follow:
        return 0
    try:
        ft = client.wait(ft.name, timeout=args.timeout or None)
    except RunFailed as e:
        print(str(e), file=sys.stderr)
        return 1
    print(str(ft), file=out)
    return 0


SOURCES = ("volume", "configMap", "hub", "s3", "path", "evalPath")


@command(
    name="logs", group="Run and follow",
    short="Print the trainer's log of a fine-tune",
    long="Print the log of the trainer of a fine-tune's newest training pod. With -f, follow "
         "it until the trainer ends (waiting for it to start).",
    usage="kubectl gft logs NAME [-f] [--tail N] [options]",
    examples=[("Follow the trainer's log of pip", "kubectl gft logs pip -f"),
              ("The last 20 lines", "kubectl gft logs pip --tail 20")],
    arguments=lambda p: (
        p.add_argument("name", metavar="NAME"),
        p.add_argument("-f", "--follow", action="store_true",
                       help="Specify if the logs should be streamed."),
        p.add_argument("--tail", type=int, default=-1,
                       help="Lines of recent log file to display. Defaults to -1, all lines."),
    ),
)  # fmt: skip
def logs_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    client = _client(args)
    tail = args.tail if args.tail >= 0 else None
    for line in client.logs(args.name, follow=args.follow, tail=tail):
        print(line, file=out, flush=True)
    return 0


@command(
    name="tb", group="Run and follow",
    short="Open a fine-tune's TensorBoard on this machine (kubectl port-forward)",
    long="Forward a local port to the fine-tune's TensorBoard (its Service: the sidecar while it "
         "trains, a small Deployment for spec.tensorboard.keepAfterFinishSeconds after) and "
         "print the URL; runs until interrupted.",
    usage="kubectl gft tb NAME [--port PORT] [options]",
    examples=[("TensorBoard of pip on http://127.0.0.1:6006/", "kubectl gft tb pip"),
              ("On another local port", "kubectl gft tb pip --port 16006")],
    arguments=lambda p: (
        p.add_argument("name", metavar="NAME"),
        p.add_argument("--port", type=int, default=6006,
                       help="Local port (0 picks a free one)."),
        p.add_argument("--address", default="127.0.0.1",
                       help="Local address to listen on."),
    ),
)  # fmt: skip
def tb_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    client = _client(args)
    ft = client.get(args.name)  # a missing fine-tune is said in the API server's words
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise GftError("kubectl is not on PATH; tb runs `kubectl port-forward`")
    cmd = [kubectl, "port-forward", f"svc/{ft.name}", f"{args.port or ''}:6006",
           "--address", args.address, "-n", client.namespace]  # fmt: skip
    if args.kubeconfig:
        cmd += ["--kubeconfig", args.kubeconfig]
    if args.context:
        cmd += ["--context", args.context]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Forwarding from") and "->" in line:
            local = line.split("Forwarding from ", 1)[1].split(" ->")[0]
            print(f"TensorBoard of {ft.name}: http://{local}/  (Ctrl-C stops)", file=out,
                  flush=True)  # fmt: skip
            break
        if proc.poll() is not None or "error" in line.lower():
            proc.kill()
            raise GftError(
                f"{line.strip()}\nTensorBoard of {ft.name} is not running (it stops "
                "spec.tensorboard.keepAfterFinishSeconds after the run); `kubectl gft metrics "
                f"{ft.name}` reads its curves from the output claim"
            )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        return 0


def _output_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "csv", "json"), default="table",
                   help="Output format. One of: table, csv, json.")  # fmt: skip


def _print_frame(frame: Any, output: str, out: IO[str]) -> None:
    if output == "csv":
        out.write(frame.to_csv())
    elif output == "json":
        out.write(frame.to_json(orient="columns", indent=2) + "\n")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.max_columns", None,
                               "display.width", 200):  # fmt: skip
            out.write(frame.to_string(na_rep="") + "\n")


@command(
    name="compare", group="Results",
    short="Compare fine-tunes side by side: settings and results",
    long="Print two or more fine-tunes side by side: model, method, dataset, learning rate and "
         "batch size, then steps, losses, accuracy, best step, speed and run time.",
    usage="kubectl gft compare NAME NAME... [-o table|csv|json] [options]",
    examples=[("Compare two runs", "kubectl gft compare pip-lr1e-3 pip-lr3e-4")],
    arguments=lambda p: (p.add_argument("names", nargs="+", metavar="NAME"), _output_arg(p)),
)  # fmt: skip
def compare_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    _print_frame(_client(args).compare(*args.names), args.output, out)
    return 0


@command(
    name="metrics", group="Results",
    short="Print a fine-tune's metrics history (one row per step)",
    long="Print every scalar the trainer logged to TensorBoard (loss, eval loss, learning rate, "
         "accuracy, throughput, GPU), one row per step, read from the run's event files on its "
         "output claim through a short-lived helper pod.",
    usage="kubectl gft metrics NAME [-o table|csv|json] [options]",
    examples=[("The history of pip as CSV", "kubectl gft metrics pip -o csv > pip.csv")],
    arguments=lambda p: (p.add_argument("name", metavar="NAME"), _output_arg(p)),
)  # fmt: skip
def metrics_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    _print_frame(_client(args).metrics(args.name), args.output, out)
    return 0


def _name_only(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")


@command(
    name="suspend", group="Control",
    short="Pause a fine-tune: checkpoint, then stop the trainer",
    long="Set spec.suspend: the trainer saves a checkpoint and stops; `kubectl gft resume` "
         "continues from it.",
    usage="kubectl gft suspend NAME [options]",
    examples=[("Pause pip", "kubectl gft suspend pip")],
    arguments=_name_only,
)  # fmt: skip
def suspend_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    ft = _client(args).suspend(args.name)
    print(f"gemmafinetune.finetune.gemma.dev/{ft.name} suspended", file=out)
    return 0


@command(
    name="resume", group="Control",
    short="Resume a suspended fine-tune from its checkpoint",
    long="Clear spec.suspend: a new trainer continues from the checkpoint the last one saved.",
    usage="kubectl gft resume NAME [options]",
    examples=[("Resume pip", "kubectl gft resume pip")],
    arguments=_name_only,
)  # fmt: skip
def resume_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    ft = _client(args).resume(args.name)
    print(f"gemmafinetune.finetune.gemma.dev/{ft.name} resumed", file=out)
    return 0


@command(
    name="stop", group="Control",
    short="Stop a fine-tune for good (delete it; its output claim stays)",
    long="Delete the GemmaFineTune: the trainer saves a checkpoint and its children are "
         "removed. The output claim (checkpoints, exported weights) stays; a new fine-tune "
         "carries on from it with spec.resumeFrom.",
    usage="kubectl gft stop NAME [options]",
    examples=[("Stop pip", "kubectl gft stop pip")],
    arguments=_name_only,
)  # fmt: skip
def stop_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    _client(args).stop(args.name)
    print(f"gemmafinetune.finetune.gemma.dev/{args.name} deleted", file=out)
    return 0


@command(
    name="get-adapter", group="Data in and out",
    short="Copy a fine-tune's adapter (or merged model) to a local folder",
    long="Copy the adapter a fine-tune exported (--merged: the merged model; --model: the model "
         "of a full fine-tune) from its output claim to DIR, through a short-lived helper pod. "
         "The folder loads with PeftModel.from_pretrained(base, DIR) (or "
         "AutoModelForCausalLM.from_pretrained(DIR)).",
    usage="kubectl gft get-adapter NAME DIR [--merged | --model] [options]",
    examples=[("The adapter of pip into ./pip-adapter",
               "kubectl gft get-adapter pip ./pip-adapter"),
              ("Its merged model", "kubectl gft get-adapter pip ./pip-merged --merged")],
    arguments=lambda p: (
        p.add_argument("name", metavar="NAME"),
        p.add_argument("dir", metavar="DIR"),
        p.add_argument("--merged", action="store_true",
                       help="The merged model (spec.method.mergeAdapter) instead of the adapter."),
        p.add_argument("--model", action="store_true",
                       help="The model of a full fine-tune."),
    ),
)  # fmt: skip
def get_adapter_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    artifact = "merged" if args.merged else "model" if args.model else "adapter"
    dest = _client(args).fetch(args.name, args.dir, artifact=artifact)
    print(f"{artifact} of {args.name} in {dest}", file=out)
    return 0


@command(
    name="upload", group="Data in and out",
    short="Upload a local dataset to a claim or a bucket, where fine-tunes can read it",
    long="Upload FILE, with a progress bar, to a PersistentVolumeClaim (created when missing, "
         "through a short-lived helper pod) or an S3-compatible bucket, under a name made of its "
         "content (the same file is uploaded once). Prints the spec.dataset lines that read it.",
    usage="kubectl gft upload FILE --to pvc://CLAIM[/FOLDER] | s3://BUCKET[/PREFIX] [options]",
    examples=[
        ("Onto the claim 'datasets' (10Gi, created when missing)",
         "kubectl gft upload train.jsonl --to pvc://datasets"),
        ("Into a bucket of an S3-compatible service",
         "kubectl gft upload train.jsonl --to s3://data/team --s3-endpoint "
         "http://minio.storage:9000 \\\n      --s3-secret s3-keys"),
    ],
    arguments=lambda p: (
        p.add_argument("file", metavar="FILE"),
        p.add_argument("--to", required=True,
                       help="pvc://CLAIM[/FOLDER] or s3://BUCKET[/PREFIX]."),
        p.add_argument("--size", default="10Gi",
                       help="Size of the claim when it is created."),
        s3_options(p),
    ),
)  # fmt: skip
def upload_cmd(args: argparse.Namespace, out: IO[str]) -> int:
    store = store_of(args.to, args, size=args.size)
    source = _client(args).upload(args.file, store)
    out.write(yaml.safe_dump({"spec": {"dataset": source}}, sort_keys=False))
    return 0


# ---------------------------------------------------------------------------------- the help


def _flag_default(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "false"
    if isinstance(action, argparse._AppendAction):
        return "[]"
    if action.default is None or action.default == "":
        return "''"
    if isinstance(action.default, int | float):
        return str(action.default)
    return f"'{action.default}'"


def _options_text(parser: argparse.ArgumentParser, group: str | None = None) -> str:
    lines = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        in_global = (
            action.container.title == "global" if hasattr(action.container, "title") else False
        )
        if (group == "global") != in_global:
            continue
        flags = ", ".join(action.option_strings)
        text = "\n\t".join(textwrap.wrap(action.help or "", WIDTH - 8, break_on_hyphens=False))
        lines.append(f"    {flags}={_flag_default(action)}:\n\t{text}\n")
    return "\n".join(lines)


def command_help(cmd: Command) -> str:
    examples = "\n\n".join(f"  # {what}\n  {how}" for what, how in cmd.examples)
    long = textwrap.fill(cmd.long, WIDTH, break_on_hyphens=False)
    return (
        f"{long}\n\nExamples:\n{examples}\n\nOptions:\n{_options_text(cmd.parser)}\n"
        f"Usage:\n  {cmd.usage}\n\n{GLOBAL_FOOTER}\n"
    )


def root_help() -> str:
    groups: dict[str, list[Command]] = {}
    for cmd in COMMANDS.values():
        groups.setdefault(cmd.group, []).append(cmd)
    width = max(len(n) for n in COMMANDS) + 2
    blocks = [
        "\n".join([f"{group}:", *(f"  {c.name:<{width}}{c.short}" for c in cmds)])
        for group, cmds in groups.items()
    ]
    return (
        "Fine-tune Gemma models on Kubernetes: start, follow and compare GemmaFineTunes, and "
        "move\ntheir data in and out. Every command acts as you (your kubeconfig).\n\n"
        + "\n\n".join(blocks)
        + f"\n\nUsage:\n  {PROG} [command] [options]\n\n"
        f'Use "{PROG} <command> --help" for more information about a given command.\n'
        f"{GLOBAL_FOOTER}\n"
    )


def options_help() -> str:
    parser = argparse.ArgumentParser(add_help=False)
    global_options(parser)
    return (
        "The following options can be passed to any command:\n\n"
        + _options_text(parser, "global")
        + f"\nUsage:\n  {PROG} [command] [options]\n"
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # kubectl's way: the error, then where to look
        cmd = self.prog.split()[-1]
        more = f"{PROG} {cmd} --help" if cmd in COMMANDS else f"{PROG} --help"
        sys.stderr.write(f"error: {message}\nSee '{more}' for usage.\n")
        raise SystemExit(2)


def _build() -> None:
    for cmd in COMMANDS.values():
        parser = _Parser(prog=f"{PROG} {cmd.name}", add_help=False)
        parser.add_argument("-h", "--help", action="store_true")
        cmd.arguments(parser)
        global_options(parser)
        cmd.parser = parser


def main(argv: list[str] | None = None, out: IO[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    _build()
    if not argv or argv[0] in ("-h", "--help", "help"):
        out.write(root_help())
        return 0
    if argv[0] == "options":
        out.write(options_help())
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        sys.stderr.write(f'error: unknown command "{argv[0]}" for "{PROG}"\n'
                         f"See '{PROG} --help' for usage.\n")  # fmt: skip
        return 2
    if "-h" in argv[1:] or "--help" in argv[1:]:
        out.write(command_help(cmd))
        return 0
    args = cmd.parser.parse_args(argv[1:])
    try:
        return cmd.run(args, out)
    except GftError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
