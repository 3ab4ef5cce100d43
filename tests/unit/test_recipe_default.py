"""The embedded tiny model: deterministic, cached, raced safely."""

import hashlib
import json
import threading

import pytest

from oomguard.recipes import default


def _weights_hash(model_dir):
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].float().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return default.ensure_default_model(tmp_path_factory.mktemp("cache-a"))


def test_build_is_deterministic(built, tmp_path):
    again = default.ensure_default_model(tmp_path)
    assert again != built
    assert _weights_hash(again) == _weights_hash(built)
    assert (again / "tokenizer.json").read_text() == (built / "tokenizer.json").read_text()


def test_second_call_returns_the_cached_copy(built):
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert default.ensure_default_model(built.parent) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".build-")]


def test_cache_folder_is_keyed_by_the_shipped_files(built):
    assert built.name == f"default-model-{default.shipped_hash()}"


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(default.ENV_CACHE, str(tmp_path / "og"))
    assert default.cache_root() == tmp_path / "og"
    monkeypatch.delenv(default.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default.cache_root() == tmp_path / "xdg" / "oomguard"


def test_racing_builders_agree(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(default.ensure_default_model(tmp_path))
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_tokenizer_matches_the_config_and_has_a_chat_template(built):
    from transformers import AutoTokenizer

    config = json.loads((built / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(built))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        config["pad_token_id"], config["bos_token_id"], config["eos_token_id"])
    assert len(tok) <= config["vocab_size"]
    text = tok.apply_chat_template([{"role": "user", "content": "GPU memory?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith(tok.bos_token) and text.endswith("<|assistant|>\n")
    ids = tok("checkpoint").input_ids
    assert tok.decode(ids) == "checkpoint"
