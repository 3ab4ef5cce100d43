"""Post-import hooks, and the start-up cost of the bootstrap (oomguard.bootstrap.imports, site/)."""

import json
import os
import subprocess
import sys

import pytest

from oomguard.bootstrap import SITE_DIR, imports


@pytest.fixture
def fresh_module(tmp_path, monkeypatch):
    (tmp_path / "og_hooked_pkg").mkdir()
    (tmp_path / "og_hooked_pkg" / "__init__.py").write_text("")
    (tmp_path / "og_hooked_pkg" / "inner.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "og_hooked_pkg.inner"
    imports.uninstall()
    for name in ("og_hooked_pkg.inner", "og_hooked_pkg"):
        sys.modules.pop(name, None)


def test_hook_runs_after_the_module_body(fresh_module):
    seen = []
    imports.when_imported(fresh_module, lambda m: seen.append(m.VALUE))
    assert seen == []
    import og_hooked_pkg.inner as inner  # noqa: F401  (the import under test)

    assert seen == [41]
    assert inner.__spec__.loader.get_source(fresh_module) == "VALUE = 41\n"  # the wrapped loader delegates


def test_hook_on_an_already_imported_module_runs_at_once(fresh_module):
    import og_hooked_pkg.inner  # noqa: F401

    seen = []
    imports.when_imported(fresh_module, lambda m: seen.append(m.__name__))
    assert seen == [fresh_module]


CHECK = ("import sys; heavy=[m for m in ('torch','transformers','peft','trl') if m in sys.modules]; "
         "print(','.join(heavy) or 'none', type(sys.meta_path[0]).__name__)")


@pytest.mark.parametrize("run_dir, finder", [("x", "PostImportFinder"), ("", "other")])
def test_startup_imports_nothing_heavy(tmp_path, run_dir, finder):
    env = {**os.environ, "PYTHONPATH": str(SITE_DIR), "OOMGUARD_RUN_DIR": str(tmp_path / run_dir) if run_dir else ""}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout
    heavy, first = out.split()
    assert heavy == "none"
    assert (first == "PostImportFinder") == (finder == "PostImportFinder")


def test_a_hook_that_raises_leaves_the_import_working_and_says_so(fresh_module, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("OOMGUARD_RUN_DIR", str(run_dir))

    def broken(module):
        raise AttributeError("module has no attribute 'Trainer'")

    imports.when_imported(fresh_module, broken)
    import og_hooked_pkg.inner as inner

    assert inner.VALUE == 41  # the user's import went through
    assert "the bootstrap's hook on og_hooked_pkg.inner failed (AttributeError" in capsys.readouterr().err
    event = json.loads((run_dir / "events.jsonl").read_text().splitlines()[-1])
    assert (event["event"], event["part"]) == ("guard_degraded", "the bootstrap's hook on og_hooked_pkg.inner")


def test_an_oom_in_a_hook_is_not_swallowed(fresh_module):
    def oom(module):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")

    imports.when_imported(fresh_module, oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        import og_hooked_pkg.inner  # noqa: F401
