"""The runner's container shim: run as ``python -I shim.py SPEC.json`` inside the pod's network
namespace and a fresh, private mount (and UTS) namespace of its own. It sets the hostname,
mounts the container's volumes at their mount paths (creating missing mount points on the
host's file system), mounts the termination-message file, changes directory and then execs the
container's command, so the command's process keeps the shim's pid.

Mounts of kind ``keep`` name host folders the command itself comes from (the Python
environment, the checkout): wherever a volume of the pod lands above one of them (an emptyDir
over /tmp, where a checkout made with ``mktemp -d`` lives), the folder is bound back at its own
path, so the command still runs and the pod still gets its volume everywhere else.

Standard library only; it must not import the runner.
"""

import json
import os
import socket
import subprocess
import sys

MOUNT = next((p for p in ("/usr/bin/mount", "/bin/mount") if os.path.exists(p)), "mount")


def mount(*args: str) -> None:
    # --no-canonicalize: a pinned source (/proc/PID/fd/N) must be followed as the magic link
    # it is; canonicalized, it becomes the path string it names, which may by now lead to
    # whatever a mount put there (the volume over a checkout under /tmp, say).
    result = subprocess.run([MOUNT, "--no-canonicalize", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {result.stderr.strip()}")


def ensure_target(target: str, is_dir: bool) -> None:
    if os.path.lexists(target):
        return
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        open(target, "a").close()


def pinned(path: str) -> str:
    """A name for ``path`` that stays valid once a mount covers where it lives (the runner's
    own files are under /tmp, which a container may mount an emptyDir over)."""
    fd = os.open(path, os.O_PATH)
    return f"/proc/{os.getpid()}/fd/{fd}"  # mount(8) runs as a child: name our fd by pid


def depth(path: str) -> int:
    return path.rstrip("/").count("/")


def shadowed(path: str, applied: list[tuple[str, str]]) -> bool:
    """Whether the deepest mount made so far at or above ``path`` is a volume of the pod
    (which hides the host folder there), not one of the folders kept visible."""
    above = [(t, kind) for t, kind in applied if path == t or path.startswith(t.rstrip("/") + "/")]
    return bool(above) and max(above, key=lambda a: depth(a[0]))[1] != "keep"


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # Opened before any mount: the runner's files may be hidden by the container's mounts.
    fail = open(spec["startFailFile"], "a")  # noqa: SIM115 (kept open until exec)
    try:
        home = os.open(spec["home"], os.O_PATH | os.O_DIRECTORY)
        sources = {id(m): pinned(m["source"]) for m in spec["mounts"] if m["kind"] != "tmpfs"}
        term = spec.get("termination")
        term_source = pinned(term["source"]) if term else None
        if spec.get("hostname"):
            socket.sethostname(spec["hostname"])
        # Shallow before deep, so a deeper mount lands inside a shallower one; at equal depth a
        # kept folder comes last (the command must run).
        order = sorted(spec["mounts"], key=lambda m: (depth(m["target"]), m["kind"] == "keep"))
        applied: list[tuple[str, str]] = []
        for m in order:
            target = m["target"]
            if m["kind"] == "keep":
                if shadowed(target, applied):
                    ensure_target(target, True)
                    mount("--bind", sources[id(m)], target)
                    applied.append((target, "keep"))
                continue
            applied.append((target, m["kind"]))
            if m["kind"] == "tmpfs":
                ensure_target(target, True)
                mount("-t", "tmpfs", "-o", m.get("options") or "mode=1777", "tmpfs", target)
            else:
                ensure_target(target, os.path.isdir(sources[id(m)]))
                mount("--bind", sources[id(m)], target)
            if m.get("readOnly"):
                mount("-o", "remount,bind,ro", target)
        if term:
            ensure_target(term["target"], False)
            mount("--bind", term_source, term["target"])
        workdir = spec.get("workingDir")
        if workdir:
            os.makedirs(workdir, exist_ok=True)
            os.chdir(workdir)
        else:
            os.fchdir(home)
    except OSError as e:
        fail.write(f"failed to set up the container: {e}")
        fail.close()
        sys.exit(128)
    argv = spec["argv"]
    env = spec["env"]
    try:
        os.set_inheritable(fail.fileno(), False)
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        path = env.get("PATH", "")
        fail.write(
            f'exec: "{argv[0]}": {e.strerror} (the runner runs commands of this '
            f"machine; PATH={path})"
        )
        fail.close()
        sys.exit(128)


if __name__ == "__main__":
    main()
