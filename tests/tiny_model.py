"""Tiny random-weight models with a tokenizer trained on the fly, for tests and CPU smoke runs.

A few hundred KB, built in seconds, and real transformers architectures, so every code path
(chat templates, padding, KV cache, safetensors loading) runs as it would on a real model.
"""

from __future__ import annotations

import json
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


def train_sentencepiece_like_tokenizer(vocab_size: int = 300):
    """A Llama-2-style tokenizer as transformers converts SentencePiece ones: spaces as '▁' with
    one prepended, BPE with byte fallback, a decoder that strips the text's leading space (so
    `▁Paris` decoded alone is 'Paris'), <s> before every plain prompt, a [INST] chat template."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The capital of France is Paris.",
        "Question: is the sky blue? Answer: yes no",
        "London Berlin Madrid the quick brown fox",
    ] * 20
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"]
    trained.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    model = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in model["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    return fast


def train_wordpiece_tokenizer(vocab_size: int = 512):
    """A BERT-style WordPiece tokenizer: [CLS] text [SEP], [PAD] id 0, lower-casing."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        CORPUS * 20,
        trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials),
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def tiny_config(arch: str, tokenizer, hidden: int, layers: int, max_context: int, **extra):
    """A transformers config of `arch` at toy size, with the tokenizer's special ids."""
    from transformers import AutoConfig, GPT2Config

    common = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_context, **common
        )
    shape = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_context,
    )
    if arch == "bert":
        return AutoConfig.for_model(arch, **shape, **common)
    shape["tie_word_embeddings"] = False
    if arch != "gpt_neox":
        shape.update(num_key_value_heads=2, head_dim=hidden // 4)
    if arch in ("mistral", "gemma2", "gemma3_text"):
        shape["sliding_window"] = 16  # shorter than most test prompts: the window matters
    return AutoConfig.for_model(arch, **shape, **common)


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
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = tiny_config(arch, tokenizer, hidden, layers, max_context)
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


def build_tiny_classifier(
    folder: str | Path,
    labels: list[str],
    arch: str = "bert",
    problem_type: str | None = None,
    max_context: int = 512,
    seed: int = 0,
    texts: list[str] | None = None,
) -> Path:
    """Save a random-weight sequence classifier with `labels` as its id2label; bert gets a
    WordPiece tokenizer ([CLS] ... [SEP]), decoder archs the byte-level BPE one. With `texts`,
    a model that gives them all one label is drawn again (the next seeds): the trained
    tokenizer differs from run to run (its trainer breaks ties in hash order), and now and then
    it made a model that answered one label for everything."""
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_wordpiece_tokenizer() if arch == "bert" else train_tokenizer()
    config = tiny_config(
        arch,
        tokenizer,
        hidden=32,
        layers=2,
        max_context=max_context,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type=problem_type,
    )
    for attempt in range(10):
        torch.manual_seed(seed + attempt)
        model = AutoModelForSequenceClassification.from_config(config).eval()
        _spread_labels(model, tokenizer, len(labels))
        if texts is None or len(labels) < 2:
            break
        with torch.no_grad():  # each text alone, as a test's direct forward runs it
            answers = {
                int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in texts
            }
        if len(answers) > 1:
            break
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _spread_labels(model, tokenizer, count: int) -> None:
    """Scale and centre the random head on the corpus, so that different texts get different
    labels (a random encoder maps every text to nearly the same point)."""
    import torch

    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.out_features == count
    with torch.no_grad():
        logits = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in CORPUS])
        head.weight.div_(logits.std(0).clamp(min=1e-6)[:, None])
        if head.bias is not None:
            head.bias.div_(logits.std(0).clamp(min=1e-6))
            head.bias.sub_(
                model(**tokenizer(CORPUS, return_tensors="pt", padding=True)).logits.mean(0)
            )


def build_tiny_encoder(
    folder: str | Path, arch: str = "bert", max_context: int = 512, seed: int = 0
) -> Path:
    """Save a random-weight bare model (what `embed` loads with AutoModel) and its tokenizer."""
    import torch
    from transformers import AutoModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_wordpiece_tokenizer() if arch == "bert" else train_tokenizer()
    config = tiny_config(arch, tokenizer, hidden=32, layers=2, max_context=max_context)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
