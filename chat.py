"""chat.py: talk to Phi-4-mini-flash-reasoning in a terminal.

    python chat.py [MODEL]                         # interactive; /help lists the commands
    python chat.py [MODEL] --prompt "What is 7 * 6?"   # one question, then exit (also: echo ... | python chat.py)

MODEL is a converted folder or a Hugging Face snapshot folder (converted once into a cache folder);
without it, the bundled tiny model with random weights answers (useful only to see the machinery run).

The model state (Mamba conv/SSM states, K/V caches) is kept from one turn to the next, so a turn reads
only its own new tokens; see `chat_turn`.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import math
import os
import select
import signal
import stat
import sys
import time
from dataclasses import dataclass, field, fields

import numpy as np

import phi4flash
from phi4flash import Phi4FlashError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "tests", "fixtures", "tiny-phi4flash")
REAL_MODEL_HINT = ("hf download microsoft/Phi-4-mini-flash-reasoning "
                   "&& python chat.py microsoft/Phi-4-mini-flash-reasoning")


# ----------------------------------------------------------------------------------------------
# Prompt: the checkpoint's own chat template, else the Phi format

def render_prompt(model, messages, add_generation_prompt=True):
    """messages [{"role", "content"}] -> prompt text, rendered with the checkpoint's Jinja chat_template
    (as transformers does) or, when it has none, as <|role|>content<|end|>... <|assistant|>."""
    config = model.files.get("tokenizer_config.json", {})
    template = config.get("chat_template")
    if isinstance(template, list):  # a list of named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return text + "<|assistant|>" if add_generation_prompt else text
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v}
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


# ----------------------------------------------------------------------------------------------
# Streaming text: byte-level tokens can end in the middle of a UTF-8 character

class StreamDecoder:
    """Turns token ids into text as they arrive, so that the pieces concatenate to exactly
    tokenizer.decode(all ids) and the screen never falls behind the model.

    Phi-4's tokenizer is byte-level: each token stands for some bytes of UTF-8 text, and a character
    can be split across tokens. The bytes go through an incremental UTF-8 decoder, which holds back
    only the start of a character that its next bytes can still complete (at most 3 bytes) and shows
    bytes that can never form one at once as U+FFFD, as tokenizer.decode shows them. For a tokenizer of
    another kind, tokenizers' DecodeStream holds text back while it ends in an incomplete character."""

    def __init__(self, tokenizer):
        from tokenizers import decoders
        self.tok, self.ids = tokenizer, []
        if isinstance(tokenizer.decoder, decoders.ByteLevel):
            self.utf8, self.bytes = codecs.getincrementaldecoder("utf-8")("replace"), {}  # bytes: id -> its bytes
        else:
            self.utf8, self.stream, self.shown, self.held = None, decoders.DecodeStream(skip_special_tokens=False), 0, False

    def push(self, token):
        """-> the new text this token completes ('' while a character is still incomplete)."""
        self.ids.append(token)
        if self.utf8:
            return self.utf8.decode(self.token_bytes(token))
        piece = self.stream.step(self.tok, token)
        self.held = piece is None
        self.shown += len(piece or "")
        return piece or ""

    def token_bytes(self, token):
        """The bytes a token stands for: each character of its vocabulary entry is one byte (BYTE_OF);
        an entry with other characters (an added token) stands for its own UTF-8."""
        if token not in self.bytes:
            entry = self.tok.id_to_token(token) or ""
            try:
                self.bytes[token] = bytes(BYTE_OF[c] for c in entry)
            except KeyError:
                self.bytes[token] = entry.encode()
        return self.bytes[token]

    def flush(self):
        """-> what is still held at the end of the reply: bytes that never completed a character, shown
        as U+FFFD exactly as tokenizer.decode shows them."""
        if self.utf8:
            return self.utf8.decode(b"", final=True)
        if not self.held:
            return ""
        self.held = False
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        piece, self.shown = text[self.shown:], len(text)
        return piece


