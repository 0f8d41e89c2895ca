"""A tiny Llama, trained for a few seconds on a short English text, made locally.

The serving tests and benchmarks need a real model directory that vLLM loads like any
Hugging Face checkpoint, without reaching a model hub. This one is made on the spot: a
byte-level BPE tokenizer and the model's weights are both trained on ``data/tiny-corpus.txt``
(package data: friendly paragraphs about serving models on Kubernetes, and ``Q:``/``A:`` pairs
that are trained in the chat template's format), so its greedy chat answers are words and
sentences from that text rather than random bytes. Training is a short, seeded AdamW run on
one CPU thread (about 15-25 s on two busy cores): the same seed gives the same weights. The
model is cached under ``${LLMEP_CACHE:-${XDG_CACHE_HOME:-~/.cache}/llmep}/models/``.

Shape notes (vLLM's CPU attention rejects head_dim 16; 64 works): hidden 128, 2 heads, 1 KV
head, 2 layers, tied embeddings, vocab 512, float32.

:func:`ensure_tiny_lora` makes a LoRA adapter for that model in PEFT's on-disk format
(``adapter_config.json`` and ``adapter_model.safetensors``), cached under ``.../adapters/``: the
LoRA tests serve it from an object store beside the base model.

torch, transformers and tokenizers are imported inside :func:`ensure_tiny_model` and
:func:`ensure_tiny_lora` only, so importing ``llmep_serving`` stays light.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from llmep_operator.render import RayApp
    from llmep_operator.settings import OperatorSettings

# Bump the suffix whenever the model's shape, tokenizer, template, corpus or training changes, so
# caches refresh.
MODEL_DIRNAME = "tiny-llama-v2"

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS_RESOURCE = "data/tiny-corpus.txt"

# Training: 15-25 s on one CPU thread of a busy 2-core machine. Same seed, same weights.
SEED = 0
TRAIN_STEPS = 250
BATCH_SIZE = 8
LEARNING_RATE = 3e-3
WARMUP_STEPS = 20

# The adapter: its folder name carries the model's, so a new model gets a new adapter.
LORA_DIRNAME = f"{MODEL_DIRNAME}-lora-v1"
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGET_MODULES = ("q_proj", "v_proj")
LORA_SEED = 1
# Both factors drawn N(0, 0.05^2) (PEFT would start B at zero, an adapter that changes nothing):
# measured with transformers, greedy answers then differ from the base model's from the first
# token and are still words of the corpus; 0.02 changed nothing in 16 tokens, 0.1 gave gibberish.
LORA_INIT_STD = 0.05


def load_corpus() -> str:
    """The English text the tiny model's tokenizer and weights are trained on (package data)."""
    from importlib.resources import files

    return files("llmep_serving").joinpath(CORPUS_RESOURCE).read_text(encoding="utf-8")


def corpus_parts(text: str | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Split the corpus into chat pairs (``Q: ...`` / ``A: ...`` blocks) and plain paragraphs."""
    chats: list[tuple[str, str]] = []
    paragraphs: list[str] = []
    for block in (load_corpus() if text is None else text).split("\n\n"):
        block = block.strip()
        if block.startswith("Q: ") and "\nA: " in block:
            question, answer = block[len("Q: ") :].split("\nA: ", 1)
            chats.append((" ".join(question.split()), " ".join(answer.split())))
        elif block:
            paragraphs.append(" ".join(block.split()))
    return chats, paragraphs


# Model folders this process made: copying one beats training again for another cache root.
_MADE_HERE: list[Path] = []


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
        made = next((path for path in _MADE_HERE if (path / "config.json").is_file()), None)
        if made is not None:
            # Already trained in this process for another cache root: same files, no retraining.
            shutil.copytree(made, staging, dirs_exist_ok=True)
        else:
            _write_model(staging)
        # mkdtemp and safetensors make files private; the model is meant to be shared (copied
        # into pods that run as another user, mounted read-only into containers).
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is identical in shape and use.
            if not (target / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _MADE_HERE.append(target)
    return target


def _write_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chats, paragraphs = corpus_parts()
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
    bpe.train_from_iterator([text for chat in chats for text in chat] + paragraphs, trainer=trainer)

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
    # Chat pairs exactly as the chat template renders them (what vLLM's chat endpoint sends), and
    # the plain paragraphs as documents of their own.
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=False,
        )
        for question, answer in chats
    ] + [f"{bos}{paragraph}{eos}\n" for paragraph in paragraphs]
    examples = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and light beside whatever else runs
    try:
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        _train(model, examples, pad_id=tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)


def _train(model: LlamaForCausalLM, examples: list[list[int]], *, pad_id: int) -> None:
    """A short AdamW run over the examples, shuffled by a seeded generator, batches padded."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * max(0.05, 1 - step / TRAIN_STEPS),
    )
    model.train()
    order: list[int] = []
    for step in range(1, TRAIN_STEPS + 1):
        if len(order) < BATCH_SIZE:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch = [examples[i] for i in order[:BATCH_SIZE]]
        del order[:BATCH_SIZE]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == TRAIN_STEPS:
            print(f"training tiny model: step {step}/{TRAIN_STEPS}, loss {loss.item():.3f}", file=sys.stderr)
    model.eval()


