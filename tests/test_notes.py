"""The notes never rot: every ```python block in notes/*.md runs (a note's blocks in order, in one
namespace, from the repository root), and a ```text block right after a python block is that
block's expected output. Rules for authors are in notes/README.md.

    python tests/test_notes.py --update notes/03-differential-attention.md   # rewrite its output blocks
"""
import contextlib
import io
import math
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import phi4flash  # noqa: E402

NOTES = os.path.join(ROOT, "notes")
NOTE_FILES = sorted(f for f in os.listdir(NOTES) if f.endswith(".md"))
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*\n?", re.M | re.S)
NO_RUN = "# notes: no-run"
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def blocks(text):
    """-> [(lang, code, line, span, expected)]: fenced blocks in order; `expected` is the (code, span)
    of a ```text block that follows a python block with nothing but blank lines between."""
    found = [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1, m.span()) for m in FENCE.finditer(text)]
    out = []
    for n, (lang, code, line, span) in enumerate(found):
        expected = None
        if lang == "python" and n + 1 < len(found) and found[n + 1][0] == "text" \
                and not text[span[1]:found[n + 1][3][0]].strip():
            expected = found[n + 1][1], found[n + 1][3]
        out.append((lang, code, line, span, expected))
    return out


def _normalise(line):
    line = re.sub(r"[━─═]+", "─", line.rstrip())      # table rules and padding depend on column widths
    return re.sub(r"\s+", " ", line)


def same_output(got, want):
    """Line by line: the text between numbers must match (runs of spaces and rule characters count
    as one); integers must be equal, other numbers within 1% (or 1e-5: rounding noise of float32)."""
    got, want = got.rstrip().splitlines(), want.rstrip().splitlines()
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        g, w = _normalise(g), _normalise(w)
        if NUMBER.split(g) != NUMBER.split(w):
            return False
        for a, b in zip(NUMBER.findall(g), NUMBER.findall(w)):
            exact = not re.search(r"[.eE]", a + b)
            if (a != b) if exact else not math.isclose(float(a), float(b), rel_tol=1e-2, abs_tol=1e-5):
                return False
    return True


def run_note(name):
    """Run a note's python blocks in order; yield (block, printed output) for every block."""
    path = os.path.join(NOTES, name)
    text = open(path, encoding="utf-8").read()
    namespace = {"__name__": "__notes__"}
    for lang, code, line, span, expected in blocks(text):
        if lang != "python":
            continue
        compiled = compile(code, f"{path}:{line}", "exec")  # no-run blocks must at least be valid Python
        if code.startswith(NO_RUN):
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compiled, namespace)
        yield (lang, code, line, span, expected), buf.getvalue()


@pytest.fixture(scope="session")
def notes_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("notes-cache"))


@pytest.fixture
def notes_env(monkeypatch, notes_cache):
    monkeypatch.chdir(ROOT)                            # the notes say: run from the repository root
    monkeypatch.setenv("PHI4FLASH_CACHE", notes_cache)  # convert the tiny model once, not into ~/.cache
    monkeypatch.setenv("COLUMNS", "100")               # rich tables as wide as in the notes


@pytest.mark.parametrize("name", NOTE_FILES)
def test_note_runs_and_prints_what_it_shows(name, notes_env):
    for (_, _, line, _, expected), printed in run_note(name):
        if expected is not None:
            assert same_output(printed, expected[0]), (
                f"notes/{name}: the block at line {line} printed\n{printed}\ninstead of\n{expected[0]}")


def test_index_links_every_note():
    index = open(os.path.join(NOTES, "README.md"), encoding="utf-8").read()
    links = re.findall(r"\]\(([^)#]+\.md)\)", index)
    assert set(links) == set(NOTE_FILES) - {"README.md"}
    assert links == sorted(links)  # the index lists them in reading order


def _resolve(dotted):
    obj = phi4flash
    for part in dotted.removeprefix("phi4flash.").split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            cls = getattr(phi4flash, dotted.split(".")[0], None)  # a dataclass field: Cache.ssm_state
            return cls is not None and part in getattr(cls, "__dataclass_fields__", {})
    return True


@pytest.mark.parametrize("name", [n for n in NOTE_FILES if n != "README.md"])
def test_named_functions_exist(name):
    """Every note ends its teaching with '## In phi4flash.py', a list of the code that implements it;
    each `name` there (and every `phi4flash.name` anywhere) must exist in phi4flash.py."""
    text = open(os.path.join(NOTES, name), encoding="utf-8").read()
    assert "\n## In phi4flash.py\n" in text, f"notes/{name} has no '## In phi4flash.py' section"
    section = text.split("\n## In phi4flash.py\n", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^[*-] `([A-Za-z_][\w.]*)`", section, re.M)
    assert names, f"notes/{name}: the '## In phi4flash.py' section names nothing"
    names += re.findall(r"`phi4flash\.(?!py`)([A-Za-z_][\w.]*)", text)  # not `phi4flash.py`
    missing = [n for n in names if not _resolve(n)]
    assert not missing, f"notes/{name} names what phi4flash.py does not have: {missing}"


def test_overview_diagram_matches_the_schedule():
    """The Mermaid schedule in the overview shows each of the 32 layers as the code builds it."""
    text = open(os.path.join(NOTES, "01-sambay-overview.md"), encoding="utf-8").read()
    mermaid = next(code for lang, code, *_ in blocks(text) if lang == "mermaid")
    labels = dict(re.findall(r'\bL(\d+)\["\1 ([^"]+)"\]', mermaid))
    cfg = phi4flash.Config(vocab_size=200064, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                           num_attention_heads=40, num_key_value_heads=20,
                           sliding_window=tuple(512 if i % 2 and i < 16 else None for i in range(32)))
    words = {"mamba": "Mamba", "swa": "SWA", "full": "full attention", "gmu": "GMU", "cross": "cross-attention"}
    assert sorted(map(int, labels)) == list(range(32))
    for i, kind in enumerate(cfg.layer_kinds):
        assert labels[str(i)].startswith(words[kind]), (i, labels[str(i)])
    assert "memory" in labels[str(cfg.memory_layer)] and "shared K/V" in labels[str(cfg.kv_layer)]


def update(path):
    """Rewrite the ```text output blocks of one note with what its python blocks print now."""
    name = os.path.basename(path)
    os.chdir(ROOT)
    os.environ.setdefault("COLUMNS", "100")
    text = open(os.path.join(NOTES, name), encoding="utf-8").read()
    edits = [(expected[1], printed) for (*_, expected), printed in run_note(name) if expected is not None]
    for (start, end), printed in reversed(edits):
        printed = "\n".join(line.rstrip() for line in printed.rstrip().splitlines())
        text = text[:start] + "```text\n" + printed + "\n```\n" + text[end:]
    open(os.path.join(NOTES, name), "w", encoding="utf-8").write(text)
    print(f"{name}: {len(edits)} output blocks rewritten; read the diff before committing")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--update":
        sys.exit(__doc__)
    for note in sys.argv[2:]:
        update(note)