def byte_level_alphabet():
    """The byte-level vocabulary's alphabet: character -> the byte it stands for. The bytes that are
    printable characters stand for themselves; the others (controls, space, 127-160, 173) are moved,
    in order, to the characters from U+0100 on."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


BYTE_OF = byte_level_alphabet()


# ----------------------------------------------------------------------------------------------
# Reasoning: <think>…</think> is ordinary text, several tokens long, so a tag can arrive in pieces

class ThinkSplitter:
    """Streamed reply text -> ("think", text) and ("answer", text) parts, the tags themselves removed.
    A tail that could still grow into the awaited tag is held back until the next piece decides."""
    TAGS = {"answer": "<think>", "think": "</think>"}  # the part we are in -> the tag that ends it

    def __init__(self, thinking=False):
        self.part = "think" if thinking else "answer"
        self.held = ""

    def push(self, text):
        text, out = self.held + text, []
        while (i := text.find(self.TAGS[self.part])) >= 0:
            out.append((self.part, text[:i]))
            text = text[i + len(self.TAGS[self.part]):]
            self.part = "answer" if self.part == "think" else "think"
        tag = self.TAGS[self.part]
        keep = next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)
        self.held = text[len(text) - keep:]
        out.append((self.part, text[:len(text) - keep]))
        return [(part, t) for part, t in out if t]

    def flush(self):
        held, self.held = self.held, ""
        return [(self.part, held)] if held else []


# ----------------------------------------------------------------------------------------------
# Showing a reply. Each piece is printed once, as it comes: a 30K-token reply costs 30K small writes,
# never a re-render of what is already on the screen.

# Control characters in a reply (the tiny model emits any byte) are shown as their Unicode pictures:
# an ESC from the model must not drive the terminal.
CONTROL_PICTURES = {**{c: 0x2400 + c for c in range(32) if c not in (9, 10, 13)}, 13: None, 127: 0x2421}


class ReplyView:
    """On a terminal: the thinking dim under a label, then the answer as plain text. raw (stdout is a
    pipe or a file): the reply's exact text, or only the answer when the thinking is hidden."""

    def __init__(self, console, show_thinking=True, raw=False):
        self.console, self.show_thinking, self.raw = console, show_thinking, raw
        self.splitter, self.last, self.fresh = ThinkSplitter(), None, True

    def begin(self, thinking):  # thinking: the prompt itself opened <think>
        self.splitter, self.last, self.fresh = ThinkSplitter(thinking), None, True

    def write(self, text):
        if self.raw and self.show_thinking:
            self.console.file.write(text)
            self.console.file.flush()
            return
        for part, piece in self.splitter.push(text):
            self._show(part, piece)

    def end(self):
        for part, piece in self.splitter.flush():
            self._show(part, piece)
        self.console.file.write("\n")
        self.console.file.flush()

    def _show(self, part, text):
        if self.raw:  # thinking hidden: the answer only
            if part == "answer":
                self.console.file.write(text)
                self.console.file.flush()
            return
        if part != self.last:  # a label where the thinking starts; the answer begins on a fresh line
            if part == "think":
                note = "thinking" if self.show_thinking else "thinking (hidden: /set think on shows it)"
                self.console.print(("\n" if self.last else "") + note, style="dim italic")
            elif self.last == "think":
                self.console.print("\n" if self.show_thinking else "")
            self.last, self.fresh = part, True
        text = text.translate(CONTROL_PICTURES)
        if self.fresh:  # a part's leading newlines: the label or the blank line already separates it
            text = text.lstrip("\n")
            self.fresh = not text
        if part == "answer":
            self.console.print(text, end="", markup=False, highlight=False)
        elif self.show_thinking:
            self.console.print(text, end="", style="dim", markup=False, highlight=False)

    @contextlib.contextmanager
    def progress(self, total, chunk):
        """-> advance(n): a transient bar while a long prompt is read (a /load, or a big paste) in
        chunks of `chunk` tokens."""
        if self.raw or not self.console.is_terminal or total <= chunk:
            yield lambda n: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        with Progress(TextColumn("reading the prompt"), BarColumn(), MofNCompleteColumn(),
                      console=self.console, transient=True) as bar:
            task = bar.add_task("", total=total)
            yield lambda n: bar.advance(task, n)


# ----------------------------------------------------------------------------------------------
# Settings: the flags, and /set at the prompt

@dataclass
class Settings:
    temp: float = 0.6          # model card: temperature 0.6, top_p 0.95, up to 32768 new tokens
    top_p: float = 0.95
    top_k: int = 0             # 0 = off
    max_tokens: int = 32768    # also capped, each turn, by what is left of the context
    seed: int | None = None
    think: bool = True         # show the <think> part


SETTINGS = {  # name -> (parse the text, check the value, what is expected)
    "temp": (float, lambda v: 0 <= v < math.inf, "a number >= 0 (0 = greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "max_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "seed": (lambda s: None if s.lower() == "none" else int(s), lambda v: v is None or v >= 0, "an integer >= 0, or none"),
    "think": (lambda s: {"on": True, "off": False}[s.lower()], lambda v: True, "on or off"),
}


def parse_setting(name, text):
    """'/set NAME VALUE' (or the matching flag) -> the value; ValueError says what was expected."""
    parse, ok, expected = SETTINGS[name]
    try:
        value = parse(text.strip())
    except (ValueError, KeyError):
        value = ok = None
    if ok is None or not ok(value):
        raise ValueError(f"{name}: expected {expected}, got {text.strip()!r}")
    return value


def flag(name):
    def parse(text):
        try:
            return parse_setting(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1])
    return parse


