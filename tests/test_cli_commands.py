"""`ra cache`, `ra models`, `ra --version` and config.toml: fast, no model, no torch.

Cache entries here are fakes (a manifest and a payload file of known size), which is all these
commands read."""
import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from core.manifest import DocumentInfo, Manifest, ModelInfo
from ra_cli.main import app

runner = CliRunner()


def ra(*args, env=None, input=None):
    e = os.environ.copy()
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ra_cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, env=e, input=input, timeout=120)


def fake_entry(home, digest, name, size, age_s):
    d = home / "store" / "entries" / digest
    d.mkdir(parents=True)
    (d / "keys.npy").write_bytes(b"\0" * size)
    (d / "indexes" / "flat-s128-r512").mkdir(parents=True)
    Manifest(format=1, key={}, digest=digest,
             document=DocumentInfo(name, "code" if name.endswith("/") else "text", 100,
                                   files=["a.py", "b.py"] if name.endswith("/") else []),
             model=ModelInfo("smollm2", "gguf:" + "0" * 64, 30, 9, 3, 64), n_tokens=1234, prefill_s=2.5,
             chunk_size=1024, positions={"scheme": "exact", "keys": "post-rope"}, created=time.time() - age_s).write(d)
    m = d / "manifest.json"
    os.utime(m, (time.time() - age_s, time.time() - age_s))  # last used


@pytest.fixture
def store(ra_home):
    fake_entry(ra_home, "aaaa" + "0" * 28, "old.txt", 3000, 3 * 86400)
    fake_entry(ra_home, "bbbb" + "0" * 28, "src/", 2000, 7200)
    fake_entry(ra_home, "cccc" + "0" * 28, "new.pdf", 1000, 10)
    return ra_home


def test_no_torch_for_help_version_models_and_cache(store):
    code = ("import sys\nfrom ra_cli.main import main\n"
            "for argv in (['--help'], ['--version'], ['models'], ['cache', 'list'], ['cache', 'info', 'bbbb'],\n"
            "             ['cache', 'gc', '--max-size', '1G'], ['cache', 'path'], ['ask', '--help'], ['repl', '--help']):\n"
            "    sys.argv = ['ra', *argv]\n"
            "    try:\n        main()\n    except SystemExit as e:\n        assert not e.code, (argv, e.code)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ra 0.1.0" in r.stdout and "* smollm2" in r.stdout and "default: smollm2 (built in)" in r.stdout


def test_cache_list_and_info(store):
    r = runner.invoke(app, ["cache", "list", "--json"])
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["document"] for x in rows] == ["old.txt", "src/", "new.pdf"]  # least recently used first
    assert rows[1]["kind"] == "code" and rows[1]["tokens"] == 1234
    text = runner.invoke(app, ["cache", "list"]).stdout.splitlines()
    assert text[0].startswith("aaaa00000000    1,234 tokens") and "3 d ago" in text[0]
    info = runner.invoke(app, ["cache", "info", "bbbb"]).stdout
    assert "document:  src/ (code, 100 chars)" in info and "files:     2: a.py, b.py" in info
    assert "indexes:   flat-s128-r512" in info


def test_cache_rm_gc_clear(store):
    entries = store / "store" / "entries"
    r = ra("cache", "rm", "zzzz")
    assert r.returncode == 1 and r.stderr == "ra: error: no cache entry matches 'zzzz'; see `ra cache list`\n"
    r = runner.invoke(app, ["cache", "rm", "cccc"])
    assert r.stdout.startswith("removed cccc00000000  new.pdf") and not (entries / ("cccc" + "0" * 28)).exists()
    fake_entry(store, "cccc" + "0" * 28, "new.pdf", 1000, 10)
    # the three entries hold ~6.5 KB: under 4.5K, the least recently used goes (old.txt) and src/ stays
    r = runner.invoke(app, ["cache", "gc", "--max-size", "4.5K", "--dry-run"])
    assert "would remove aaaa00000000" in r.stdout and (entries / ("aaaa" + "0" * 28)).exists()
    r = runner.invoke(app, ["cache", "gc", "--max-size", "4.5K"])
    assert r.stdout.count("removed") == 2 and "removed 1 entries" in r.stdout
    assert sorted(p.name[:4] for p in entries.iterdir()) == ["bbbb", "cccc"]
    r = ra("cache", "clear")  # stdin is not a terminal: refuses without --yes
    assert r.returncode == 2 and "add --yes" in r.stderr
    assert "removed 2 entries" in ra("cache", "clear", "--yes").stdout and not any(entries.iterdir())


