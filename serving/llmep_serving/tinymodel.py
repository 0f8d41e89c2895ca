"""A tiny Llama with random weights and a trained byte-level BPE tokenizer, made locally.

The serving tests and benchmarks need a real model directory that vLLM loads like any
Hugging Face checkpoint, without reaching a model hub. This one takes a few seconds to make
and is cached under ``${LLMEP_CACHE:-${XDG_CACHE_HOME:-~/.cache}/llmep}/models/``.

Shape notes (vLLM's CPU attention rejects head_dim 16; 64 works): hidden 128, 2 heads, 1 KV
head, 2 layers, tied embeddings, vocab 512.

torch, transformers and tokenizers are imported inside :func:`ensure_tiny_model` only, so
importing ``llmep_serving`` stays light.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Bump the suffix whenever the model's shape, tokenizer or template changes, so caches refresh.
MODEL_DIRNAME = "tiny-llama-v1"

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes runs containers; an operator reconciles custom resources into children.",
    "A large language model predicts the next token from the tokens before it.",
    "Hello! How can I help you today? Tell me about the weather in Paris.",
    "Ray Serve scales replicas on queue depth: ongoing requests per replica.",
    "vLLM pages the key-value cache so many sequences share memory.",
    "def add(a, b):\n    return a + b\n",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000, 3.14159; {'json': [true, false, null]}",
    "Streaming answers arrive as server-sent events, one chunk at a time.",
    "The gateway routes on the request's model name to the endpoint's base URL.",
]


def cache_root() -> Path:
    """The llmep cache folder: $LLMEP_CACHE, else $XDG_CACHE_HOME/llmep, else ~/.cache/llmep."""
    if explicit := os.environ.get("LLMEP_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llmep"


def tiny_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "models" / MODEL_DIRNAME


def ensure_tiny_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the tiny model's folder, making it first if it is not there yet.

    ``cache_dir`` replaces the llmep cache root (the model lands in ``cache_dir/models/``).
    The model is written to a temporary sibling folder and renamed into place, so a reader
    never sees a half-written model and two concurrent callers both end with the same one.
    """
    target = tiny_model_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.", dir=target.parent))
    try:
        _write_model(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical in shape and use.
            if not (target / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)

    bos, eos, pad = SPECIAL_TOKENS[:3]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=512
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)


def main() -> int:
    print(ensure_tiny_model())
    return 0


if __name__ == "__main__":
    sys.exit(main())


def tiny_endpoint_manifest(
    model_dir: str | os.PathLike[str],
    *,
    name: str = "tiny",
    namespace: str = "local",
    max_model_len: int = 256,
    autoscaling: dict | None = None,
) -> dict:
    """The LLMEndpoint a user writes for the tiny model: the `cpu` profile adds what vLLM's CPU
    build needs (float32, eager mode, offline hub for a local path), so nothing else is set."""
    spec = {
        "model": {"source": f"file://{model_dir}", "servedName": name},
        "engine": {"maxModelLen": max_model_len},
        "resources": {"profile": "cpu"},
    }
    if autoscaling:
        spec["autoscaling"] = dict(autoscaling)
    return {
        "apiVersion": "llmep.io/v1alpha1",
        "kind": "LLMEndpoint",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def tiny_application(model_dir: str | os.PathLike[str], **manifest_kwargs) -> dict:
    """``applications[0]`` of the serveConfigV2 the operator renders for that endpoint."""
    from llmep_operator.api import parse_endpoint
    from llmep_operator.render import build_serve_config
    from llmep_operator.settings import OperatorSettings

    endpoint = parse_endpoint(tiny_endpoint_manifest(model_dir, **manifest_kwargs))
    (application,) = build_serve_config(endpoint, OperatorSettings())["applications"]
    return application
