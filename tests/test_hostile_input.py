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
from test_chat import chat_run, spawn, suffix_tokens, turn_stats
from test_failures import one_error_line, partials, run, start_slow, tree
from test_hf_cache import REPO, fake_hub


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
# 1. Input that is not text

def test_invalid_utf8_in_a_one_shot_prompt_is_one_line(cache_dir):
    r = chat_run("--temp", "0", "-n", "2", stdin=b"hi \xff there\n", cache=cache_dir, text=False)
    assert one_error_line(r) == "error: stdin: not valid UTF-8 text (byte 0xff at character 4)" and r.stdout == b""
    r = chat_run("--prompt", b"caf\xe9?", "--temp", "0", "-n", "2", cache=cache_dir, text=False)
    assert one_error_line(r) == "error: --prompt: not valid UTF-8 text (byte 0xe9 at character 4)" and r.stdout == b""
    r = chat_run("--prompt", "hi", "--system", b"be \xc3", cache=cache_dir, text=False)
    assert one_error_line(r) == "error: --system: not valid UTF-8 text (byte 0xc3 at character 4)"
    r = chat_run("--temp", "0", "-n", "2", stdin="café\n".encode(), cache=cache_dir, text=False)  # valid UTF-8 still works
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_invalid_utf8_typed_at_the_prompt_is_refused_and_the_conversation_kept(cache_dir, model):
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "chat.py"), "--temp", "0", "-n", "8"], cwd=ROOT,
                          env={**os.environ, "PHI4FLASH_CACHE": str(cache_dir), "TERM": "xterm"}, encoding="utf-8",
                          codec_errors="replace", timeout=60, dimensions=(50, 200))  # the terminal echoes the bad bytes
    child.expect(">>> ")
    child.sendline("hello")
    turn_stats(child)
    before = stats(child)
    os.write(child.child_fd, b"caf\xff au lait\r")  # typed: a byte that is never UTF-8 (readline passes it on)
    child.expect(r"not sent: this message is not valid UTF-8 text \(byte 0xff at character 4\); the conversation is "
                 r"unchanged")
    child.expect(">>> ")
    os.write(child.child_fd, b"/system be \xff\r")
    child.expect(r"/system: the text is not valid UTF-8 text \(byte 0xff at character 4\); the system text is unchanged")
    child.expect(">>> ")
    assert stats(child) == before == (1, before[1])
    child.sendline("more")  # the model state was kept: this turn reads only its own tokens
    prompt, reused, _, _ = turn_stats(child)
    assert reused == before[1] and prompt in (suffix_tokens(model, "more"), suffix_tokens(model, "more", after_end=False))
    bye(child)


# ----------------------------------------------------------------------------------------------
# 2. /load of any JSON a user can hand it