# ----------------------------------------------------------------------------------------------
# One conversation and its model state

@dataclass
class TurnStats:
    prompt_tokens: int = 0     # tokens prefilled this turn
    reused: int = 0            # tokens already in the model state from earlier turns
    rebuilt: bool = False      # the state was thrown away and the whole conversation read again
    ttft_s: float = 0.0        # time to first token (the prefill, plus one sampling)
    generated: int = 0         # tokens sampled, an end token included
    decode_s: float = 0.0      # from the first token to the last
    stop: str = "end"          # end | max_tokens | context | interrupted | interrupted in prefill


@dataclass
class Session:
    model: object
    settings: Settings
    system: str = ""
    messages: list = field(default_factory=list)  # [{"role": "user"|"assistant", "content"}]; the system text apart
    cache: object = None       # the model state; None = empty (next turn reads the whole conversation)
    seen: str = ""             # the text of the tokens in `cache`: the prompts it read, the replies it wrote
    turns: int = 0
    last: TurnStats = None
    counted: tuple = None      # ((system, number of messages), tokens): history_tokens remembers its last count

    def conversation(self):
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reset(self):
        self.cache, self.seen = None, ""


class ContextFull(Exception):
    pass


class CtrlC:
    """While a reply is made, Ctrl-C only raises a flag that the loop checks between tokens and
    prompt chunks: a KeyboardInterrupt inside extend() could leave some layers' state updated and
    others not."""

    def __enter__(self):
        self.pressed = False
        self.previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum, frame):
        self.pressed = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def chat_turn(s, user_text, view, ctrl_c):
    """Add one user message, stream the reply into `view`; -> TurnStats.

    The cache holds the tokens whose text is `s.seen`. The whole conversation is rendered with the
    template; if it starts with `s.seen`, only the rest is tokenized and read. Text is compared, not
    ids: the reply's sampled ids need not be what tokenizing its text gives back. If it does not
    start with `s.seen` (/system changed the text the template puts first; a template that rewrites
    old replies), the state is rebuilt from the whole conversation, once, and the stats say so.

    Ctrl-C keeps what was shown: the reply so far joins the conversation and the cache holds exactly
    its tokens. Ctrl-C while the prompt is read drops the message and the state (rebuilt next turn)."""
    user = {"role": "user", "content": user_text}
    prompt = render_prompt(s.model, s.conversation() + [user])
    st, new_ids, max_new = plan_turn(s, prompt, user)
    t0 = time.perf_counter()
    last_chunk = read_prompt(s, new_ids, view, ctrl_c)
    if last_chunk is None:
        s.reset()
        st.stop = "interrupted in prefill"
        return st
    content, stop, t_first, t_last = stream_reply(s, prompt, last_chunk, max_new, view, ctrl_c, st)
    keep_reply(s, user, prompt, content, stop, max_new, st)
    st.ttft_s = (t_first or time.perf_counter()) - t0
    st.decode_s = (t_last or 0) - (t_first or 0)
    s.turns += 1
    s.last = st
    return st


def plan_turn(s, prompt, user):
    """What this turn reads, and how long its reply may be -> (TurnStats, new ids, max new tokens).
    Keeps the cache when the rendered conversation starts with its text, else starts a new one;
    raises ContextFull when not even one reply token fits."""
    model, context = s.model, s.model.config.context_length
    reuse = s.cache is not None and prompt.startswith(s.seen)
    if not reuse and s.messages and history_tokens(s) >= context - 1:  # known too long: no need to tokenize it again
        raise ContextFull(context_full_message(s, user, 0, None))
    st = TurnStats(reused=s.cache.length if reuse else 0, rebuilt=s.cache is not None and not reuse)
    new_ids = model.encode(prompt[len(s.seen):] if reuse else prompt)
    st.prompt_tokens = len(new_ids)
    room = context - st.reused - len(new_ids)
    if room < 1:
        raise ContextFull(context_full_message(s, user, st.reused, len(new_ids)))
    max_new = min(s.settings.max_tokens, room)
    if not reuse:
        s.cache, s.seen = model.new_cache(min(context, len(new_ids) + max_new)), ""
    return st, new_ids, max_new


