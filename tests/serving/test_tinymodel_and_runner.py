"""The generated test model and the local runner's guards, without starting Ray."""

from __future__ import annotations

import json
import re

import pytest

from llmep_serving.local import LocalServe
from llmep_serving.tinymodel import MODEL_DIRNAME, ensure_tiny_model, load_corpus

pytestmark = pytest.mark.serving


def test_tiny_model_is_made_once_in_its_versioned_folder(tmp_path):
    first = ensure_tiny_model(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = ensure_tiny_model(tmp_path)
    assert first == second == tmp_path / "models" / MODEL_DIRNAME
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    # Written under a temporary name and renamed: nothing half-made is left beside it.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [MODEL_DIRNAME]


def test_tiny_model_has_the_shape_vllm_cpu_serves(tmp_path):
    config = json.loads((ensure_tiny_model(tmp_path) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # vLLM's CPU attention rejects head_dim 16; 64 works.
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["num_key_value_heads"] == 1
    assert config["tie_word_embeddings"] is True


def test_tiny_tokenizer_round_trips_text_and_renders_a_chat(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(tmp_path))
    text = "Hello, Kubernetes! 42 ünïcode"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|assistant|>\n") and "hi" in prompt


@pytest.mark.parametrize("question", ["Say hello.", "What is llmep?"])
def test_tiny_model_answers_a_chat_in_words_of_its_corpus(tiny_model_dir, question):
    """What a user of the demo sees: the greedy chat answer reads as words of the shipped text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    corpus_words = set(re.findall(r"[a-z]+", load_corpus().lower()))
    words = re.findall(r"[a-z]+", answer.lower())
    known = [word for word in words if word in corpus_words]
    assert len(words) >= 3, answer
    assert len(known) >= 0.8 * len(words), answer


def test_cache_root_follows_llmep_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMEP_CACHE", str(tmp_path / "c"))
    assert ensure_tiny_model() == tmp_path / "c" / "models" / MODEL_DIRNAME


def test_runner_refuses_a_non_loopback_host():
    with pytest.raises(ValueError, match="loopback"):
        LocalServe({"import_path": "ray.serve.llm:build_openai_app"}, host="0.0.0.0")  # noqa: S104


def test_runner_refuses_application_keys_it_would_silently_drop():
    with pytest.raises(ValueError, match="runtime_env"):
        LocalServe({"import_path": "x:y", "runtime_env": {"pip": ["requests"]}})


def test_runner_exports_its_env_with_free_ports_and_puts_the_old_values_back(monkeypatch):
    """Ray processes inherit the environment at ray.init; after stop, later code sees none of it."""
    import os

    monkeypatch.setenv("RAY_SERVE_HAPROXY_NBTHREAD", "7")
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.delenv("RAY_SERVE_HAPROXY_STATS_PORT", raising=False)
    local = LocalServe(
        {"import_path": "x:y"}, env={"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_NBTHREAD": "1"}
    )
    local._export_env()
    assert (os.environ["RAY_SERVE_ENABLE_HA_PROXY"], os.environ["RAY_SERVE_HAPROXY_NBTHREAD"]) == ("1", "1")
    assert 1024 < int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]) != 8404
    local._restore_env()
    assert os.environ["RAY_SERVE_HAPROXY_NBTHREAD"] == "7"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in os.environ
