"""A repo id (microsoft/Phi-4-mini-flash-reasoning) is found in the local Hugging Face cache, with no
network access; when it is not there, one line says which command downloads it.

The cache here is a fake built from the tiny fixture with the layout huggingface_hub writes:
blobs/<sha256> holding the bytes, snapshots/<revision>/<file> symlinks into blobs/, refs/main naming
the revision."""
import hashlib
import os
import subprocess
import sys

import pytest

import convert
import phi4flash
from conftest import ROOT, TINY

REPO = convert.HF_REPO_ID
REVISION = "1dff8163d28ec880ca2411c474ddc0a927792810"
DOWNLOAD = f"huggingface-cli download {REPO}"
SNAPSHOT_FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                  "tokenizer.json", "tokenizer_config.json")
HF_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def fake_hub(hub, revision=REVISION, ref=True):
    """The tiny fixture as `huggingface-cli download` would leave it in the hub cache `hub`."""
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
def env(tmp_path, monkeypatch):
    """No Hugging Face variables from the machine running the tests; our cache in tmp_path."""
    for name in HF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PHI4FLASH_CACHE", str(tmp_path / "phi4flash-cache"))
    return tmp_path


def test_hub_cache_location_follows_huggingface_hub(env, monkeypatch):
    assert convert.hf_hub_cache() == str(env / "home" / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("XDG_CACHE_HOME", str(env / "xdg"))
    assert convert.hf_hub_cache() == str(env / "xdg" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(env / "hf-home"))
    assert convert.hf_hub_cache() == str(env / "hf-home" / "hub")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(env / "legacy"))
    assert convert.hf_hub_cache() == str(env / "legacy")
    monkeypatch.setenv("HF_HUB_CACHE", "~/hub")
    assert convert.hf_hub_cache() == str(env / "home" / "hub")


def test_repo_id_resolves_to_the_snapshot_refs_main_names(env, monkeypatch, converted):
    hub = env / "home" / ".cache" / "huggingface" / "hub"  # the default location: no variable set
    fake_hub(hub, revision="0" * 40, ref=False)            # an older snapshot that refs/main does not name
    os.remove(os.path.join(hub, "models--microsoft--Phi-4-mini-flash-reasoning", "snapshots", "0" * 40, "config.json"))
    snapshot = fake_hub(hub)
    assert convert.find_snapshot(REPO) == snapshot
    out = convert.resolve_model(REPO)
    assert os.path.dirname(out) == str(env / "phi4flash-cache")
    assert os.path.basename(out).startswith("Phi-4-mini-flash-reasoning-")
    with open(os.path.join(out, "model.safetensors"), "rb") as a, open(os.path.join(converted, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()  # the same file as converting the fixture folder directly
    mtime = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert convert.resolve_model(REPO) == out and os.path.getmtime(os.path.join(out, "model.safetensors")) == mtime
    assert phi4flash.load(out).config.num_hidden_layers == 8


def test_hf_home_and_a_single_snapshot_without_ref(env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(env / "hf-home"))
    snapshot = fake_hub(env / "hf-home" / "hub", ref=False)
    assert convert.find_snapshot(REPO) == snapshot
    fake_hub(env / "hf-home" / "hub", revision="f" * 40, ref=False)
    with pytest.raises(phi4flash.Phi4FlashError, match="2 snapshots .* no refs/main .* pass the snapshot folder itself"):
        convert.find_snapshot(REPO)


def test_a_missing_repo_names_the_download_command(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(env / "hub"))
    with pytest.raises(phi4flash.Phi4FlashError) as e:
        convert.resolve_model(REPO)
    message = str(e.value)
    assert "\n" not in message and str(env / "hub") in message and message.endswith(DOWNLOAD)
    repo = fake_hub(env / "hub")
    with open(os.path.join(os.path.dirname(os.path.dirname(repo)), "refs", "main"), "w") as f:
        f.write("feedface" * 5)  # refs/main names a revision whose snapshot folder is gone
    with pytest.raises(phi4flash.Phi4FlashError, match=f"names revision 'feedface.*download it again with: {DOWNLOAD}"):
        convert.resolve_model(REPO)


def test_paths_are_not_mistaken_for_repo_ids(env):
    with pytest.raises(phi4flash.Phi4FlashError, match=r"MODEL \./missing: not a folder"):
        convert.resolve_model("./missing")
    with pytest.raises(phi4flash.Phi4FlashError, match="not a folder, and not in the local Hugging Face cache"):
        convert.resolve_model("missing/folder")  # owner/name form: it could be either, and the line says both


def run(script, *args, env):
    """Run chat.py or convert.py with sockets disabled: a repo id must resolve with no network."""
    no_network = ("import socket, runpy, sys\n"
                  "def refuse(*a, **k): raise OSError('network access attempted')\n"
                  "socket.socket = socket.create_connection = socket.getaddrinfo = refuse\n"
                  f"sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", no_network, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_chat_and_convert_take_the_repo_id_offline(env):
    child = {k: v for k, v in os.environ.items() if k not in HF_VARIABLES}
    child.update(HOME=str(env / "home"), PHI4FLASH_CACHE=str(env / "phi4flash-cache"), HF_HUB_CACHE=str(env / "hub"))
    r = run("chat.py", REPO, "--prompt", "Simplify 2+2", "--temp", "0", "-n", "6", env=child)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and DOWNLOAD in r.stderr, r.stderr
    r = run("convert.py", REPO, env / "out", env=child)
    assert r.returncode == 2 and r.stderr.strip().startswith(f"error: SRC {REPO}:") and r.stderr.strip().endswith(DOWNLOAD)
    assert not os.path.exists(env / "out")
    fake_hub(env / "hub")
    by_id = run("chat.py", REPO, "--prompt", "Simplify 2+2", "--temp", "0", "-n", "6", env=child)
    by_path = run("chat.py", TINY, "--prompt", "Simplify 2+2", "--temp", "0", "-n", "6", env=child)
    assert by_id.returncode == 0 and by_path.returncode == 0, by_id.stderr + by_path.stderr
    assert by_id.stdout == by_path.stdout and by_id.stdout.strip()
    r = run("convert.py", REPO, env / "out", env=child)
    assert r.returncode == 0, r.stderr
    assert phi4flash.load(env / "out").config.num_hidden_layers == 8