def context_full_message(s, user, reused, new_tokens):
    """Why a turn does not fit, naming what is too long: the conversation so far (a /load, a long
    system text) when it is by itself; the message, when even a new conversation could not hold it
    (so /clear is not offered); else this turn, in what is left of the context."""
    model, context = s.model, s.model.config.context_length
    system = " or the system text" if s.system else ""
    if not reused:
        earlier = history_tokens(s)
        if earlier >= context - 1:
            what = (f"the conversation so far ({plural(len(s.messages), 'message')}"
                    f"{' and the system text' if s.system else ''})" if s.messages else "the system text")
            return (f"context full: {what} is {earlier} tokens by itself, the context holds {context}; "
                    + ("it cannot be continued, /clear starts a new conversation" if s.messages
                       else "shorten the system text (/system TEXT)"))
        if not s.messages:  # the first turn: the message and the system text are all there is
            return (f"context full: this turn is {new_tokens} tokens (plus at least one for the reply), the context "
                    f"holds {context}; shorten the message{system}")
    fresh = len(model.encode(render_prompt(model, s.conversation()[:1 if s.system else 0] + [user])))
    if fresh >= context:  # what the turn would be after /clear: it does not fit either
        return (f"context full: this message is {fresh} tokens{' with the system text' if s.system else ''} (plus at "
                f"least one for the reply), more than the whole {context}-token context; shorten the message{system}")
    if reused:
        where = f"only {context - reused} of the {context}-token context are left; /clear starts a new conversation"
    else:
        where = f"the context holds {context}; shorten the message{system}, or /clear the conversation"
    return f"context full: this turn is {new_tokens} tokens (plus at least one for the reply), {where}"


def history_tokens(s):
    """conversation_tokens of the conversation so far, remembered while it is the same (it only grows by
    appending, and /load says what it loaded): a conversation too long to continue is tokenized once,
    not again at every turn it refuses."""
    key = (s.system, len(s.messages))
    if s.counted is None or s.counted[0] != key:
        s.counted = (key, conversation_tokens(s.model, s.conversation()))
    return s.counted[1]


def read_prompt(s, new_ids, view, ctrl_c):
    """All but the last chunk of the new ids into the cache, in the model's prefill chunks (Ctrl-C
    and the progress bar get a say between them) -> the last chunk, or None after Ctrl-C."""
    n = s.model.prefill_chunk
    chunks = [new_ids[i:i + n] for i in range(0, len(new_ids), n)]
    with view.progress(len(new_ids) - len(chunks[-1]), n) as advance:
        for chunk in chunks[:-1]:  # the last chunk goes to generate(): one call, as for a one-shot prompt
            if ctrl_c.pressed:
                break
            s.model.prefill(chunk, s.cache, logits=False)
            advance(len(chunk))
    return None if ctrl_c.pressed else chunks[-1]


def stream_reply(s, prompt, last_chunk, max_new, view, ctrl_c, st):
    """Generate from the last prompt chunk, showing the text as it comes -> (the reply's ids, the
    stop id or None, the first and the last token's times). Counts tokens and Ctrl-C into `st`."""
    model, opt = s.model, s.settings
    view.begin(thinking=prompt.rstrip().endswith("<think>"))
    decoder, content, stop, t_first, t_last = StreamDecoder(model.tokenizer), [], None, None, None
    tokens = model.generate(last_chunk, max_new, opt.temp, opt.top_p, opt.top_k, opt.seed, cache=s.cache)
    for token in tokens:
        if ctrl_c.pressed:  # this token is not in the cache yet and was never shown: drop it
            st.stop = "interrupted"
            break
        t_last = time.perf_counter()
        t_first = t_first or t_last
        st.generated += 1
        if token in model.stop_ids:
            stop = token
            break
        content.append(token)
        view.write(decoder.push(token))
    tokens.close()
    view.write(decoder.flush())
    view.end()
    return content, stop, t_first, t_last


def keep_reply(s, user, prompt, content, stop, max_new, st):
    """The message and the reply join the conversation, and the cache ends exactly where its text
    (`s.seen`) does."""
    model = s.model
    if st.stop == "end" and stop is None and content:  # ran out of tokens: the last one was shown, not yet read
        model.prefill(content[-1:], s.cache)
        st.stop = "max_tokens" if max_new == s.settings.max_tokens else "context"
    reply = model.decode(content)
    s.messages += [user, {"role": "assistant", "content": reply}]
    s.seen = prompt + reply
    if stop is not None:
        # Read the end token now, if it is the text the template writes after a reply, so that the
        # next turn starts right at its own tokens. If not (<|endoftext|> where the template closes
        # the turn with <|end|>), the next turn's text starts with the template's own end instead.
        end = model.decode([stop])
        if render_prompt(model, s.conversation(), add_generation_prompt=False).startswith(s.seen + end):
            model.prefill([stop], s.cache)
            s.seen += end


