"""Every failure is one line and leaves nothing behind (issue 13), tried as a user would: the programs
run as child processes on real files, with real signals, on a read-only or full filesystem.

Each case checks: exit code 2 (or 128 + the signal), exactly one `error:` line on stderr naming the file
or argument (notes may come before it), no traceback, nothing partial on disk, an existing output
untouched. A full disk is a small tmpfs and a read-only folder a read-only tmpfs, mounted by the test
when it runs as root; without root, the read-only folder is a chmod 555 folder, and the full-disk
cases are skipped (an unprivileged user cannot mount one)."""
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

import convert
from conftest import ROOT, TINY, copy_snapshot

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------------------
# Helpers

def tree(path):
    """Every path under `path` (hidden ones too) with its size: what 'nothing changed' compares."""
    out = []
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(folder, name)
            out.append((os.path.relpath(p, path), os.path.getsize(p) if name in files else None))
    return sorted(out)


def one_error_line(r, *words, code=2):
    err = r.stderr.decode("utf-8", "replace") if isinstance(r.stderr, bytes) else r.stderr  # a run with text=False
    assert r.returncode == code, (r.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def run(script, *args, env=None, prelude=""):
    """python SCRIPT ARGS, optionally after `prelude` (Python run first in the child)."""
    env = {**os.environ, **(env or {})}
    code = f"import runpy, sys\n{prelude}\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def chat(model, cache, prelude=""):
    return run("chat.py", model, "--prompt", "hi", "--temp", "0", "-n", "2", env={"PHI4FLASH_CACHE": str(cache)},
               prelude=prelude)


@pytest.fixture
def mount(tmp_path):
    """mount(name, size, read_only) -> a fresh tmpfs folder under tmp_path (skips without root)."""
    mounted = []

    def mount(name, size="1m", read_only=False, fill=None):
        if not IS_ROOT:
            pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
        mounted.append(path)
        if fill:
            fill(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)])


def existing_output(folder):
    os.makedirs(folder / "out")
    (folder / "out" / "keep.txt").write_text("mine")


@pytest.fixture
def read_only(tmp_path, mount):
    """A folder no conversion can write in, holding an existing output out/keep.txt: a read-only tmpfs as
    root (root ignores permission bits), else a chmod 555 folder."""
    if IS_ROOT:
        yield mount("ro", read_only=True, fill=existing_output)
        return
    path = tmp_path / "ro"
    path.mkdir()
    existing_output(path)
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    yield path
    path.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# Disk and permission errors

def test_convert_into_a_folder_it_cannot_write(read_only):
    before = tree(read_only)
    one_error_line(run("convert.py", TINY, read_only / "new"), f"DST {read_only / 'new'}: cannot write in {read_only}")
    one_error_line(run("convert.py", TINY, read_only / "sub" / "new"), f"cannot create the folder {read_only / 'sub'}")
    one_error_line(run("convert.py", TINY, read_only / "out", "--force"), f"cannot write in {read_only}")
    assert tree(read_only) == before and (read_only / "out" / "keep.txt").read_text() == "mine"


def test_a_full_disk_is_found_before_writing(mount):
    disk = mount("small", size="512k", fill=existing_output)
    before = tree(disk)
    need = convert.size_text(846352)  # the tiny model's conversion: model.safetensors and the side files
    line = one_error_line(run("convert.py", TINY, disk / "new"), f"DST {disk / 'new'}: needs {need} free in {disk}, which has ")
    one_error_line(run("convert.py", TINY, disk / "out", "--force"), f"needs {need} free")
    assert tree(disk) == before, line


def test_a_disk_that_fills_up_while_converting(mount):
    """The free-space check is told there is room (a filesystem can fill up after it looked), so the
    writes themselves hit the real ENOSPC of the tmpfs."""
    disk = mount("small", size="512k", fill=existing_output)
    before = tree(disk)
    lie = "import shutil\nshutil.disk_usage = lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40)"
    for dst, force in ((disk / "new", ()), (disk / "out", ("--force",))):
        r = run("convert.py", TINY, dst, *force, prelude=lie)
        one_error_line(r, f"DST {dst}: the disk of {disk} is full", "nothing was kept")
        assert tree(disk) == before
    assert (disk / "out" / "keep.txt").read_text() == "mine"


def test_chat_converting_into_a_cache_folder_it_cannot_write(read_only, tmp_path):
    before = tree(read_only)
    for cache, words in ((read_only / "cache", [f"cannot create the folder {read_only / 'cache'}"]),
                         (read_only, [f"cannot write in {read_only}"])):
        line = one_error_line(chat(TINY, cache), f"error: cache folder {cache}{os.sep}tiny-phi4flash-", *words)
        assert line.endswith("set PHI4FLASH_CACHE to a folder with room that you can write")
    assert tree(read_only) == before


