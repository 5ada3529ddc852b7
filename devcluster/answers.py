"""One prompt answered by the base model and by the fine-tuned adapter, side by side: what a
user checks first after a fine-tune (greedy decoding, so the comparison is repeatable)."""

from __future__ import annotations

import warnings
from pathlib import Path


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    # A chat turn ends at <end_of_turn>; the converted base's generation config knows only <eos>.
    stops = [
        t
        for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>"))
        if isinstance(t, int) and t >= 0
    ]
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def base_and_adapter(
    model_dir: Path, adapter_dir: Path, prompts: list[str]
) -> list[tuple[str, str]]:
    """(base answer, adapter answer) for each prompt; the adapter loads with peft, as a
    serving stack would load it from the output volume."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the answers, not loading bars and deprecation notices
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.eval()
    before = [answer(base, tokenizer, p) for p in prompts]
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    tuned.eval()
    after = [answer(tuned, tokenizer, p) for p in prompts]
    return list(zip(before, after, strict=True))


if __name__ == "__main__":
    import sys

    for b, a in base_and_adapter(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]):
        print(f"base:  {b}\ntuned: {a}\n")
