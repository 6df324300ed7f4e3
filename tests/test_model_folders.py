"""Model folders that load but would give wrong results: weights missing, an encoder asked to
generate, a generation_config.json that is broken or odd, a pad id past the embedding table.
Each is refused in one line, or runs as the model's own files mean it to."""

from __future__ import annotations

import json
import shutil

from conftest import cli, read_outputs, sample_prompts, write_job, write_jsonl
from tiny_model import build_tiny_encoder


def _copy(tiny_model, tmp_path, name: str):
    folder = tmp_path / name
    shutil.copytree(tiny_model, folder)
    return folder


def _job(tmp_path, model, name: str, task: dict | None = None):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(8))
    task = task or {"max_new_tokens": 4}
    return write_job(tmp_path / f"{name}.yaml", model, inputs, tmp_path / name, task=task)


def test_a_checkpoint_without_a_weight_is_refused_not_filled_at_random(tmp_path, tiny_model):
    """transformers fills a missing weight with random values, new ones each run: the run
    exited 0 with nonsense, and a resumed job mixed rows of two random models."""
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_model, tmp_path, "no-head")
    assert not json.loads((model / "config.json").read_text()).get("tie_word_embeddings")
    weights = load_file(model / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    for task in ({"max_new_tokens": 4}, {"type": "score"}):
        result = cli("run", str(_job(tmp_path, model, f"out-{len(task)}", task)))
        assert result.exit_code == 2, result.output
        assert "lacks weights the model needs (missing lm_head.weight)" in result.output


def test_an_encoder_is_refused_for_generate_and_score(tmp_path):
    """A BERT folder loaded as BertLMHeadModel: bidirectional attention (a row's scores saw the
    tokens after each position) and a random head, and the run exited 0."""
    model = build_tiny_encoder(tmp_path / "bert", arch="bert")
    for command in ("validate", "run"):
        result = cli(command, str(_job(tmp_path, model, f"out-{command}")))
        assert result.exit_code == 2, result.output
        assert "is an encoder-only model (bert)" in result.output
        assert "use task.type embed or classify" in result.output


def test_a_generation_config_that_is_no_json_is_refused(tmp_path, tiny_model):
    """transformers passes over it, and generation ran past the end-of-text ids it holds."""
    model = _copy(tiny_model, tmp_path, "bad-gen")
    (model / "generation_config.json").write_text('{"eos_token_id": [2, 5],}')
    result = cli("validate", str(_job(tmp_path, model, "out")))
    assert result.exit_code == 2, result.output
    assert "generation_config.json is not valid JSON" in result.output


def test_odd_ids_in_a_generation_config_run_as_the_valid_ones_say(tmp_path, tiny_model):
    """An end-of-text list with a null in it failed with a traceback; a pad id of -1 (some
    conversions ship it) made every padded batch fail and rerun one row at a time."""
    reference = cli("run", str(_job(tmp_path, tiny_model, "plain")))
    assert reference.exit_code == 0, reference.output
    model = _copy(tiny_model, tmp_path, "odd-ids")
    generation = json.loads((model / "generation_config.json").read_text())
    eos = generation.get("eos_token_id")
    generation["eos_token_id"] = [*(eos if isinstance(eos, list) else [eos]), None]
    generation["pad_token_id"] = -1
    (model / "generation_config.json").write_text(json.dumps(generation))
    config = json.loads((model / "config.json").read_text())
    config["pad_token_id"] = -1
    (model / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    job = _job(tmp_path, model, "odd")
    result = cli("run", str(job), "--set", "model.engine=reference")
    assert result.exit_code == 0, result.output
    assert "one at a time" not in result.output, result.output
    got, want = read_outputs(tmp_path / "odd"), read_outputs(tmp_path / "plain")
    assert got.column("text").to_pylist() == want.column("text").to_pylist()


def test_plan_finds_a_weight_shard_missing(tmp_path, tiny_model):
    """validate and plan said OK, and run failed only as it loaded the weights."""
    sharded = _copy(tiny_model, tmp_path, "sharded")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for command in ("validate", "plan"):
        result = cli(command, str(_job(tmp_path, sharded, f"out-{command}")))
        assert result.exit_code == 2, result.output
        assert "names model-00002-of-00002.safetensors, not in" in result.output


def test_an_index_left_beside_whole_weights_is_passed_over(tmp_path, tiny_model):
    """save_pretrained leaves an older save's index behind when it saves the model whole into
    the same folder; transformers loads model.safetensors then, and so does a run."""
    model = _copy(tiny_model, tmp_path, "left-index")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("run", str(_job(tmp_path, model, "out")))
    assert result.exit_code == 0, result.output
    assert read_outputs(tmp_path / "out").num_rows == 8


def test_a_converted_model_names_a_tied_weight_as_the_embeddings_and_keeps_untied_ones():
    """A GGUF conversion saves every tensor once: a weight the LM head shares with the
    embeddings under the embeddings' name (the bare model `embed` loads has no head), and
    untied heads and embeddings both."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bulkinfer.model_files import named_once

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    for tied in (True, False):
        config.tie_word_embeddings = tied
        model = LlamaForCausalLM(config)
        kept = named_once(model)
        assert "model.embed_tokens.weight" in kept
        assert ("lm_head.weight" in kept) is not tied
        assert len(kept) == len(model.state_dict()) - tied
        for name, tensor in kept.items():
            assert torch.equal(tensor, model.state_dict()[name])