def tiny_lora_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "adapters" / LORA_DIRNAME


def ensure_tiny_lora(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder of the tiny model's LoRA adapter, writing it first if it is not there.

    Seeded random factors for ``LORA_TARGET_MODULES`` of every layer, rank ``LORA_RANK``, in
    PEFT's file layout (what vLLM and Ray Serve LLM load); no training, no peft package. Shapes
    come from the tiny model's config.json (the model is made first if needed). Written to a
    temporary sibling folder and renamed into place, like the model.
    """
    target = tiny_lora_dir(cache_dir)
    if (target / "adapter_config.json").is_file():
        return target
    config = json.loads((ensure_tiny_model(cache_dir) / "config.json").read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{LORA_DIRNAME}.", dir=target.parent))
    try:
        _write_lora(staging, config)
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; same seed, same files.
            if not (target / "adapter_config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_lora(out: Path, config: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import save_file

    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    # (in, out) features of each target projection of a Llama attention block.
    shapes = {
        "q_proj": (hidden, config["num_attention_heads"] * head_dim),
        "k_proj": (hidden, config["num_key_value_heads"] * head_dim),
        "v_proj": (hidden, config["num_key_value_heads"] * head_dim),
        "o_proj": (config["num_attention_heads"] * head_dim, hidden),
    }
    generator = torch.Generator().manual_seed(LORA_SEED)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for module in LORA_TARGET_MODULES:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(LORA_RANK, fan_in, generator=generator) * LORA_INIT_STD
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, LORA_RANK, generator=generator) * LORA_INIT_STD
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": MODEL_DIRNAME,
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")


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
    autoscaling: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    extra_args: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The LLMEndpoint a user writes for the tiny model: the `cpu` profile adds what vLLM's CPU
    build needs (float32, eager mode, offline hub for a local path), so nothing else is set."""
    spec: dict[str, Any] = {
        "model": {"source": f"file://{model_dir}", "servedName": name},
        "engine": {"maxModelLen": max_model_len},
        "resources": {"profile": "cpu"},
    }
    if autoscaling:
        spec["autoscaling"] = dict(autoscaling)
    if routing:
        spec["routing"] = dict(routing)
    if extra_args:
        spec["engine"]["extraArgs"] = dict(extra_args)
    if lora:
        spec["lora"] = dict(lora)
    from llmep_operator.api import API_VERSION, KIND

    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def tiny_ray_app(
    model_dir: str | os.PathLike[str], settings: OperatorSettings | None = None, **manifest_kwargs: Any
) -> RayApp:
    """The operator's RayApp for that endpoint: ``applications[0]`` of its serveConfigV2 and the
    environment of its Ray processes (``settings``: OperatorSettings, default the defaults)."""
    from llmep_operator.api import parse_endpoint
    from llmep_operator.render import build_ray_app
    from llmep_operator.settings import OperatorSettings

    endpoint = parse_endpoint(tiny_endpoint_manifest(model_dir, **manifest_kwargs))
    return build_ray_app(endpoint, settings or OperatorSettings())