def vm(pid, field):
    """A field of /proc/PID/status in MB (VmRSS: memory held now; VmHWM: the most it ever held)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(field)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads memory use from /proc")
def test_load_refuses_what_is_not_a_conversation_and_keeps_the_one_in_memory(cache_dir, model, tmp_path):
    bad = {
        "nested.json": ("[" * 5000 + "]" * 5000, "JSON nested far deeper than a conversation is"),
        "types.json": (json.dumps({"system": 3, "messages": []}), 'expected {"system": text, "messages"'),
        "content.json": (json.dumps({"messages": [{"role": "user", "content": 5}]}), "message 0 is not"),
        "role.json": (json.dumps([{"role": "robot", "content": "x"}]), "message 0 is not"),
        "latin1.json": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8 text (byte 0xe9 at offset 46)"),
        "surrogate.json": ('{"messages": [{"role": "user", "content": "\\udcff"}]}',
                           "message 0: its content is not valid UTF-8 text"),
        "syntax.json": ('{"messages": [', "not JSON (Expecting value"),
    }
    for name, (content, _) in bad.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with open(tmp_path / "huge.json", "wb") as f:  # 50 MB long (a hole: no disk used); refused before it is read
        f.truncate(50_000_000)
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")  # opening it would wait for a writer forever
    child = spawn(cache_dir, "--temp", "0", "-n", "8")
    child.sendline("hello")
    turn_stats(child)
    before, hwm = stats(child), vm(child.pid, "VmHWM")
    for name, (_, words) in bad.items():
        child.sendline(f"/load {tmp_path / name}")
        child.expect(f"/load: {re.escape(str(tmp_path / name))}: {re.escape(words)}")
        child.expect(">>> ")
    child.sendline(f"/load {tmp_path / 'huge.json'}")
    child.expect(r"/load: .*huge\.json: 50\.0 MB, larger than a conversation file can be \(at most 1\.0 MB: more text "
                 r"than the context holds\)")
    child.sendline(f"/load {tmp_path / 'folder'}")
    child.expect(r"/load: .*folder: a folder, not a conversation file")
    child.sendline(f"/load {tmp_path / 'fifo'}")
    child.expect(r"/load: .*fifo: not a regular file")
    child.expect(">>> ")
    assert stats(child) == before  # the conversation and its model state are what they were
    assert vm(child.pid, "VmHWM") < hwm + 50  # nothing was parsed or tokenized that was large

    # Just under the limit, and far longer than the context: loaded (so the line says it cannot be continued), and the
    # memory that tokenizing it took is given back.
    rss = vm(child.pid, "VmRSS")
    long = tmp_path / "long.json"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 200_000}]}))
    assert 1_000_000 < long.stat().st_size < 1 << 20
    child.sendline(f"/load {long}")
    child.expect(r"loaded 1 message: (\d+) tokens, more than the 4096-token context holds, so it cannot be continued")
    child.expect(">>> ")
    assert vm(child.pid, "VmRSS") < rss + 64, (rss, vm(child.pid, "VmRSS"), vm(child.pid, "VmHWM"))
    bye(child)


def test_a_conversation_known_to_be_too_long_is_not_tokenized_again(model, tmp_path):
    """Every refused turn after /load of a conversation longer than the context used to tokenize all of it
    again: the count /load made is remembered while the conversation is the same."""
    long = tmp_path / "long.json"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 5000}]}))
    s = chat.Session(model, chat.Settings(temp=0.0, max_tokens=8))
    chat.command(s, f"/load {long}", chat_console())
    calls = []
    model_encode = type(model).encode
    type(model).encode = lambda self, text: calls.append(len(text)) or model_encode(self, text)
    try:
        for _ in range(3):
            with pytest.raises(chat.ContextFull, match="the conversation so far .* it cannot be continued"):
                chat.chat_turn(s, "more", None, None)
    finally:
        type(model).encode = model_encode
    assert calls == [] and len(s.messages) == 1


def chat_console():
    import io

    from rich.console import Console
    return Console(file=io.StringIO(), width=200)


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
    assert steps_then < 100, steps_then  # shown after ~20 of the 299 steps (and chat's warm-up step), not after all
    assert (shown + out).decode() == "\ufffd" * 300 + "\n"


# ----------------------------------------------------------------------------------------------
# 6. Chat input edge cases

def test_pasted_or_quoted_text_starting_with_a_slash_is_a_message(cache_dir, model):
    child = spawn(cache_dir, "--temp", "0", "-n", "4")
    child.send("/usr/bin/python3 crashed\nwhat does that mean?\n")  # a paste: both lines arrive at once
    text = "/usr/bin/python3 crashed\nwhat does that mean?"
    assert turn_stats(child)[0] == len(model.encode(chat.render_prompt(model, [{"role": "user", "content": text}])))
    child.sendline('"""/etc/hosts"""')
    prompt = turn_stats(child)[0]
    assert prompt in (suffix_tokens(model, "/etc/hosts"), suffix_tokens(model, "/etc/hosts", after_end=False))
    assert stats(child)[0] == 2
    child.sendline("/usr/bin")  # typed alone: a command, and the line says how to send it as a message
    child.expect(r'unknown command /usr/bin; /help lists the commands \(a message that starts with / goes between """\)')
    child.expect(">>> ")
    bye(child)


def test_keys_typed_while_a_reply_streams_are_neither_shown_nor_run(cache_dir, tmp_path):
    child = slow_chat(tmp_path, cache_dir, "--temp", "0", "-n", "300", spawn_it=True)
    child.sendline("hi")  # greedy "hi" runs past 300 tokens; at 10 ms a step the reply takes 3 s
    child.expect("hi\r\n")
    child.expect(r"\S{10}")  # the reply is streaming
    child.send("/bye\r")  # typed now: must not show up in the reply, nor quit afterwards
    child.expect(r"\[\d+ prompt tokens .*?300 generated[^\]]*\]")  # the whole reply, after the keys were typed
    assert "/bye" not in child.before
    child.expect(">>> ")
    child.sendline("/stats")  # still running: /bye was thrown away
    child.expect("1 turn this conversation")
    child.expect(">>> ")
    bye(child)


def test_save_and_load_expand_the_home_folder_and_name_a_folder(cache_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "chat.py"), "--temp", "0", "-n", "4"], cwd=ROOT,
                          env={**os.environ, "PHI4FLASH_CACHE": str(cache_dir), "TERM": "xterm", "HOME": str(home)},
                          encoding="utf-8", timeout=60, dimensions=(50, 200))
    child.expect(">>> ")
    child.sendline("hi")
    turn_stats(child)
    child.sendline("/save ~/conversation.json")
    child.expect(f"saved 2 messages to {re.escape(str(home / 'conversation.json'))}")
    assert json.loads((home / "conversation.json").read_text())["messages"][0]["content"] == "hi"
    for name in ("/save", "/save!"):
        child.sendline(f"{name} {home}")
        child.expect(f"{re.escape(name)}: {re.escape(str(home))} is a folder; give a file name, like "
                     f"{re.escape(str(home / 'conversation.json'))}")
    child.sendline("/clear")
    child.expect("new conversation")  # (two lines typed at once would be one pasted message)
    child.sendline("/load ~/conversation.json")
    child.expect(r"loaded 2 messages \(\d+ of the 4096 context tokens\)")
    child.expect(">>> ")
    bye(child)
    assert sorted(os.listdir(home)) == ["conversation.json"]  # nothing else written, nothing partial