def conversation_tokens(model, messages):
    """How many tokens `messages` take, rendered as the template writes them (0 for none)."""
    return len(model.encode(render_prompt(model, messages, add_generation_prompt=False))) if messages else 0


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def stats_line(st, one_shot=False):
    """The line after a reply. one_shot: the process ends with it, so nothing is kept and there is no /command."""
    prompt = f"{st.prompt_tokens} prompt tokens"
    if st.reused:
        prompt += f" (+{st.reused} reused)"
    elif st.rebuilt:
        prompt += " (whole conversation re-read: its text changed before this turn, e.g. /system)"
    if st.stop == "interrupted in prefill":
        return f"[{prompt}: interrupted while reading the prompt; the message was dropped]"
    parts = [prompt, f"prefill {st.prompt_tokens / st.ttft_s:.0f} tok/s" if st.ttft_s > 0 else "",
             "" if not st.generated else  # no first token: interrupted before it
             f"first token {st.ttft_s * 1000:.0f} ms" if st.ttft_s < 1 else f"first token {st.ttft_s:.2f} s",
             f"{st.generated} generated"]
    if st.generated > 1 and st.decode_s > 0:  # the first token comes from the prefill, not a decode step
        parts.append(f"{(st.generated - 1) / st.decode_s:.1f} tok/s")
    note = {"end": "", "interrupted": "interrupted (the partial reply is kept)",
            "max_tokens": "stopped at max_tokens (-n, /set max_tokens)",
            "context": "stopped: the context is full, /clear starts a new conversation"}[st.stop]
    if one_shot:
        note = {"interrupted": "interrupted", "max_tokens": "stopped at max_tokens (-n)",
                "context": "stopped: the context is full"}.get(st.stop, note)
    return "[" + " · ".join(p for p in parts + [note] if p) + "]"


# ----------------------------------------------------------------------------------------------
# Slash commands

HELP = """\
/help                  this list
/clear                 new conversation (the system text stays), model state reset
/system [TEXT]         show or set the system text (the next turn re-reads the conversation)
/set [NAME VALUE]      show the settings, or set temp | top_p | top_k | max_tokens | seed | think (on/off)
/stats                 the last turn's numbers and the context in use
/save FILE             the conversation as JSON (an existing FILE is kept: /save! FILE replaces it)
/load FILE             a saved conversation (the next turn reads it once)
/exit, /bye, Ctrl-D    quit
Ctrl-C stops a reply (kept as far as it got); twice at the prompt quits.
\"\"\" opens and closes a multi-line message; pasted lines are one message."""


def save_conversation(path, system, messages):
    """Write the /save JSON to a temporary file next to `path`, then rename it into place: a failed write
    leaves no half-written file, and the old file (with /save!) is replaced only by a complete one."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"system": system, "messages": messages}, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_limit(model):
    """The largest file /load reads: 16 bytes for each token of the context (text takes about 4 bytes a token),
    and at least 1 MiB. A conversation the context can hold is far smaller, and a bigger file is refused
    before it is read: parsing and tokenizing it would take seconds to minutes and gigabytes of memory."""
    return max(1 << 20, 16 * model.config.context_length)


def load_conversation(path, limit):
    """A /save file (or a plain [{"role", "content"}] list) -> (system text, messages). The file is checked
    completely first (its size, encoding, JSON, nesting and types); what is wrong is one Phi4FlashError
    line, and nothing in the session has changed."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise Phi4FlashError(f"{path}: a folder, not a conversation file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block, or never end
            raise Phi4FlashError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise Phi4FlashError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > limit:
        raise Phi4FlashError(f"{path}: {max(info.st_size, len(raw)) / 1e6:.1f} MB, larger than a conversation file can be "
                             f"(at most {limit / 1e6:.1f} MB: more text than the context holds)")
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise Phi4FlashError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise Phi4FlashError(f"{path}: not JSON ({e})") from None
    except RecursionError:
        raise Phi4FlashError(f"{path}: JSON nested far deeper than a conversation is") from None
    system, messages = (data.get("system"), data.get("messages")) if isinstance(data, dict) else (None, data)
    if not isinstance(messages, list) or not isinstance(system, (str, type(None))):
        raise Phi4FlashError(f"{path}: expected {{\"system\": text, \"messages\": [{{\"role\", \"content\"}}, ...]}}")
    system, out = system or "", []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)):
            raise Phi4FlashError(f"{path}: message {i} is not {{\"role\": system|user|assistant, \"content\": text}}")
        if phi4flash.invalid_utf8(m["content"]):  # JSON can spell a lone surrogate (\\udc80); no tokenizer takes it
            raise Phi4FlashError(f"{path}: message {i}: its content is {phi4flash.invalid_utf8(m['content'])}")
        if m["role"] == "system":
            system = m["content"]
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if phi4flash.invalid_utf8(system):
        raise Phi4FlashError(f"{path}: the system text is {phi4flash.invalid_utf8(system)}")
    return system, out