def test_chat_converting_into_a_full_cache_folder(mount):
    disk = mount("small", size="512k")
    one_error_line(chat(TINY, disk), f"cache folder {disk}", "needs 846.4 kB free", "PHI4FLASH_CACHE")
    assert tree(disk) == []


# ----------------------------------------------------------------------------------------------
# DST and SRC inside each other

def test_dst_inside_src_is_refused(tmp_path):
    src = copy_snapshot(tmp_path / "snapshot")
    before = tree(src)
    one_error_line(run("convert.py", src, os.path.join(src, "converted")), "is inside SRC", "outside the snapshot folder")
    one_error_line(run("convert.py", src, tmp_path, "--force"), f"DST {tmp_path}: contains SRC {src}")
    assert tree(src) == before


# ----------------------------------------------------------------------------------------------
# Signals

SLOW = """
sys.path.insert(0, {root!r})
import time, convert
rows = convert._convert_rows
def slow(*args):
    if not slow.started:
        print("writing", flush=True)
        slow.started = True
    time.sleep(0.02)  # the tiny model takes ~100 steps: a few seconds to send a signal in
    return rows(*args)
slow.started = False
convert._convert_rows = slow
""".format(root=ROOT)


def start_slow(script, *args, env=None):
    """Start a conversion (convert.py, or chat.py converting into its cache) that writes slowly; return
    once it has started writing."""
    if script == "convert.py":
        code = SLOW + f"sys.exit(convert.main({list(map(str, args))!r}))"
    else:
        code = SLOW + f"sys.argv = ['chat.py', *{list(map(str, args))!r}]\nimport runpy\nrunpy.run_path({os.path.join(ROOT, 'chat.py')!r}, run_name='__main__')"
    child = subprocess.Popen([sys.executable, "-c", "import sys\n" + code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    assert child.stdout.readline() == "writing\n", child.communicate()
    return child


def partials(folder):
    return [n for n in os.listdir(folder) if ".partial-" in n] if os.path.isdir(folder) else []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_during_conversion_leaves_nothing(tmp_path, sig):
    existing_output(tmp_path)
    before = tree(tmp_path)
    child = start_slow("convert.py", TINY, tmp_path / "new")
    assert partials(tmp_path) == [f".new.partial-{child.pid}"]  # it is writing: there is something to clean up
    child.send_signal(getattr(signal, sig))
    _, err = child.communicate(timeout=30)
    code = 130 if sig == "SIGINT" else 128 + getattr(signal, sig)
    assert child.returncode == code and "Traceback" not in err, err
    assert err.strip() == "interrupted" + ("" if sig == "SIGINT" else f" ({sig})") + ": nothing was written"
    assert tree(tmp_path) == before


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_while_chat_converts_into_its_cache(tmp_path, sig):
    cache = tmp_path / "cache"
    child = start_slow("chat.py", TINY, "--prompt", "hi", env={"PHI4FLASH_CACHE": str(cache)})
    assert len(partials(cache)) == 1
    child.send_signal(getattr(signal, sig))
    _, err = child.communicate(timeout=30)
    code, said = (130, "interrupted") if sig == "SIGINT" else (128 + getattr(signal, sig), f"interrupted ({sig})")
    assert child.returncode == code and "Traceback" not in err and err.strip().splitlines()[-1] == said, err
    assert tree(cache) == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_while_trace_converts_names_it(tmp_path, sig):
    cache = tmp_path / "cache"
    code = SLOW + ("import phi4flash\nsys.exit(phi4flash.main(['trace', {!r}, '--ids', '1,2']))".format(TINY))
    child = subprocess.Popen([sys.executable, "-c", "import sys\n" + code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PHI4FLASH_CACHE": str(cache)})
    assert child.stdout.readline() == "writing\n", child.communicate()
    child.send_signal(getattr(signal, sig))
    _, err = child.communicate(timeout=30)
    assert child.returncode == 128 + getattr(signal, sig) and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"interrupted ({sig}): nothing was saved", err
    assert tree(cache) == []


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_partial_folders_of_dead_processes_are_removed_by_the_next_run(tmp_path):
    child = start_slow("convert.py", TINY, tmp_path / "new")
    child.kill()  # SIGKILL: no handler runs, the partial folder stays
    child.communicate()
    assert partials(tmp_path) == [f".new.partial-{child.pid}"]
    (tmp_path / f".new.partial-{dead_pid()}.old").mkdir()             # also stale
    (tmp_path / f".new.partial-{os.getpid()}").mkdir()                 # a live process's: kept
    (tmp_path / f".other.partial-{dead_pid()}").mkdir()                # another DST's: not this run's business
    r = run("convert.py", TINY, tmp_path / "new")
    assert r.returncode == 0, r.stderr
    assert sorted(partials(tmp_path)) == sorted([f".new.partial-{os.getpid()}", next(n for n in partials(tmp_path) if n.startswith(".other"))])

    cache = tmp_path / "cache"  # the cache folder is ours: chat removes any dead process's partial folder there
    cache.mkdir()
    (cache / f".tiny-phi4flash-0123456789abcdef.partial-{dead_pid()}").mkdir()
    r = chat(TINY, cache)
    assert r.returncode == 0, r.stderr
    assert partials(cache) == [] and len(os.listdir(cache)) == 1


# ----------------------------------------------------------------------------------------------
# A converted folder with a broken or missing side file

@pytest.fixture
def model_copy(converted, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(converted, path)
    return path


@pytest.mark.parametrize("name, text, words", [
    ("generation_config.json", "{oops", "not valid JSON"),
    ("generation_config.json", "[1, 2]", "expected a JSON object, got list"),
    ("generation_config.json", '{"eos_token_id": "x"}', "eos_token_id is 'x'; expected a token id"),
    ("tokenizer_config.json", "", "not valid JSON"),
    ("tokenizer_config.json", "[]", "expected a JSON object, got list"),
    ("tokenizer_config.json", '{"chat_template": "{% if %}"}', "its chat_template does not render"),
    ("tokenizer_config.json", '{"chat_template": "{{ messages[9].content }}"}', "its chat_template does not render"),
    ("tokenizer.json", "{oops", "the tokenizers library cannot read it"),
    ("tokenizer.json", "{}", "the tokenizers library cannot read it"),
    ("tokenizer.json", None, "missing; chat needs the tokenizer"),
])
def test_chat_names_a_broken_side_file(model_copy, tmp_path, name, text, words):
    if text is None:
        os.remove(model_copy / name)
    else:
        (model_copy / name).write_text(text)
    before = tree(tmp_path)
    one_error_line(chat(model_copy, tmp_path / "cache"), f"error: {model_copy / name}: {words}")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json"])
def test_chat_runs_without_an_optional_side_file(model_copy, tmp_path, name):
    os.remove(model_copy / name)
    r = chat(model_copy, tmp_path / "cache")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


# ----------------------------------------------------------------------------------------------
# A damaged or foreign converted file, bad weights, bad flags

def test_a_damaged_converted_folder_is_named_not_taken_for_a_snapshot(model_copy, tmp_path):
    """A truncated model.safetensors in a converted folder: chat and trace name that file (it is not a
    snapshot missing its config.json), and no conversion starts."""
    file = model_copy / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    before = tree(tmp_path)
    one_error_line(chat(model_copy, tmp_path / "cache"), f"{file}: truncated")
    one_error_line(run("phi4flash.py", "trace", model_copy, "--ids", "1,2", env={"PHI4FLASH_CACHE": str(tmp_path / "cache")}),
                   f"{file}: truncated")
    assert tree(tmp_path) == before


def test_a_file_from_a_newer_phi4flash_says_upgrade_in_chat_and_trace(model_copy, tmp_path):
    file = model_copy / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"format_version":"1"', b'"format_version":"9"')
    assert len(header) == n
    file.write_bytes(data[:8] + header + data[8 + n:])
    for r in (chat(model_copy, tmp_path / "cache"), run("phi4flash.py", "trace", model_copy, "--ids", "1,2")):
        one_error_line(r, f"{file}: converted with format version 9", "upgrade phi4flash")


def nan_weight(folder, name="layers.3.attn.out_proj"):
    """Write a NaN over the first element of tensor `name` of a converted folder, in place."""
    import phi4flash
    path = os.path.join(folder, "model.safetensors")
    header, _, start = phi4flash.read_safetensors_header(path)
    nan = {"BF16": b"\xc0\x7f", "F32": b"\x00\x00\xc0\x7f"}[header[name]["dtype"]]
    with open(path, "r+b") as f:
        f.seek(start + header[name]["data_offsets"][0])
        f.write(nan)


def test_chat_with_nan_weights_is_one_line_naming_the_layer(model_copy, tmp_path):
    nan_weight(model_copy)
    one_error_line(chat(model_copy, tmp_path / "cache"), "the logits are not finite", "layers.3.mixer_out")


@pytest.mark.parametrize("script, args, words", [
    ("chat.py", ["--top-p", "2"], "argument --top-p: expected a number in (0, 1], got '2'"),
    ("chat.py", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ("convert.py", [TINY], "the following arguments are required: DST"),
    ("convert.py", [TINY, "x", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
    ("phi4flash.py", ["trace", TINY], "one of the arguments --prompt --ids is required"),
    ("phi4flash.py", ["trace", TINY, "--ids", "1", "--atol", "x"], "argument --atol: invalid float value: 'x'"),
])
def test_a_bad_flag_is_one_line(tmp_path, script, args, words):
    before = tree(tmp_path)
    one_error_line(run(script, *args), words)
    assert tree(tmp_path) == before