def test_a_damaged_manifest_is_one_clear_error(store):
    """An edited manifest fails its own checksum; one missing a field (or with one ra does not know)
    is named, not a KeyError; `cache list` lists it as damaged instead of failing."""
    m = store / "store" / "entries" / ("bbbb" + "0" * 28) / "manifest.json"
    raw = json.loads(m.read_text())
    raw["n_tokens"] += 1
    m.write_text(json.dumps(raw))
    r = ra("cache", "info", "bbbb")
    assert r.returncode == 1 and "manifest.json is damaged (its checksum does not match)" in r.stderr
    assert r.stderr.count("\n") == 1
    del raw["model"], raw["checksum"]  # format 1 manifests have no checksum: their fields are checked
    m.write_text(json.dumps(raw))
    r = ra("cache", "info", "bbbb")
    assert r.returncode == 1 and r.stderr.startswith("ra: error: cache entry bbbb00000000: manifest lacks field(s) 'model'")
    raw["model"], raw["colour"] = {"spec": "x", "identity": "y", "layers": 1, "q_heads": 1, "kv_heads": 1,
                                   "head_dim": 1}, "red"
    m.write_text(json.dumps(raw))
    r = ra("cache", "list")
    assert r.returncode == 0 and "bbbb00000000  damaged:" in r.stdout and "unknown field(s) 'colour'" in r.stdout
    assert "old.txt" in r.stdout and "Traceback" not in r.stderr


def test_an_entry_of_an_older_format_is_never_misread(store):
    """The fake entries are format 1 (no checksums): `verify` says so, and the current format's
    key never finds them (its digest differs), so a document is rebuilt beside such an entry."""
    from core.store import FORMAT_VERSION, StoreKey

    r = runner.invoke(app, ["cache", "verify"])
    assert r.exit_code == 1 and r.output.count("has an older format (no checksums)") == 3
    key = StoreKey("t", "m", 1, "float32", "float16")
    assert FORMAT_VERSION == 2 and key.digest != StoreKey("t", "m", 1, "float32", "float16", format=1).digest


def test_settings_precedence_option_env_config(store):
    # config.toml < RA_CACHE_MAX_SIZE < --max-size, through `ra cache gc --dry-run`
    (store / "config.toml").write_text('[cache.gc]\nmax_size = "1"\n')
    assert "would remove 3 entries" in ra("cache", "gc", "--dry-run").stdout
    env = {"RA_CACHE_MAX_SIZE": "5K"}
    assert "would remove 1 entries" in ra("cache", "gc", "--dry-run", env=env).stdout
    assert "would remove 0 entries" in ra("cache", "gc", "--dry-run", "--max-size", "1G", env=env).stdout
    # a top-level key applies to every command with that option; models shows the default's source
    (store / "config.toml").write_text('model = "org/some-model"\nmax_tokens = 9\n')
    assert "default: org/some-model (from config.toml)" in ra("models").stdout
    assert "default: x/y (from RA_MODEL)" in ra("models", env={"RA_MODEL": "x/y"}).stdout
    (store / "config.toml").write_text("max_tokenz = 9\n")
    r = ra("cache", "list")
    assert r.returncode == 2 and r.stderr == f"ra: error: {store / 'config.toml'}: unknown setting 'max_tokenz'\n"
    (store / "config.toml").write_text("model = \n")
    r = ra("cache", "list")
    assert r.returncode == 2 and "config.toml: Invalid value" in r.stderr