def command(s, line, console):
    """Run one slash command; -> True to quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    say = lambda text, style="dim": console.print(shown(text), style=style, markup=False, highlight=False)  # noqa: E731
    if name in ("/exit", "/bye"):
        return True
    if name == "/help":
        say(HELP, style="")
    elif name == "/clear":
        s.messages, s.turns, s.last = [], 0, None
        s.reset()
        say("new conversation")
    elif name == "/system":
        if not arg:
            say(f"system text: {s.system!r}" if s.system else "no system text")
        elif phi4flash.invalid_utf8(arg):
            say(f"/system: the text is {phi4flash.invalid_utf8(arg)}; the system text is unchanged", style="red")
        else:
            s.system = arg
            say("system text set; the next turn re-reads the conversation with it")
    elif name == "/set":
        if not arg:
            say(settings_line(s.settings))
            return False
        key, _, value = arg.partition(" ")
        if key not in SETTINGS:
            say(f"/set: unknown setting {key!r}; one of {', '.join(SETTINGS)}", style="red")
            return False
        try:
            setattr(s.settings, key, parse_setting(key, value))
        except ValueError as e:
            say(f"/set {e}", style="red")
            return False
        say(f"{key} = {settings_value(s.settings, key)}")
    elif name == "/stats":
        used = s.cache.length if s.cache is not None else 0
        say(f"{s.turns} turn{'' if s.turns == 1 else 's'} this conversation; the model state holds {used} of {s.model.config.context_length} "
            f"context tokens")
        say(f"last turn: {stats_line(s.last)}" if s.last else "no turn yet")
        say(settings_line(s.settings))
    elif name in ("/save", "/save!", "/load"):
        if not arg:
            say(f"{name} needs a FILE", style="red")
        elif name.startswith("/save"):
            save_command(s, name, os.path.expanduser(arg), say)
        else:
            load_command(s, os.path.expanduser(arg), say)
    else:
        say(f"unknown command {name}; /help lists the commands (a message that starts with / goes between \"\"\")",
            style="red")
    return False


def save_command(s, name, path, say):
    if os.path.isdir(path):
        say(f"{name}: {path} is a folder; give a file name, like {os.path.join(path, 'conversation.json')}", style="red")
    elif name == "/save" and os.path.lexists(path):
        say(f"/save: {path} already exists (kept); /save! {path} replaces it", style="red")
    else:
        try:
            save_conversation(path, s.system, s.messages)
            say(f"saved {plural(len(s.messages), 'message')} to {path}")
        except OSError as e:
            say(f"/save: cannot write {path} ({e.strerror})", style="red")


def load_command(s, path, say):
    """/load: the file is read and checked, and its tokens counted, before the session's conversation is
    replaced; any problem leaves the session as it was."""
    model, context = s.model, s.model.config.context_length
    try:
        system, messages = load_conversation(path, load_limit(model))
        conversation = ([{"role": "system", "content": system}] if system else []) + messages
        try:
            used = conversation_tokens(model, conversation)
        except Exception as e:  # the checkpoint's template may refuse it (roles out of order, say)
            raise Phi4FlashError(f"{path}: the chat template cannot render it ({type(e).__name__}: "
                                 f"{(str(e).strip().splitlines() or [''])[0]})") from None
    except Phi4FlashError as e:
        say(f"/load: {e}", style="red")
        return
    finally:
        give_back_memory()  # what parsing and tokenizing a big file took
    s.system, s.messages, s.counted = system, messages, ((system, len(messages)), used)
    s.turns, s.last = sum(m["role"] == "user" for m in messages), None
    s.reset()
    if used >= context - 1:
        say(f"loaded {plural(len(messages), 'message')}: {used} tokens, more than the {context}-token context "
            "holds, so it cannot be continued; /clear starts a new conversation", style="red")
    else:
        say(f"loaded {plural(len(messages), 'message')} ({used} of the {context} context tokens); "
            "the next turn reads them once")


def give_back_memory():
    """Return the memory the allocator keeps after a big job to the system. glibc keeps what the
    tokenizer's threads freed in their own arenas (a 1 MB text takes ~250 MB to tokenize on the tiny
    model's vocabulary); malloc_trim gives it back. Elsewhere there is no malloc_trim, and nothing to do."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)


def settings_value(settings, name):
    v = getattr(settings, name)
    return "on" if v is True else "off" if v is False else "none" if v is None else v


def settings_line(settings):
    return " · ".join(f"{f.name} {settings_value(settings, f.name)}" for f in fields(Settings))


# ----------------------------------------------------------------------------------------------
# The terminal: reading messages, the loop

PROMPT = ">>> "


def read_message():
    """One message: a line; lines pasted together (they arrive at once); or a \"\"\" block. -> (text,
    whether it can be a command): only a single typed line can; pasted or quoted text starting with /
    (a path, say) is a message."""
    line = input(PROMPT)
    if line.lstrip().startswith('"""'):
        body = line.lstrip()[3:]
        while not body.rstrip().endswith('"""'):
            body += "\n" + input("... ")
        return body.rstrip()[:-3], False
    lines = [line]
    while line_waiting():  # a paste: the next lines are already there
        lines.append(input(""))
    return "\n".join(lines), len(lines) == 1


