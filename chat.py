"""chat.py: talk to Phi-4-mini-flash-reasoning in a terminal.

    python chat.py [MODEL] --prompt "What is 7 * 6?"

MODEL is a converted folder or a Hugging Face snapshot folder (converted once into a cache folder);
without it, the bundled tiny model with random weights answers (useful only to see the machinery run).
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time

import phi4flash
from phi4flash import Phi4FlashError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "tests", "fixtures", "tiny-phi4flash")
REAL_MODEL_HINT = ("huggingface-cli download microsoft/Phi-4-mini-flash-reasoning --local-dir Phi-4-mini-flash-reasoning "
                   "&& python chat.py Phi-4-mini-flash-reasoning")


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
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v}
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


# ----------------------------------------------------------------------------------------------
# Streaming text: byte-level tokens can end in the middle of a UTF-8 character

_BYTE_ALPHABET = None


def _byte_alphabet():
    """The byte-level BPE alphabet (GPT-2's): printable character -> the byte it stands for."""
    global _BYTE_ALPHABET
    if _BYTE_ALPHABET is None:
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        chars, n = {}, 0
        for b in range(256):
            if b in printable:
                chars[chr(b)] = b
            else:
                chars[chr(256 + n)] = b
                n += 1
        _BYTE_ALPHABET = chars
    return _BYTE_ALPHABET


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back an incomplete UTF-8 character, so the
    pieces concatenate to exactly tokenizer.decode(all ids)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.byte_level = json.loads(tokenizer.to_str()).get("decoder", {}).get("type") == "ByteLevel"
        self.special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.ids, self.shown = [], ""

    def push(self, token):
        """-> the new text this token completes ('' while a character is still incomplete)."""
        if self.byte_level:
            piece = self.tok.id_to_token(token)
            if piece in self.special:  # added tokens decode as their own text
                return self.utf8.decode(b"", final=True) + piece
            alphabet = _byte_alphabet()
            return self.utf8.decode(bytes(alphabet[c] for c in piece))
        self.ids.append(token)  # other decoders: decode everything, show what is new and complete
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def flush(self):
        if self.byte_level:
            return self.utf8.decode(b"", final=True)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        new, self.shown = text[len(self.shown):], text
        return new


# ----------------------------------------------------------------------------------------------

def open_model(path):
    """MODEL argument -> loaded model (converting a Hugging Face folder once, into the cache)."""
    import convert
    if path is None:
        print(f"note: no MODEL given, using the bundled tiny model: its weights are random, so its replies are "
              f"gibberish. For the real model: {REAL_MODEL_HINT}", file=sys.stderr)
        path = TINY
    return phi4flash.load(convert.resolve_model(path))


def reply(model, messages, args, out=sys.stdout):
    """Generate and stream one assistant reply; -> (text, stats)."""
    ids = model.encode(render_prompt(model, messages))
    decoder, text, generated = StreamDecoder(model.tokenizer), [], 0
    t0 = time.perf_counter()
    t_first = None
    max_new = max(1, min(args.max_tokens, model.config.context_length - len(ids)))
    for token in model.generate(ids, max_new, args.temp, args.top_p, args.top_k, args.seed):
        if t_first is None:
            t_first = time.perf_counter()
        generated += 1
        if token in model.stop_ids:
            break
        piece = decoder.push(token)
        text.append(piece)
        out.write(piece)
        out.flush()
    tail = decoder.flush()
    text.append(tail)
    out.write(tail + "\n")
    t_end = time.perf_counter()
    return "".join(text), {"prompt_tokens": len(ids), "ttft_s": (t_first or t_end) - t0,
                           "generated": generated, "decode_s": t_end - (t_first or t_end)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Chat with Phi-4-mini-flash-reasoning (phi4flash, NumPy).")
    ap.add_argument("model", metavar="MODEL", nargs="?", help="converted folder or Hugging Face snapshot folder "
                    "(default: the bundled tiny random model)")
    ap.add_argument("--prompt", help="one question: print the reply and exit")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--temp", type=float, default=0.6, help="sampling temperature, 0 = greedy (default 0.6)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    ap.add_argument("--seed", type=int, help="random seed for sampling")
    ap.add_argument("-n", "--max-tokens", type=int, default=32768, help="longest reply in tokens (default 32768)")
    args = ap.parse_args(argv)
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is None:
        print("error: interactive chat is not built yet; pass --prompt TEXT or pipe the question on stdin", file=sys.stderr)
        return 2
    try:
        model = open_model(args.model)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        _, stats = reply(model, messages, args)
    except Phi4FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    rate = (stats["generated"] - 1) / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
    print(f"[{stats['prompt_tokens']} prompt tokens, first token after {stats['ttft_s']:.2f} s; "
          f"{stats['generated']} generated, {rate:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