def test_a_message_longer_than_the_whole_context_is_not_told_to_clear(cache_dir, model):
    """After a turn, a message that no context could hold: /clear would not help, so the line does not offer it."""
    child = spawn(cache_dir, "--temp", "0", "-n", "4")
    child.sendline("hi")
    turn_stats(child)
    held = stats(child)[1]
    lines = ["word " * 200] * 25  # ~5000 tokens, typed as a quoted block of lines a terminal takes
    child.sendline('"""' + lines[0])
    for line in lines[1:]:
        child.expect(r"\.\.\. ")
        child.sendline(line)
    child.expect(r"\.\.\. ")
    child.sendline('"""')
    n = len(model.encode(chat.render_prompt(model, [{"role": "user", "content": "\n".join(lines).strip()}])))
    child.expect(f"context full: this message is {n} tokens \\(plus at least one for the reply\\), more than the "
                 "whole 4096-token context; shorten the message(\x1b\\[[0-9;]*m)*\r\n")  # rich 13.0 adds a colour code
    child.expect(">>> ")
    assert stats(child) == (1, held)
    bye(child)


# ----------------------------------------------------------------------------------------------
# 7. The trace of a converted folder needs no converter: see test_packaging.py

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


# ----------------------------------------------------------------------------------------------
# 9. Smaller

def test_a_model_and_a_cache_print_as_a_summary(model):
    assert repr(model) == (f"Model(8 layers, hidden 64, vocab 512, context 4096, bf16 weights, cpu, {model.path!r})")
    _, cache = model.prefill([5, 68, 417], model.new_cache(16))
    assert repr(cache) == "Cache(length 3, 3 Mamba states, 3 K/V buffers, shared K/V of 16 slots)"


def test_trace_compare_into_a_file_keeps_the_whole_table(converted, tmp_path):
    env = {"PHI4FLASH_CACHE": str(tmp_path / "cache")}
    assert run("phi4flash.py", "trace", converted, "--ids", "5,68,417", "--save", tmp_path / "d.npz", env=env).returncode == 0
    r = run("phi4flash.py", "trace", converted, "--ids", "5,68,417", "--compare", tmp_path / "d.npz", env=env)
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if "layer" in line and "kind" in line)
    assert all(w in header for w in ("max|x|", "max|diff|", "tensor", "atol 0.0001")) and "…" not in r.stdout


def test_one_shot_interrupted_does_not_say_the_reply_is_kept(cache_dir, tmp_path):
    import signal
    p = slow_chat(tmp_path, cache_dir, "--prompt", "hi", "--temp", "0", "-n", "300")
    assert os.read(p.stdout.fileno(), 100)  # the reply is streaming
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    line = err.decode().strip().splitlines()[-1]
    assert p.returncode == 130 and line.endswith("· interrupted]") and "kept" not in line, err


def test_a_slow_first_pass_is_said_once_and_left_out_of_the_first_turn(cache_dir, tmp_path):
    """The first pass through the model (numba compiling the CPU kernels on a fresh clone) happens before the first
    turn, and a note says so when it is slow; here it is made slow on purpose."""
    slow_first = ("prefill = phi4flash.Model.prefill\n"
                  "def slow_prefill(self, ids, *args, **kwargs):\n"
                  "    if not slow_prefill.done:\n"
                  "        slow_prefill.done = True\n"
                  "        time.sleep(1.5)\n"
                  "    return prefill(self, ids, *args, **kwargs)\n"
                  "slow_prefill.done = False\n"
                  "phi4flash.Model.prefill = slow_prefill\n")
    p = slow_chat(tmp_path, cache_dir, "--prompt", "hi", "--temp", "0", "-n", "2", more=slow_first)
    _, err = p.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert p.returncode == 0, err
    notes = [i for i, line in enumerate(lines) if line.startswith("note: the first pass through the model took ")]
    assert len(notes) == 1 and notes[0] < len(lines) - 1 and lines[-1].startswith("[")  # before the turn's stats line


def test_the_conversion_bar_names_the_repo_and_only_shows_on_a_terminal(tmp_path):
    """A hub snapshot's folder is named by its revision (40 hex digits): the bar names the repo. In a file or a
    pipe the bar was a line cut to 80 columns; there it is left out (the note says what is converted)."""
    hub = tmp_path / "hub"
    fake_hub(hub)
    env = {**os.environ, "HF_HUB_CACHE": str(hub)}
    code = (f"import sys\nsys.path.insert(0, {ROOT!r})\nimport convert\nconvert.PROGRESS_BYTES = 0  # a bar for any size\n"
            "sys.exit(convert.main(sys.argv[1:]))")
    child = pexpect.spawn(sys.executable, ["-c", code, REPO, str(tmp_path / "a")], env=env, encoding="utf-8",
                          timeout=60, dimensions=(50, 200))
    child.expect(r"converting Phi-4-mini-flash-reasoning\s.*━")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    r = subprocess.run([sys.executable, "-c", code, REPO, str(tmp_path / "b")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
