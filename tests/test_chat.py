"""chat.py: streaming text, the think/answer split, the model state kept across turns, commands,
and the real program driven in a pseudo-terminal on the bundled tiny model."""
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pexpect
import pytest
from rich.console import Console

import chat
from conftest import ROOT

TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# Streaming text

def test_stream_decoder_never_splits_a_character(model):
    """Byte-level tokens can end mid-character: the pieces must still join to tokenizer.decode()."""
    tok = model.tokenizer
    for text in ["héllo wörld – 数学 ∑ 🙂", "plain ascii"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        dec = chat.StreamDecoder(tok)
        pieces = [dec.push(t) for t in ids] + [dec.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
        assert all("\ufffd" not in p for p in pieces)
    rng = np.random.default_rng(0)
    for _ in range(20):  # random ids (invalid UTF-8 included) still join to exactly decode()
        ids = rng.integers(0, 500, 30).tolist()
        dec = chat.StreamDecoder(tok)
        assert "".join([dec.push(t) for t in ids] + [dec.flush()]) == tok.decode(ids, skip_special_tokens=False)


def test_stream_decoder_holds_a_character_until_its_last_byte(model):
    tok = model.tokenizer
    ids = tok.encode("🙂!", add_special_tokens=False).ids
    assert len(ids) == 5  # the fixture's 500-token vocab spells the emoji as 4 byte tokens
    dec = chat.StreamDecoder(tok)
    assert [dec.push(t) for t in ids] == ["", "", "", "🙂", "!"]
    dec = chat.StreamDecoder(tok)  # a special token right after an incomplete character flushes it first
    assert dec.push(ids[0]) == "" and dec.push(tok.token_to_id("<|end|>")) == "\ufffd<|end|>"
    dec = chat.StreamDecoder(tok)  # a reply that ends inside a character: flush() shows what decode() shows
    assert [dec.push(t) for t in ids[:2]] == ["", ""] and dec.flush() == tok.decode(ids[:2]) == "\ufffd"
    assert dec.flush() == ""


# ----------------------------------------------------------------------------------------------
# Thinking and answer

def split_all(text, cuts, thinking=False):
    """Feed `text` cut at `cuts`; -> (think text, answer text, number of parts seen in order)."""
    sp, parts = chat.ThinkSplitter(thinking), []
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        parts += sp.push(text[a:b])
    parts += sp.flush()
    think = "".join(t for p, t in parts if p == "think")
    answer = "".join(t for p, t in parts if p == "answer")
    return think, answer, parts


def test_think_splitter_finds_tags_split_anywhere():
    text = "<think>\nOkay, 7*6 < 50 and </thi is not a tag.\n</think>\n\nThe answer is \\boxed{42}."
    for i in range(len(text) + 1):
        for j in (i, min(i + 1, len(text)), min(i + 5, len(text))):
            think, answer, parts = split_all(text, sorted({i, j}))
            assert think == "\nOkay, 7*6 < 50 and </thi is not a tag.\n"
            assert answer == "\n\nThe answer is \\boxed{42}."
            order = [p for p, _ in parts]
            assert order == sorted(order, key=["think", "answer"].index)  # all thinking before any answer
    think, answer, _ = split_all(text, list(range(1, len(text))))  # one character at a time
    assert answer.endswith("{42}.") and think.startswith("\nOkay")


def test_think_splitter_edge_cases():
    assert split_all("no tags at all <b>", [3, 16])[:2] == ("", "no tags at all <b>")
    assert split_all("ends with <thin", [11])[:2] == ("", "ends with <thin")          # never completed: text
    assert split_all("<think>still thinking", [4])[:2] == ("still thinking", "")         # cut off mid-thought
    assert split_all("reasoning</think>answer", [12], thinking=True)[:2] == ("reasoning", "answer")  # prompt opened it
    assert split_all("a<think>b</think>c<think>d</think>e", [9, 20])[:2] == ("bd", "ace")


def test_reply_view_shows_or_hides_the_thinking():
    text = "<think>\nlet me see</think>\n\n42"

    def show(raw, think, terminal=False):
        out = io.StringIO()
        view = chat.ReplyView(Console(file=out, force_terminal=terminal, soft_wrap=True), think, raw=raw)
        view.begin(thinking=False)
        for ch in text:
            view.write(ch)
        view.end()
        return out.getvalue()

    assert show(raw=True, think=True) == text + "\n"        # a pipe gets the exact reply
    assert show(raw=True, think=False) == "\n\n42\n"          # ... or only the answer
    shown = show(raw=False, think=True, terminal=True)
    assert "\x1b[2m" in shown  # dim
    assert re.sub(r"\x1b\[[0-9;]*m", "", shown) == "thinking\nlet me see\n\n42\n"
    hidden = re.sub(r"\x1b\[[0-9;]*m", "", show(raw=False, think=False, terminal=True))
    assert hidden == "thinking (hidden: /set think on shows it)\n\n42\n"
    text = "a\x1b[2Jb\r\n\tc"  # the model's own control characters are shown, never sent to the terminal
    assert re.sub(r"\x1b\[[0-9;]*m", "", show(raw=False, think=True, terminal=True)) == "a\u241b[2Jb\n        c\n"  # rich expands the tab


# ----------------------------------------------------------------------------------------------
# Settings and commands

def test_settings_parse_and_refuse():
    assert chat.parse_setting("temp", "0") == 0.0 and chat.parse_setting("top_p", "1") == 1.0
    assert chat.parse_setting("seed", "none") is None and chat.parse_setting("think", "OFF") is False
    for name, bad in [("temp", "-1"), ("temp", "nan"), ("top_p", "0"), ("top_p", "1.5"), ("top_k", "-2"),
                      ("top_k", "2.5"), ("max_tokens", "0"), ("seed", "x"), ("think", "maybe")]:
        with pytest.raises(ValueError, match=f"^{name}: expected .*got '{re.escape(bad)}'"):
            chat.parse_setting(name, bad)


class Press:
    """Stands in for CtrlC: `pressed` turns True from the n-th time the loop looks at it."""

    def __init__(self, n=None):
        self.n, self.looks = n, 0

    @property
    def pressed(self):
        self.looks += 1
        return self.n is not None and self.looks >= self.n


def new_session(model, **settings):
    return chat.Session(model, chat.Settings(**{"temp": 0.0, "max_tokens": 60, **settings}))


def turn(s, text, press=None):
    out = io.StringIO()
    st = chat.chat_turn(s, text, chat.ReplyView(Console(file=out), raw=True), press or Press())
    return st, out.getvalue()


def run(s, line):
    out = io.StringIO()
    quit_ = chat.command(s, line, Console(file=out, width=200))
    return quit_, out.getvalue()


def test_commands(model, tmp_path):
    s = new_session(model)
    assert run(s, "/set temp 0.3") == (False, "temp = 0.3\n") and s.settings.temp == 0.3
    assert "expected a number in (0, 1]" in run(s, "/set top_p 2")[1] and s.settings.top_p == 0.95
    assert "unknown setting 'tmp'" in run(s, "/set tmp 1")[1]
    assert "temp 0.3 · top_p 0.95 · top_k 0 · max_tokens 60 · seed none · think on" in run(s, "/set")[1]
    run(s, "/set think off")
    assert s.settings.think is False
    assert run(s, "/frobnicate")[1] == ('unknown command /frobnicate; /help lists the commands (a message that starts '
                                        'with / goes between """)\n')
    help_text = run(s, "/help")[1]
    for name in ("/help", "/clear", "/system", "/set", "/stats", "/save", "/load", "/exit", "/bye", '"""'):
        assert name in help_text
    assert run(s, "/exit")[0] and run(s, "/bye")[0]
    assert "no turn yet" in run(s, "/stats")[1]
    assert "/load: " in run(s, f"/load {tmp_path / 'missing.json'}")[1]
    (tmp_path / "bad.json").write_text(json.dumps({"messages": [{"role": "user"}]}))
    assert "message 0 is not" in run(s, f"/load {tmp_path / 'bad.json'}")[1] and s.messages == []


# ----------------------------------------------------------------------------------------------
# The model state across turns

def greedy(model, ids, n):
    return list(model.generate(ids, n, temperature=0.0))


def check_state(model, s, ids):
    """The session's cache must be exactly the state after reading `ids`: same next-token logits as
    one full forward over them."""
    assert s.cache.length == len(ids)
    logits, _ = model.prefill([5], s.cache)
    full = model.forward(list(ids) + [5])[-1]
    assert np.abs(logits - full).max() <= TOL


def test_second_turn_reads_only_its_own_tokens(model):
    """At temp 0 "What is 7 * 6?" ends with <|end|>: the end token is read right after the reply, so
    the second turn prefills exactly <|user|>…<|end|><|assistant|>, and replies as a full recompute would."""
    s = new_session(model, max_tokens=200)
    first = model.encode(chat.render_prompt(model, [{"role": "user", "content": "What is 7 * 6?"}]))
    reply1 = greedy(model, first, 200)
    assert reply1[-1] == model.tokenizer.token_to_id("<|end|>")
    st1, shown1 = turn(s, "What is 7 * 6?")
    assert (st1.prompt_tokens, st1.reused, st1.generated, st1.stop) == (len(first), 0, len(reply1), "end")
    assert shown1 == model.decode(reply1[:-1]) + "\n" and s.messages[-1]["content"] == model.decode(reply1[:-1])
    history = first + reply1  # the <|end|> included
    check_state(model, s, history)

    s = new_session(model, max_tokens=200)  # check_state read one more token: a fresh session for turn 2
    turn(s, "What is 7 * 6?")
    new = model.encode("<|user|>Why?<|end|><|assistant|>")
    st2, shown2 = turn(s, "Why?")
    assert (st2.prompt_tokens, st2.reused, st2.rebuilt) == (len(new), len(history), False)
    reply2 = greedy(model, history + new, 200)
    assert shown2 == model.decode([t for t in reply2 if t not in model.stop_ids]) + "\n"
    assert "+{} reused".format(len(history)) in chat.stats_line(st2)


def test_a_reply_ending_in_endoftext_still_reuses_the_state(model):
    """At temp 0 "hello" ends with <|endoftext|>, which is not the template's end of turn: it is not read, and
    the next turn's own text starts with the template's <|end|> instead. No rebuild either way."""
    s = new_session(model)
    first = model.encode(chat.render_prompt(model, [{"role": "user", "content": "hello"}]))
    reply1 = greedy(model, first, 60)
    assert reply1[-1] == model.tokenizer.token_to_id("<|endoftext|>")
    turn(s, "hello")
    history = first + reply1[:-1]
    assert s.cache.length == len(history)
    new = model.encode("<|end|><|user|>more<|end|><|assistant|>")
    st2, shown2 = turn(s, "more")
    assert (st2.prompt_tokens, st2.reused, st2.rebuilt) == (len(new), len(history), False)
    reply2 = greedy(model, history + new, 60)
    assert shown2 == model.decode([t for t in reply2 if t not in model.stop_ids]) + "\n"


def test_ctrl_c_keeps_the_partial_reply_and_a_matching_state(model):
    s = new_session(model, max_tokens=300)
    first = model.encode(chat.render_prompt(model, [{"role": "user", "content": "hi"}]))
    st, shown = turn(s, "hi", Press(11))  # looked at once after the prefill, then once per token
    assert st.stop == "interrupted" and st.generated == 9
    reply = greedy(model, first, 9)
    assert shown == model.decode(reply) + "\n" and s.messages[-1] == {"role": "assistant", "content": model.decode(reply)}
    assert "interrupted (the partial reply is kept)" in chat.stats_line(st)
    check_state(model, s, first + reply)


def test_ctrl_c_in_a_long_prefill_drops_the_message_and_the_state(model):
    s = new_session(model)
    turn(s, "hello")
    st, _ = turn(s, "x " * 1200, Press(2))  # ~1200 tokens: 3 chunks; stopped before the second
    assert st.stop == "interrupted in prefill" and s.cache is None and len(s.messages) == 2
    st, _ = turn(s, "more")
    assert st.reused == 0 and not st.rebuilt and st.prompt_tokens == len(model.encode(
        chat.render_prompt(model, s.messages[:2] + [{"role": "user", "content": "more"}])))


def test_changing_the_system_text_rebuilds_the_state_once(model):
    s = new_session(model, max_tokens=20)
    turn(s, "hello")
    s.system = "Be brief."
    st, _ = turn(s, "more")
    full = model.encode(chat.render_prompt(model, s.conversation()[:-1]))
    assert st.rebuilt and st.reused == 0 and st.prompt_tokens == len(full)
    assert "whole conversation re-read" in chat.stats_line(st)
    st, _ = turn(s, "and?")
    assert not st.rebuilt and st.reused > len(full)


def test_context_limit_gives_a_clear_message(model):
    small = dataclasses.replace(model, config=dataclasses.replace(model.config, context_length=120))
    s = new_session(small, max_tokens=1000)
    with pytest.raises(chat.ContextFull, match="context full: this turn is .* shorten the message"):
        turn(s, "word " * 200)
    assert s.messages == [] and s.cache is None
    st, _ = turn(s, "hi")  # greedy "hi" runs on: the context ends the reply
    assert st.stop == "context" and s.cache.length == 120 and "context is full, /clear" in chat.stats_line(st)
    with pytest.raises(chat.ContextFull, match=r"only 0 of the 120-token context are left; /clear starts a new"):
        turn(s, "more")
    assert len(s.messages) == 2
    run(s, "/clear")
    assert s.messages == [] and s.cache is None and turn(s, "more")[0].reused == 0


def test_save_and_load_read_the_conversation_once(model, tmp_path):
    s = new_session(model, max_tokens=20)
    turn(s, "hello")
    turn(s, "more")
    path = tmp_path / "conv.json"
    assert "saved 4 messages" in run(s, f"/save {path}")[1]
    saved = json.loads(path.read_text())
    assert saved == {"system": "", "messages": s.messages}
    t = new_session(model, max_tokens=20)
    assert "loaded 4 messages" in run(t, f"/load {path}")[1]
    assert t.messages == s.messages and t.turns == 2
    st, _ = turn(t, "and?")
    full = model.encode(chat.render_prompt(model, t.conversation()[:-1]))
    assert st.reused == 0 and not st.rebuilt and st.prompt_tokens == len(full)
    assert turn(t, "so?")[0].reused > len(full)


# ----------------------------------------------------------------------------------------------
# The program: one-shot and piped

def chat_run(*args, stdin=None, cache=None, text=True):
    """chat.py ARGS with the conversion cache `cache`; text=False: stdin and the outputs as bytes (a pipe
    carries bytes, not text; an argument may be bytes either way)."""
    env = {**os.environ, "PHI4FLASH_CACHE": str(cache)}
    return subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), *args], input=stdin,
                          capture_output=True, text=text, cwd=ROOT, env=env, timeout=120)