def line_waiting():
    try:
        return bool(select.select([sys.stdin], [], [], 0.05)[0])
    except (OSError, ValueError):  # stdin that select() cannot watch: no paste detection
        return False


@contextlib.contextmanager
def keys_held_off():
    """While a reply is made, keys typed on the terminal are not echoed into it, and what was typed is
    thrown away when it ends, so that it cannot run as a message or a command afterwards. Ctrl-C still
    works: it is a signal, not input. Does nothing when stdin is not a terminal."""
    try:
        import termios
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, termios.error):  # not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO                                       # the local modes: no echo
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)                       # what was typed meanwhile: gone
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def interactive(s, console, name):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console.print(f"phi4flash · {shown(name)} · context {s.model.config.context_length} tokens · "
                  f"/help for commands, Ctrl-D to quit", style="bold", markup=False, highlight=False)
    say = lambda text, style="red": console.print(text, style=style, markup=False, highlight=False)  # noqa: E731
    ctrl_c_at_prompt = False
    while True:
        try:
            text, can_be_command = read_message()
            text = text.strip()
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            if ctrl_c_at_prompt:
                console.print()
                return 0
            ctrl_c_at_prompt = True
            console.print("\n(Ctrl-C again, Ctrl-D or /bye quits)", style="dim")
            continue
        except UnicodeDecodeError as e:  # a terminal whose encoding Python decodes strictly
            say(f"not sent: this message is not valid UTF-8 text (byte 0x{e.object[e.start]:02x}); the conversation "
                "is unchanged")
            continue
        ctrl_c_at_prompt = False
        if not text:
            continue
        if can_be_command and text.startswith("/"):
            if command(s, text, console):
                return 0
            continue
        if phi4flash.invalid_utf8(text):  # bytes the terminal sent that are not UTF-8: Python keeps them as surrogates
            say(f"not sent: this message is {phi4flash.invalid_utf8(text)}; the conversation is unchanged")
            continue
        view = ReplyView(console, s.settings.think)
        with CtrlC() as ctrl_c, keys_held_off():
            try:
                st = chat_turn(s, text, view, ctrl_c)
            except ContextFull as e:
                say(str(e))
                continue
            except Phi4FlashError as e:  # NaN/inf logits: the turn is dropped, the model state too; the conversation stays
                s.reset()
                say(f"\nerror: {e}")
                continue
        console.print(stats_line(st), style="dim", markup=False, highlight=False)


