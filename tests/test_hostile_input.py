"""Nothing a user types, loads or runs side by side crashes a session or loses a conversation (issue 20),
tried as a user would: the programs run as child processes or in a pseudo-terminal, on real files, with
real concurrent processes. Each case checks the one line that names the file or argument, the exit code,
that there is no traceback, that nothing partial is left on disk, and that the conversation (and its model
state) or the cache entry is intact.

The Python API's argument checks are in test_load_errors.py; StreamDecoder's rule is checked here on the
tokenizer itself and in a running chat."""
import json
import os
import re
import shutil
import subprocess
import sys

import pexpect
import pytest

import chat
import phi4flash
from conftest import ROOT, TINY, copy_snapshot
from test_chat import spawn, suffix_tokens, turn_stats
from test_failures import one_error_line, partials, run, start_slow, tree
from test_hf_cache import REPO, fake_hub


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("phi4flash-cache")


def chat_bytes(*args, stdin=None, cache, env=None):
    """chat.py with arguments and stdin given as bytes (a command line and a pipe carry bytes, not text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), *args], input=stdin, capture_output=True,
                          cwd=ROOT, env={**os.environ, "PHI4FLASH_CACHE": str(cache), **(env or {})}, timeout=120)


def one_line(r, *words, code=2):
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == code and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def stats(child):
    """/stats -> (turns, tokens the model state holds)."""
    child.sendline("/stats")
    child.expect(r"(\d+) turns? this conversation; the model state holds (\d+) of")
    turns, held = map(int, child.match.groups())
    child.expect(">>> ")
    return turns, held


def bye(child):
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# ----------------------------------------------------------------------------------------------
# 3. Two processes converting the same snapshot at once

def test_processes_converting_the_same_snapshot_take_turns_and_share_one_entry(tmp_path):
    """A chat converts a new snapshot (slowly, so the others surely start while it writes); two more chats
    on the same snapshot start meanwhile. They wait for it, say so, and use its entry: all three answer the
    same, and the cache holds one complete entry and nothing partial."""
    src, cache = copy_snapshot(tmp_path / "snapshot"), tmp_path / "cache"
    args = (src, "--prompt", "hi", "--temp", "0", "-n", "4")
    env = {**os.environ, "PHI4FLASH_CACHE": str(cache)}
    first = start_slow("chat.py", *args, env={"PHI4FLASH_CACHE": str(cache)})
    others = [subprocess.Popen([sys.executable, os.path.join(ROOT, "chat.py"), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for _ in range(2)]
    out = [p.communicate(timeout=120) for p in [first] + others]
    assert [p.returncode for p in [first] + others] == [0, 0, 0], [e for _, e in out]
    assert all("Traceback" not in e for _, e in out)
    (entry,) = os.listdir(cache)
    assert f"note: converting {src} once into {cache / entry} " in out[0][1]
    for _, err in out[1:]:
        assert f"note: another process is converting into {cache}; waiting for it to finish" in err, err
        assert f"note: using {cache / entry}, which the other process converted" in err, err
        assert "note: converting" not in err
    assert out[0][0] == out[1][0] == out[2][0] and out[0][0].strip()
    assert phi4flash.load(cache / entry).config.num_hidden_layers == 8 and partials(cache) == []


def test_two_converts_into_one_dst_at_once(tmp_path):
    """convert.py SRC DST twice at once, no --force: the one that finishes first writes DST; the other says
    DST appeared meanwhile, in one line (not 'Directory not empty'), and leaves nothing behind."""
    dst = tmp_path / "out"
    slow = start_slow("convert.py", TINY, dst)
    fast = run("convert.py", TINY, dst)
    assert fast.returncode == 0, fast.stderr
    _, err = slow.communicate(timeout=120)
    slow_result = subprocess.CompletedProcess(slow.args, slow.returncode, "", err)
    one_error_line(slow_result, f"DST {dst}: already exists: another process wrote it while this one converted")
    assert phi4flash.load(dst).config.num_hidden_layers == 8 and partials(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# 4. Streaming bytes that never form a character

def byte_token(model, byte):
    """The id of the token that stands for one byte."""
    return next(i for i in range(model.config.vocab_size) if model.tokenizer.id_to_token(i) is not None
                and chat.StreamDecoder(model.tokenizer).token_bytes(i) == bytes([byte]))


def test_bytes_that_cannot_form_a_character_show_at_once(model):
    """The stream decoder used to hold every token while the text ended in U+FFFD: a run of invalid bytes froze
    the screen for the whole run. Now only the start of a character its next bytes can still complete is held
    (at most 3 tokens), and the pieces still join to exactly tokenizer.decode."""
    import numpy as np
    tok = model.tokenizer
    ff, lead, cont = byte_token(model, 0xFF), byte_token(model, 0xE2), byte_token(model, 0x82)
    dec = chat.StreamDecoder(tok)
    assert [dec.push(t) for t in [ff] * 5] == ["\ufffd"] * 5       # never part of a character: shown at once
    assert [dec.push(t) for t in [lead, cont]] == ["", ""]          # the start of '€' (E2 82 AC): held...
    assert dec.push(ff) == "\ufffd\ufffd"                           # ...until a byte that cannot continue it
    assert dec.push(byte_token(model, 0x41)) == "A" and dec.flush() == ""
    rng = np.random.default_rng(0)
    for _ in range(200):  # random bytes: nothing is held longer than 3 tokens, and the text is decode()'s
        ids = rng.choice([ff, lead, cont, byte_token(model, 0xAC), byte_token(model, 0xF0), byte_token(model, 0x9F),
                          byte_token(model, 0x41)], 60).tolist()
        dec, pieces, held = chat.StreamDecoder(tok), [], 0
        for t in ids:
            pieces.append(dec.push(t))
            held = 0 if pieces[-1] else held + 1
            assert held <= 3
        assert "".join(pieces + [dec.flush()]) == tok.decode(ids, skip_special_tokens=False)


SLOW_STEPS = """
import os, sys, time
sys.path.insert(0, {root!r})
import phi4flash
step = phi4flash.Model.step
def slow(self, cache, token):
    time.sleep(0.01)
    slow.calls += 1
    with open({counter!r} + ".new", "w") as f:
        f.write(str(slow.calls))
    os.replace({counter!r} + ".new", {counter!r})  # never read half-written
    return step(self, cache, token)