def test_one_shot_chat_prints_the_greedy_generation(tmp_path, model):
    """The README's first command: chat.py --prompt on the bundled tiny model (a snapshot, converted
    once into the cache) prints exactly the decoded greedy generate() output."""
    r = chat_run("--prompt", "Simplify 2+2", "--temp", "0", "-n", "20", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random" in r.stderr and "hf download microsoft/Phi-4-mini-flash-reasoning" in r.stderr
    prompt = chat.render_prompt(model, [{"role": "user", "content": "Simplify 2+2"}])
    tokens = list(model.generate(model.encode(prompt), 20, temperature=0.0))
    if tokens[-1] in model.stop_ids:
        tokens = tokens[:-1]
    assert r.stdout == model.decode(tokens) + "\n"
    assert re.search(r"\[51 prompt tokens · prefill \d+ tok/s · first token [\d.]+ m?s · 20 generated", r.stderr)
    assert len(os.listdir(tmp_path)) == 1  # the tiny snapshot was converted into the cache


def test_piped_stdin_and_errors(cache_dir, model):
    r = chat_run("--temp", "0", "-n", "5", stdin="Simplify 2+2\n", cache=cache_dir)
    prompt = chat.render_prompt(model, [{"role": "user", "content": "Simplify 2+2"}])
    assert r.returncode == 0 and r.stdout == model.decode(greedy(model, model.encode(prompt), 5)) + "\n"
    r = chat_run(str(cache_dir / "missing"), "--prompt", "x", cache=cache_dir)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: MODEL")
    long = "word " * 1500
    n = len(model.encode(chat.render_prompt(model, [{"role": "user", "content": long.strip()}])))
    assert n > 4096
    r = chat_run("--prompt", long, cache=cache_dir)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == (f"error: context full: this turn is {n} tokens (plus at least one "
                                                 "for the reply), the context holds 4096; shorten the message")
    r = chat_run("--device", "cuda", "--prompt", "x", cache=cache_dir)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: device 'cuda'")
    r = chat_run("--top-p", "2", "--prompt", "x", cache=cache_dir)
    assert r.returncode == 2 and "argument --top-p: expected a number in (0, 1], got '2'" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# The program in a pseudo-terminal

STATS = r"\[(\d+) prompt tokens(?: \(\+(\d+) reused\))? · .*?(\d+) generated[^\]]*\]"


def spawn(cache, *args):
    env = {**os.environ, "PHI4FLASH_CACHE": str(cache), "TERM": "xterm"}
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "chat.py"), *args], cwd=ROOT, env=env,
                          encoding="utf-8", timeout=60, dimensions=(50, 200))
    child.expect("/help for commands")
    child.expect(">>> ")
    return child