def shown(text):
    """User text (a path, a command) as it can be printed: bytes that were not UTF-8 as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_shot(s, text, console, err):
    view = ReplyView(console, s.settings.think, raw=not console.is_terminal)
    with CtrlC() as ctrl_c:
        try:
            st = chat_turn(s, text, view, ctrl_c)
        except ContextFull as e:
            err.print(f"error: {e}", markup=False, highlight=False)
            return 2
    err.print(stats_line(st, one_shot=True), style="dim", markup=False, highlight=False)
    return 130 if st.stop.startswith("interrupted") else 0


def open_model(path, device="cpu", dtype=None, kv_dtype="float32"):
    """MODEL argument -> loaded model (converting a Hugging Face folder once, into the cache, with its
    matrices in `dtype`, default bfloat16), checked for what chat needs: a tokenizer, and a chat
    template that renders. Any problem is one Phi4FlashError line naming the file or flag."""
    import convert
    if path is None:
        if not os.path.isdir(TINY):
            raise Phi4FlashError(f"no MODEL given, and the bundled tiny model is not at {TINY}; give a MODEL "
                                 f"(for the real one: {REAL_MODEL_HINT})")
        print(f"note: no MODEL given, using the bundled tiny model: its weights are random, so its replies are "
              f"gibberish. For the real model: {REAL_MODEL_HINT}", file=sys.stderr)
        path = TINY
    folder = convert.resolve_model(path, dtype or "bfloat16")
    model = phi4flash.load(folder, device=device, kv_dtype=kv_dtype)  # a damaged side file: load()'s one-line error
    stored = phi4flash.read_safetensors_header(os.path.join(folder, "model.safetensors"))[1].get("weights_dtype")
    if dtype and stored != dtype:  # a folder converted before keeps its own storage
        raise Phi4FlashError(f"--dtype {dtype}: {path} is a converted folder whose matrices are {stored}; convert the "
                             f"Hugging Face snapshot with --dtype {dtype}, or leave out --dtype")
    if model.tokenizer is None:
        raise Phi4FlashError(f"{os.path.join(folder, 'tokenizer.json')}: missing; chat needs the tokenizer (convert the "
                             "Hugging Face snapshot again, or copy its tokenizer.json there)")
    try:  # the template is the checkpoint's own code: try it once now, not in the middle of the first turn
        render_prompt(model, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                              {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}])
    except Exception as e:
        where = f"line {e.lineno}: " if getattr(e, "lineno", None) else ""
        raise Phi4FlashError(f"{os.path.join(folder, 'tokenizer_config.json')}: its chat_template does not render "
                             f"({where}{type(e).__name__}: {_first_line(e)})") from None
    return model


def warm_up(model):
    """One token and one decode step through the model before the first turn, so that the first turn's
    numbers (prefill speed, time to the first token) are the model's own: on a CPU, numba compiles the
    kernels of section 11 when they are first used (seconds on a fresh clone; later runs read its
    cache). Said once on stderr when it takes long."""
    if model.device != "cpu" or model.embed_tokens.dtype == np.float32:  # float32 weights use no compiled kernel
        return
    t0 = time.perf_counter()
    _, cache = model.prefill([0], model.new_cache(2))
    model.step(cache, 0)
    if time.perf_counter() - t0 > 1:
        print(f"note: the first pass through the model took {time.perf_counter() - t0:.1f} s (numba compiles the CPU "
              "kernels on a first run, then reads them from its cache); the turns' numbers leave it out",
              file=sys.stderr, flush=True)


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def main(argv=None):
    ap = phi4flash.OneLineParser(description="Chat with Phi-4-mini-flash-reasoning (phi4flash, NumPy). "
                                 "At the prompt, /help lists the commands.")
    ap.add_argument("model", metavar="MODEL", nargs="?", help="converted folder, Hugging Face snapshot folder, or the "
                    "repo id microsoft/Phi-4-mini-flash-reasoning found in the local Hugging Face cache "
                    "(default: the bundled tiny random model)")
    ap.add_argument("--prompt", metavar="TEXT", help="one question: print the reply and exit (also when stdin is a pipe)")
    ap.add_argument("--system", metavar="TEXT", default="", help="system text")
    ap.add_argument("--temp", type=flag("temp"), default=0.6, help="sampling temperature, 0 = greedy (default 0.6)")
    ap.add_argument("--top-p", type=flag("top_p"), default=0.95, help="nucleus sampling mass (default 0.95)")
    ap.add_argument("--top-k", type=flag("top_k"), default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    ap.add_argument("--seed", type=flag("seed"), help="random seed for sampling")
    ap.add_argument("-n", "--max-tokens", type=flag("max_tokens"), default=32768,
                    help="longest reply in tokens (default 32768, the model card's; capped by the context)")
    ap.add_argument("--hide-thinking", action="store_true", help="do not show the <think> part (/set think on shows it)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    ap.add_argument("--dtype", choices=phi4flash.WEIGHTS_DTYPES, help="how a Hugging Face snapshot is converted "
                    "into the cache: bfloat16 (default, exact), float32, or int8 (groups of 32, 0.56x the bytes)")
    ap.add_argument("--kv-dtype", choices=tuple(phi4flash.KV_DTYPES), default="float32",
                    help="the K/V cache: float32 (default, exact) or bfloat16 (half the bytes read at long context)")
    args = ap.parse_args(argv)
    prompt, where = args.prompt, "--prompt"
    if prompt is None and not sys.stdin.isatty():  # bytes, decoded here: invalid UTF-8 is named below, not a crash
        prompt, where = sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "stdin"
    if prompt is not None and not prompt.strip():
        print("error: --prompt / stdin: expected a question, got empty text", file=sys.stderr)
        return 2
    for name, text in ((where, prompt or ""), ("--system", args.system)):  # a command line keeps bad bytes as surrogates
        if phi4flash.invalid_utf8(text):
            print(f"error: {name}: {phi4flash.invalid_utf8(text)}", file=sys.stderr)
            return 2

    from rich.console import Console
    console, err = Console(soft_wrap=True, highlight=False), Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        model = open_model(args.model, args.device, args.dtype, args.kv_dtype)
        settings = Settings(args.temp, args.top_p, args.top_k, args.max_tokens, args.seed, not args.hide_thinking)
        s = Session(model, settings, system=args.system)
        warm_up(model)
        if prompt is not None:
            return one_shot(s, prompt.strip(), console, err)
        name = os.path.basename(os.path.normpath(args.model)) if args.model else "tiny random model"
        return interactive(s, console, name)
    except Phi4FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # while loading or converting: Ctrl-C, or SIGTERM / SIGHUP (convert.Interrupted)
        which, code = phi4flash.interruption(e)
        print(f"\ninterrupted{which}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