slow.calls = 0
phi4flash.Model.step = slow
{more}
sys.argv = ["chat.py", *{args!r}]
import runpy
runpy.run_path({chat!r}, run_name="__main__")
"""


def slow_chat(tmp_path, cache, *args, more="", spawn_it=False):
    """chat.py whose decode steps take 10 ms each and are counted in tmp_path/steps."""
    code = SLOW_STEPS.format(root=ROOT, counter=str(tmp_path / "steps"), more=more, args=list(args),
                             chat=os.path.join(ROOT, "chat.py"))
    env = {**os.environ, "PHI4FLASH_CACHE": str(cache), "TERM": "xterm"}
    if spawn_it:
        child = pexpect.spawn(sys.executable, ["-c", code], cwd=ROOT, env=env, encoding="utf-8", timeout=60,
                              dimensions=(50, 200))
        child.expect(">>> ")
        return child
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=env)


def test_a_reply_of_invalid_bytes_streams_while_it_is_made(cache_dir, model, tmp_path):
    """A model that emits only 0xFF bytes (sampling is replaced): the U+FFFD appear while the reply is made,
    not all at once at its end. The steps counted when the first 20 arrive prove it."""
    ff = byte_token(model, 0xFF)
    p = slow_chat(tmp_path, cache_dir, "--prompt", "hi", "-n", "300",
                  more=f"phi4flash.sample = lambda *args: {ff}")
    shown = b""
    while shown.count("\ufffd".encode()) < 20:
        piece = os.read(p.stdout.fileno(), 4096)
        assert piece, p.communicate()
        shown += piece
    steps_then = int((tmp_path / "steps").read_text())
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert steps_then < 100, steps_then  # shown after ~20 of the 299 steps, not after all of them
    assert (shown + out).decode() == "\ufffd" * 300 + "\n"


# ----------------------------------------------------------------------------------------------
# 8. Snapshots with dangling symlinks

@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "tokenizer.json",
                                  "model.safetensors", "config.json"])
def test_a_file_whose_blob_was_deleted_is_named(tmp_path, name):
    """A Hugging Face cache whose blob was deleted leaves a dangling link in the snapshot: chat and convert name
    it, with the command that downloads it again, instead of taking it for an absent optional file (the chat
    template vanished with tokenizer_config.json)."""
    hub, cache = tmp_path / "hub", tmp_path / "cache"
    snapshot = fake_hub(hub)
    os.remove(os.path.realpath(os.path.join(snapshot, name)))
    env = {"HF_HUB_CACHE": str(hub), "PHI4FLASH_CACHE": str(cache)}
    words = [f"{os.path.join(snapshot, name)}: a broken link: its target ", " is missing",
             f"download it again with: hf download {REPO}"]
    one_error_line(run("chat.py", REPO, "--prompt", "hi", env=env), *words)
    one_error_line(run("convert.py", REPO, tmp_path / "out", env=env), *words)
    one_error_line(run("phi4flash.py", "trace", REPO, "--ids", "1,2", env=env), *words)
    assert sorted(os.listdir(tmp_path)) == ["hub"]  # no cache entry, no output, nothing partial


def test_a_converted_folder_with_a_dangling_side_file_is_named(converted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(converted, folder)
    os.remove(folder / "tokenizer_config.json")
    os.symlink(tmp_path / "gone.json", folder / "tokenizer_config.json")
    with pytest.raises(phi4flash.Phi4FlashError, match=re.escape(f"{folder / 'tokenizer_config.json'}: a broken link: "
                                                                 f"its target {tmp_path / 'gone.json'} is missing")):
        phi4flash.load(folder)
    one_error_line(run("chat.py", folder, "--prompt", "hi", env={"PHI4FLASH_CACHE": str(tmp_path / "cache")}),
                   "tokenizer_config.json: a broken link")