def interrupt_at_prompt(child, answer):
    """Ctrl-C at the prompt, as a person presses it: after the prompt is up, then expect `answer`. A SIGINT
    that lands between readline printing the prompt and its select() is not seen until select() is
    interrupted again (a race in any readline program: it once lost a Ctrl-C sent 0.3 s after the prompt on
    a loaded machine). So when nothing comes in 10 s, press it again: Python folds the two unhandled SIGINTs
    into one KeyboardInterrupt, so this is still one Ctrl-C to chat.py."""
    time.sleep(0.3)
    child.sendintr()
    if child.expect([answer, pexpect.TIMEOUT], timeout=10) == 1:
        child.sendintr()
        child.expect(answer)


def turn_stats(child):
    child.expect(STATS)
    prompt, reused, generated = child.match.groups()
    child.expect(">>> ")
    return int(prompt), int(reused or 0), int(generated), child.match


def suffix_tokens(model, text, after_end=True):
    return len(model.encode(("<|end|>" if after_end else "") + f"<|user|>{text}<|end|><|assistant|>"))


def test_terminal_session_commands_and_ctrl_c(cache_dir, model):
    child = spawn(cache_dir, "--temp", "0", "-n", "4000")
    first = len(model.encode(chat.render_prompt(model, [{"role": "user", "content": "hi"}])))
    child.sendline("hi")  # greedy "hi" runs past 2500 tokens on the tiny model: time to interrupt it
    child.expect("hi\r\n")
    child.expect(r"\S.{40}")  # the reply streams: text is on the screen while it is still being made
    child.sendintr()
    child.expect(r"\[(\d+) prompt tokens · .*?(\d+) generated[^\]]*interrupted \(the partial reply is kept\)\]")
    assert int(child.match.group(1)) == first
    shown = int(child.match.group(2))
    assert 0 < shown < 4000
    child.expect(">>> ")
    child.sendline("Why?")  # the interrupted reply has no end token: this turn's text starts with <|end|>
    assert turn_stats(child)[:2] == (suffix_tokens(model, "Why?"), first + shown)

    child.sendline("/help")
    child.expect(r"/save FILE.*\n.*>>> ")
    child.sendline("/set top_k 5")
    child.expect("top_k = 5")
    child.sendline("/set top_k -5")
    child.expect(r"/set top_k: expected an integer >= 0 \(0 = off\), got '-5'")
    child.sendline("/nope")
    child.expect("unknown command /nope; /help lists the commands")
    child.sendline("/stats")
    child.expect(r"2 turns this conversation; the model state holds (\d+) of 4096 context tokens")
    assert int(child.match.group(1)) > first + shown
    child.expect("top_k 5")
    child.sendline("/clear")
    child.expect("new conversation")
    child.sendline("/stats")
    child.expect("0 turns this conversation; the model state holds 0 of 4096")
    child.expect(">>> ")
    child.sendline("")  # empty input does nothing
    child.expect(">>> ")
    interrupt_at_prompt(child, r"Ctrl-C again, Ctrl-D or /bye quits")
    child.expect(">>> ")
    interrupt_at_prompt(child, pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_terminal_multiline_reuse_save_load_and_context(cache_dir, model, tmp_path):
    system = "Answer " * 4100
    child = spawn(cache_dir, "--temp", "0", "-n", "8", "--system", system)
    child.sendline("hello")
    child.expect(r"context full: the system text is \d+ tokens by itself, the context holds 4096; shorten the system text")
    child.expect(">>> ")
    child.sendline("/system Be brief.")
    child.expect("system text set")
    child.expect(">>> ")
    child.sendline("hello")
    first = len(model.encode(chat.render_prompt(model, [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "hello"}])))
    assert turn_stats(child)[:3] == (first, 0, 8)
    child.send("first line\nsecond line\n")  # a paste: both lines arrive at once and make one message
    assert turn_stats(child)[:2] == (suffix_tokens(model, "first line\nsecond line"), first + 8)
    child.sendline('"""')
    child.expect(r"\.\.\. ")
    child.sendline("alpha")
    child.sendline('beta"""')
    assert turn_stats(child)[0] == suffix_tokens(model, "alpha\nbeta")
    path = tmp_path / "conversation.json"
    child.sendline(f"/save {path}")
    child.expect("saved 6 messages")
    saved = json.loads(path.read_text())
    assert saved["system"] == "Be brief." and [m["content"] for m in saved["messages"][::2]] == [
        "hello", "first line\nsecond line", "alpha\nbeta"]
    child.sendline("/clear")
    child.expect("new conversation")
    child.sendline(f"/load {path}")
    child.expect(r"loaded 6 messages \(\d+ of the 4096 context tokens\); the next turn reads them once")
    child.expect(">>> ")
    child.sendline("again")
    messages = [{"role": "system", "content": "Be brief."}] + saved["messages"] + [{"role": "user", "content": "again"}]
    assert turn_stats(child)[:2] == (len(model.encode(chat.render_prompt(model, messages))), 0)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_stats_line_shows_no_first_token_when_none_came():
    st = chat.TurnStats(prompt_tokens=56, ttft_s=0.283, generated=0, stop="interrupted")
    line = chat.stats_line(st)
    assert "first token" not in line and "0 generated" in line and "prefill 198 tok/s" in line
    assert "first token 283 ms" in chat.stats_line(dataclasses.replace(st, generated=1))


