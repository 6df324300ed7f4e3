"""Tiny random-weight models with a tokenizer trained on the fly, for tests and CPU smoke runs.

A few hundred KB, built in seconds, and real transformers architectures, so every code path
(chat templates, padding, KV cache, safetensors loading) runs as it would on a real model.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summarize the following article in three sentences.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "Bonjour, comment allez-vous ? Très bien, merci.",
    "Explain how a transformer language model predicts the next token.",
    "1 2 3 4 5 6 7 8 9 10 100 1000 3.14 42",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. 東京 日本 😀",
]


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
        model_max_length=512,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(
    folder: str | Path,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    max_context: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random-weight causal LM and its tokenizer to `folder`; `arch` is a transformers
    model type (llama, qwen2, qwen3, mistral, gemma2, phi3, gpt_neox, gpt2, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_context, **common
        )
    else:
        shape = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=max_context,
            tie_word_embeddings=False,
        )
        if arch != "gpt_neox":
            shape.update(num_key_value_heads=2, head_dim=hidden // 4)
        if arch in ("mistral", "gemma2", "gemma3_text"):
            shape["sliding_window"] = 16  # shorter than most test prompts: the window matters
        config = AutoConfig.for_model(arch, **shape, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger logits than the default init make greedy choices well separated, not near-ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
