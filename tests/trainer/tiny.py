"""Tiny random-weight Gemmas of every generation and an offline tokenizer, built in seconds.

``make_model_dir(tmp, "gemma2")`` writes a folder that ``from_pretrained`` loads like a real
checkpoint: config.json, safetensors weights, and a byte-level BPE tokenizer trained on the
shipped test data with Gemma's special tokens and chat template.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "data"
SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|turn>",
    "<turn|>",
]
VOCAB = 384
MODEL_TYPES = ["gemma", "gemma2", "gemma3_text", "gemma3", "gemma3n_text", "gemma4_text"]

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def text_config(model_type: str):
    from transformers import AutoConfig

    extra: dict = {}
    if model_type in ("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text"):
        extra["sliding_window"] = 8
    if model_type in ("gemma3_text", "gemma4_text"):
        extra["layer_types"] = ["sliding_attention", "full_attention"]
    if model_type == "gemma3n_text":
        extra.update(
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
            laurel_rank=4,
            altup_num_inputs=2,
            num_kv_shared_layers=0,
            activation_sparsity_pattern=[0.0, 0.0],
            intermediate_size=[64, 64],
        )
    if model_type == "gemma4_text":
        extra.update(
            global_head_dim=16,
            num_global_key_value_heads=1,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
        )
    return AutoConfig.for_model(model_type, **{**_TEXT, **extra})


def model_config(model_type: str):
    from transformers import AutoConfig

    if model_type != "gemma3":
        return text_config(model_type)
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return AutoConfig.for_model(
        "gemma3",
        text_config=text_config("gemma3_text").to_dict(),
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    )


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [p.read_text() for p in sorted(DATA.glob("*.jsonl"))] or ["hello world"]
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def make_tokenizer(model_type: str = "gemma3_text"):
    """Gemma 1-3's turn tokens and template, or Gemma 4's (``<|turn>``, a system role)."""
    from gft_trainer.data import DEFAULT_CHAT_TEMPLATE, GEMMA4_CHAT_TEMPLATE
    from transformers import PreTrainedTokenizerFast

    gemma4 = model_type.startswith("gemma4")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=__import__("tokenizers").Tokenizer.from_str(_tokenizer_json()),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    tok.chat_template = GEMMA4_CHAT_TEMPLATE if gemma4 else DEFAULT_CHAT_TEMPLATE
    return tok


def make_model_dir(root: Path, model_type: str, seed: int = 0) -> Path:
    """A loadable folder with a tiny random model of ``model_type`` and the tokenizer."""
    from transformers import AutoModelForCausalLM

    out = Path(root) / f"tiny-{model_type}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(model_type))
    model.save_pretrained(out)
    make_tokenizer(model_type).save_pretrained(out)
    json.loads((out / "config.json").read_text())  # written and readable
    return out