def test_terminal_save_keeps_an_existing_file_and_a_too_long_conversation_is_named(cache_dir, model, tmp_path):
    """/save never overwrites silently (/save! does, through a temporary file); "1 message", not "1 messages";
    a loaded conversation longer than the context is named as what is too long, not the new message."""
    path, other = tmp_path / "conversation.json", tmp_path / "other.json"
    path.write_text("precious")
    long = tmp_path / "long.json"
    long.write_text(json.dumps({"system": "", "messages": [{"role": "user", "content": "word " * 5000}]}))
    child = spawn(cache_dir, "--temp", "0", "-n", "4")
    child.sendline("hi")
    turn_stats(child)
    child.sendline(f"/save {path}")
    child.expect(f"/save: {re.escape(str(path))} already exists \\(kept\\); /save! {re.escape(str(path))} replaces it")
    child.expect(">>> ")
    assert path.read_text() == "precious"
    child.sendline(f"/save {tmp_path / 'no' / 'such' / 'folder.json'}")
    child.expect(r"/save: cannot write .*folder\.json \(No such file or directory\)")
    child.sendline(f"/save! {path}")
    child.expect(f"saved 2 messages to {re.escape(str(path))}")
    child.expect(">>> ")
    assert json.loads(path.read_text())["messages"][0] == {"role": "user", "content": "hi"}
    one = {"system": "", "messages": [{"role": "user", "content": "hello"}]}
    other.write_text(json.dumps(one))
    child.sendline(f"/load {other}")
    child.expect(r"loaded 1 message \(\d+ of the 4096 context tokens\)")
    child.expect(">>> ")
    child.sendline(f"/save {tmp_path / 'one.json'}")
    child.expect("saved 1 message to")
    child.sendline(f"/load {long}")
    n = chat.conversation_tokens(model, json.loads(long.read_text())["messages"])
    child.expect(f"loaded 1 message: {n} tokens, more than the 4096-token context holds, so it cannot be continued; "
                 "/clear starts a new conversation")
    child.expect(">>> ")
    child.sendline("ok")
    child.expect(f"context full: the conversation so far \\(1 message\\) is {n} tokens by itself, the context holds "
                 "4096; it cannot be continued, /clear starts a new conversation")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert sorted(os.listdir(tmp_path)) == ["conversation.json", "long.json", "one.json", "other.json"]  # no partial file


def test_terminal_nan_logits_end_the_turn_not_the_session(cache_dir, converted, tmp_path):
    """Non-finite logits in an interactive turn: the one-line error, and the prompt again (the
    conversation can still be saved); the turn and the model state are dropped."""
    from test_failures import nan_weight
    folder = tmp_path / "nan"
    shutil.copytree(converted, folder)
    nan_weight(folder)
    child = spawn(cache_dir, str(folder), "--temp", "0", "-n", "4")
    child.sendline("hi")
    child.expect(r"error: generate: the logits are not finite \(NaN/inf\); .* first goes non-finite at layers\.3\.mixer_out")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect("0 turns this conversation; the model state holds 0 of 4096")
    child.expect(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
