"""A repo id (microsoft/Phi-4-mini-flash-reasoning) is found in the local Hugging Face cache, by
huggingface_hub itself and with no network access; when it is not there, one line says which command
downloads it.

The cache here is a fake built from the tiny fixture with the layout huggingface_hub writes:
blobs/<sha256> holding the bytes, snapshots/<revision>/<file> symlinks into blobs/, refs/main naming
the revision. huggingface_hub reads its cache location from the environment when it is imported, so
every test runs the programs as a user would, in a child process with its own environment."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import convert
import phi4flash
from conftest import ROOT, TINY

REPO = convert.HF_REPO_ID
REVISION = "1dff8163d28ec880ca2411c474ddc0a927792810"
DOWNLOAD = f"hf download {REPO}"
SNAPSHOT_FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                  "tokenizer.json", "tokenizer_config.json")
HF_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE")
NO_NETWORK = 99  # the exit code of a child that tried to open a connection


def fake_hub(hub, revision=REVISION, ref=True):
    """The tiny fixture as `hf download` would leave it in the hub cache `hub`."""
    repo = os.path.join(hub, "models--" + REPO.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", revision)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot)
    for name in SNAPSHOT_FILES:
        data = open(os.path.join(TINY, name), "rb").read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    if ref:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(revision)  # huggingface_hub writes the hash with no newline
    return snapshot


@pytest.fixture
def env(tmp_path):
    """A child environment with no Hugging Face variables from the machine running the tests, HOME and
    our conversion cache in tmp_path."""
    child = {k: v for k, v in os.environ.items() if k not in HF_VARIABLES}
    child.update(HOME=str(tmp_path / "home"), PHI4FLASH_CACHE=str(tmp_path / "phi4flash-cache"))
    return child


def run(script, *args, env):
    """Run chat.py or convert.py under an audit hook that watches the interpreter's socket calls: any
    attempt to reach the network (even one the code would catch) ends the child at once with exit code
    NO_NETWORK."""
    no_network = ("import os, runpy, sys\n"
                  "def hook(event, args):\n"
                  "    if event in ('socket.connect', 'socket.getaddrinfo', 'socket.gethostbyname', 'socket.sendto'):\n"
                  "        print('network access attempted:', event, args, file=sys.stderr, flush=True)\n"
                  f"        os._exit({NO_NETWORK})\n"
                  "sys.addaudithook(hook)\n"
                  "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", no_network, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def one_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def same_file(a, b):
    with open(a, "rb") as x, open(b, "rb") as y:
        return x.read() == y.read()


def test_the_guard_catches_a_connection_even_when_it_is_caught(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=0.01)\n"
                     "except OSError:\n    pass\n")
    r = run(probe, env=dict(os.environ))
    assert r.returncode == NO_NETWORK and "network access attempted" in r.stderr


def test_repo_id_resolves_to_the_snapshot_refs_main_names(env, tmp_path, converted):
    hub = tmp_path / "home" / ".cache" / "huggingface" / "hub"  # the default location: no variable set
    old = fake_hub(hub, revision="0" * 40, ref=False)             # an older snapshot that refs/main does not name
    os.remove(os.path.join(old, "config.json"))                   # (converting it would fail)
    fake_hub(hub)
    r = run("convert.py", REPO, tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    assert same_file(tmp_path / "out" / "model.safetensors", os.path.join(converted, "model.safetensors"))
    r = run("chat.py", REPO, "--prompt", "Simplify 2+2", "--temp", "0", "-n", "6", env=env)
    assert r.returncode == 0, r.stderr
    (entry,) = os.listdir(tmp_path / "phi4flash-cache")  # chat converted it once into the cache, named after the repo
    assert entry.startswith("Phi-4-mini-flash-reasoning-")


def test_hf_home_and_hf_hub_cache_are_honoured(env, tmp_path):
    fake_hub(tmp_path / "hf-home" / "hub")
    r = run("convert.py", REPO, tmp_path / "a", env={**env, "HF_HOME": str(tmp_path / "hf-home")})
    assert r.returncode == 0, r.stderr
    shutil.move(tmp_path / "hf-home" / "hub", tmp_path / "elsewhere")
    r = run("convert.py", REPO, tmp_path / "b", env={**env, "HF_HOME": str(tmp_path / "hf-home"),
                                                     "HF_HUB_CACHE": str(tmp_path / "elsewhere")})
    assert r.returncode == 0, r.stderr


def test_a_missing_repo_names_the_download_command(env, tmp_path):
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "hub")}
    for script in ("convert.py", "chat.py"):
        args = (tmp_path / "out",) if script == "convert.py" else ("--prompt", "hi")
        line = one_line(run(script, REPO, *args, env=env))
        what = "SRC" if script == "convert.py" else "MODEL"
        assert line.startswith(f"error: {what} {REPO}: not a folder, and not in the local Hugging Face cache ")
        assert str(tmp_path / "hub") in line and line.endswith(f"download it with: {DOWNLOAD}")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "phi4flash-cache")
    snapshot = fake_hub(tmp_path / "hub")
    with open(os.path.join(os.path.dirname(os.path.dirname(snapshot)), "refs", "main"), "w") as f:
        f.write("feedface" * 5)  # refs/main names a revision whose snapshot folder is gone
    assert one_line(run("convert.py", REPO, tmp_path / "out", env=env)).endswith(DOWNLOAD)


def test_paths_are_not_mistaken_for_repo_ids(env, tmp_path):
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "hub")}
    line = one_line(run("chat.py", "./missing", "--prompt", "hi", env=env))
    assert line.startswith("error: MODEL ./missing: not a folder")
    line = one_line(run("chat.py", "missing/folder", "--prompt", "hi", env=env))  # could be either: the line says both
    assert "missing/folder: not a folder, and not in the local Hugging Face cache" in line
    line = one_line(run("convert.py", "owner/bad--name", tmp_path / "out", env=env))  # not a valid repo id either
    assert line == "error: SRC owner/bad--name: not a folder, and not a Hugging Face repo id"


def test_chat_and_convert_take_the_repo_id_offline(env, tmp_path):
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "hub")}
    fake_hub(tmp_path / "hub")
    by_id = run("chat.py", REPO, "--prompt", "Simplify 2+2", "--temp", "0", "-n", "6", env=env)
    by_path = run("chat.py", TINY, "--prompt", "Simplify 2+2", "--temp", "0", "-n", "6", env=env)
    assert by_id.returncode == 0 and by_path.returncode == 0, by_id.stderr + by_path.stderr
    assert by_id.stdout == by_path.stdout and by_id.stdout.strip()
    r = run("convert.py", REPO, tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    assert phi4flash.load(tmp_path / "out").config.num_hidden_layers == 8


def test_the_download_command_we_name_is_installed():
    """Every message and the README name `hf download`: the huggingface_hub we install must have it."""
    import sysconfig
    program, verb = convert.download_command(REPO).split()[:2]
    exe = shutil.which(program, path=sysconfig.get_path("scripts")) or shutil.which(program)
    assert exe, f"{program}: not installed next to {sys.executable}"
    r = subprocess.run([exe, verb, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--local-dir" in r.stdout, r.stdout + r.stderr
