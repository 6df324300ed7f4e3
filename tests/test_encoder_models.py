"""Models beyond BERT and decoders under embed, classify and score: encoder-decoders embed
with their encoder, a row a classifier's forward refuses is that row's error, a pad token past
the embedding table, RoBERTa's position offset, and encoders transformers loads as causal LMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import cli, read_outputs, sample_prompts, write_job, write_jsonl
from tiny_model import train_tokenizer
from tokenizers import processors


def _prompts(tmp_path, rows):
    return write_jsonl(tmp_path / "in.jsonl", rows)


def _run(tmp_path, model, rows, name="out", **task):
    inputs = _prompts(tmp_path, rows)
    job = write_job(tmp_path / f"{name}.yaml", model, inputs, tmp_path / name)
    spec = yaml.safe_load(job.read_text())
    spec["task"] = task
    spec["model"]["device"] = "cpu"  # compared with float32 on the CPU, on a GPU box too
    job.write_text(yaml.safe_dump(spec))
    return cli("run", str(job)), tmp_path / name


def _seq2seq(folder, arch, tokenizer=None, auto_class=None, **extra):
    """A tiny random T5 or BART saved with its tokenizer (`auto_class`: AutoModel by default;
    `extra`: more config keys)."""
    from transformers import AutoConfig, AutoModel

    tokenizer = tokenizer or train_tokenizer()
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        d_model=32,
        **(
            dict(d_ff=64, num_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0)
            if arch == "t5"
            else dict(
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=256,
                decoder_start_token_id=tokenizer.eos_token_id,
            )
        ),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    torch.manual_seed(0)
    (auto_class or AutoModel).from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_an_encoder_decoder_embeds_with_its_encoder(tmp_path, arch):
    """T5 failed every row with transformers' 'specify exactly one of input_ids or
    inputs_embeds' (the decoder's); BART exited 0 with its decoder's states of the shifted
    input for vectors."""
    from transformers import AutoModel, AutoTokenizer

    model = _seq2seq(tmp_path / arch, arch)
    rows = sample_prompts(6)
    result, out = _run(tmp_path, model, rows, type="embed", pooling="mean", normalize=False)
    assert result.exit_code == 0, result.output
    table = read_outputs(out)
    assert table.column("error").null_count == len(rows)
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    tokenizer = AutoTokenizer.from_pretrained(model)
    encoder = AutoModel.from_pretrained(model).get_encoder().eval()
    with torch.no_grad():
        want = [
            encoder(**tokenizer(r["prompt"], return_tensors="pt")).last_hidden_state[0].mean(0)
            for r in rows
        ]
    assert np.allclose(got, torch.stack(want).numpy(), atol=1e-4)


def test_a_row_a_classifier_refuses_is_that_row_s_error(tmp_path):
    """A BART classifier (bart-large-mnli's shape) reads the state at </s>, and transformers
    raises ValueError for a batch whose rows hold different counts of it: a prompt holding the
    text `</s>` stopped the whole job with a traceback. The batch is bisected instead: alone,
    that row is classified as transformers classifies it."""
    from transformers import AutoModelForSequenceClassification, BartForSequenceClassification

    tokenizer = train_tokenizer()
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
    folder = _seq2seq(
        tmp_path / "bart",
        "bart",
        tokenizer,
        AutoModelForSequenceClassification,
        bos_token_id=tokenizer.bos_token_id,
        id2label={0: "no", 1: "yes"},
        label2id={"no": 0, "yes": 1},
    )
    rows = [{"id": f"r{i}", "prompt": f"row {i} says hello"} for i in range(5)]
    rows.append({"id": "odd", "prompt": f"a row with {eos} inside"})
    result, out = _run(tmp_path, folder, rows, type="classify")
    assert result.exit_code == 0, result.output
    got = {r["id"]: r for r in read_outputs(out).to_pylist()}
    assert all(r["error"] is None for r in got.values()), got
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BartForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        want = model(**tokenizer(rows[-1]["prompt"], return_tensors="pt")).logits[0].softmax(0)
    assert got["odd"]["label"] == ["no", "yes"][int(want.argmax())]
    assert abs(got["odd"]["probability"] - float(want.max())) < 1e-4


def test_a_pad_token_past_the_embedding_table_does_not_split_batches(tmp_path):
    """A fine-tune's tokenizer given a [PAD] after training (its id = the table's size): every
    padded batch failed and was halved down to single rows, counted as out-of-memory splits."""
    import pyarrow.parquet as pq
    from transformers import AutoModel, LlamaConfig

    tokenizer = train_tokenizer()
    vocab = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert tokenizer.pad_token_id == vocab
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    rows = [{"id": f"r{i}", "prompt": "word " * (i + 1)} for i in range(12)]
    result, out = _run(tmp_path, tmp_path / "llama", rows, type="embed", pooling="last")
    assert result.exit_code == 0, result.output
    assert read_outputs(out).column("error").null_count == len(rows)
    assert sum(pq.read_table(out / "stats" / "batches.parquet").column("splits").to_pylist()) == 0


def test_a_roberta_without_model_max_length_is_cut_to_its_position_table(tmp_path):
    """RoBERTa's positions start after its padding id, so its table holds
    max_position_embeddings - pad_token_id - 1 tokens; a tokenizer that does not say so (no
    model_max_length, as older fine-tunes ship) let rows past it fail, truncated ones too."""
    from transformers import AutoModel, AutoTokenizer, RobertaConfig

    tokenizer = train_tokenizer()
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=40,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "roberta")
    tokenizer.model_max_length = int(1e30)  # what a tokenizer without the setting reads as
    tokenizer.save_pretrained(tmp_path / "roberta")
    rows = [{"id": "long", "prompt": "word " * 200}, {"id": "short", "prompt": "a few words"}]
    result, out = _run(
        tmp_path, tmp_path / "roberta", rows, type="embed", pooling="mean", truncate=True
    )
    assert result.exit_code == 0, result.output
    table = {r["id"]: r for r in read_outputs(out).to_pylist()}
    assert all(r["error"] is None for r in table.values()), table
    limit = 40 - tokenizer.pad_token_id - 1
    assert table["long"]["prompt_tokens"] == limit
    ids = AutoTokenizer.from_pretrained(tmp_path / "roberta")(rows[0]["prompt"])["input_ids"]
    model = AutoModel.from_pretrained(tmp_path / "roberta").eval()
    with torch.no_grad():
        cut = torch.tensor([ids[:limit]])  # (this tokenizer appends no special token)
        want = model(input_ids=cut).last_hidden_state[0].mean(0).numpy()
    assert np.allclose(np.array(table["long"]["embedding"]), want, atol=1e-4)


@pytest.mark.parametrize("arch", ["big_bird", "xlnet", "xlm"])
def test_encoders_transformers_loads_as_causal_lms_are_refused_scoring(tmp_path, arch):
    """BigBird, XLNet and XLM load through AutoModelForCausalLM, but their tokens see the
    tokens after them: a score job exited 0 with numbers that were no log-likelihoods."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer()
    sizes = {
        "big_bird": dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            attention_type="original_full",
        ),
        "xlnet": dict(d_model=32, n_layer=1, n_head=4, d_inner=64),
        "xlm": dict(emb_dim=32, n_layers=1, n_heads=4),
    }[arch]
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    rows = [{"id": "a", "prompt": "The sky is blue"}]
    result, out = _run(tmp_path, tmp_path / arch, rows, type="score")
    assert result.exit_code == 2, result.output
    assert "encoder-only model" in result.output and "Traceback" not in result.output
