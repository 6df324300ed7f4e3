"""The weights read onto the device during a run's set-up (engines/read_ahead.py): a model built
from them is the one transformers loads, and a job gives the same outputs with and without it.

A run onto a CUDA device reads ahead unless BULKINFER_READ_AHEAD=0; BULKINFER_READ_AHEAD=1 asks
for it on any device: here it reads onto the CPU, so that what the loader builds from it is
checked where the tests run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_subprocess, fast_job, read_outputs
from tiny_model import build_tiny_model, tiny_config, train_tokenizer

CPU = torch.device("cpu")


def _read_ahead(folder):
    from bulkinfer.engines import read_ahead

    read_ahead.start(folder, "cpu", fp8=False)
    return read_ahead.take(folder, CPU, fp8=False)


def _by_tensor(folder, dtype: str):
    from bulkinfer.engines.base import LoadOptions
    from bulkinfer.engines.select import by_tensor

    options = LoadOptions(folder=folder, label=str(folder), device="cpu", dtype=dtype)
    return by_tensor(options, _read_ahead(folder))


def _same_model(ours, theirs) -> None:
    """Every parameter and buffer equal, bit for bit, in the same dtype; the same logits."""
    for kind in ("named_parameters", "named_buffers"):
        a = dict(getattr(ours, kind)(remove_duplicate=False))
        b = dict(getattr(theirs, kind)(remove_duplicate=False))
        assert a.keys() == b.keys(), kind
        for name, tensor in a.items():
            assert tensor.dtype == b[name].dtype and torch.equal(tensor, b[name]), name
    assert ours.generation_config.eos_token_id == theirs.generation_config.eos_token_id
    assert not ours.training
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_built_from_the_read_ahead_is_the_one_transformers_loads(tmp_path, arch, dtype):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / arch, arch=arch)
    ours = _by_tensor(folder, dtype)
    assert ours is not None
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    _same_model(ours, theirs)


def test_tied_embeddings_stay_one_tensor(tmp_path):
    """A checkpoint that stores the embedding once (tie_word_embeddings): the LM head is the
    embedding, as transformers ties it."""
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    config = tiny_config("qwen2", tokenizer, 32, 2, 512)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    ours = _by_tensor(tmp_path / "tied", "float32")
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    _same_model(ours, AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval())


def _renamed(folder):
    """The checkpoint saved under the base model's names (no `model.` prefix), which
    transformers' loader maps and a load by name cannot."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = {k.removeprefix("model."): v for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    return folder


def test_a_checkpoint_named_otherwise_is_left_to_transformers(tmp_path):
    folder = _renamed(build_tiny_model(tmp_path / "renamed"))
    assert _by_tensor(folder, "float32") is None


def _run(tmp_path, model, name: str, ahead: str, **model_keys):
    job = fast_job(tmp_path, model, name, **model_keys)
    result = cli_subprocess("run", str(job), env={"BULKINFER_READ_AHEAD": ahead})
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    return read_outputs(tmp_path / name), summary


@pytest.mark.parametrize("model_keys", [{}, {"quantization": "fp8"}], ids=["bf16", "fp8"])
def test_a_job_gives_the_same_outputs_with_its_weights_read_ahead(tmp_path, tiny_model, model_keys):
    """The command with the weights read ahead (onto the CPU here) and without: the same
    outputs; the summary says where the read-ahead was used."""
    plain, plain_summary = _run(tmp_path, tiny_model, "plain", "0", **model_keys)
    ahead, ahead_summary = _run(tmp_path, tiny_model, "ahead", "1", **model_keys)
    assert ahead.equals(plain)
    assert "read_ahead_seconds" not in plain_summary
    assert ahead_summary["read_ahead_seconds"] >= 0


def test_a_renamed_checkpoint_runs_the_same_with_the_read_ahead(tmp_path):
    """Where the load by name cannot build the model, transformers loads it as before: the job
    runs, with the same outputs, and the summary says no read-ahead was used."""
    folder = _renamed(build_tiny_model(tmp_path / "renamed"))
    plain, _ = _run(tmp_path, folder, "plain", "0")
    ahead, summary = _run(tmp_path, folder, "ahead", "1")
    assert ahead.equals(plain)
    assert "read_ahead_seconds" not in summary


def _saved_tensors(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _save_tensors(tensors, file) -> None:
    from safetensors.torch import save_file

    save_file(tensors, file, metadata={"format": "pt"})


def test_only_the_files_transformers_reads_are_read(tmp_path):
    """A folder with another safetensors file beside model.safetensors (an EMA copy under the
    same names): the model is built from model.safetensors, as transformers builds it."""
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "extra")
    tensors = {k: v + 1 for k, v in _saved_tensors(folder).items()}
    _save_tensors(tensors, folder / "model_ema.safetensors")
    ours = _by_tensor(folder, "float32")
    _same_model(ours, AutoModelForCausalLM.from_pretrained(folder).eval())


def test_shards_without_their_index_are_left_to_transformers(tmp_path):
    folder = build_tiny_model(tmp_path / "noindex")
    tensors = _saved_tensors(folder)
    names = sorted(tensors)
    _save_tensors({k: tensors[k] for k in names[::2]}, folder / "model-00001-of-00002.safetensors")
    _save_tensors({k: tensors[k] for k in names[1::2]}, folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors").unlink()
    assert _by_tensor(folder, "float32") is None


def test_a_tensor_of_another_shape_is_refused_not_broadcast(tmp_path):
    """A stored tensor whose shape is not the config's (a norm of one value): transformers
    refuses it; the load by name does not broadcast it into the model (bf16 leaves the load
    to transformers, fp8 says which tensor in one line)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bulkinfer.engines.fp8_loading import load_fp8_model
    from bulkinfer.errors import ModelError

    folder = build_tiny_model(tmp_path / "shape")
    tensors = _saved_tensors(folder)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:1].clone()
    _save_tensors(tensors, folder / "model.safetensors")
    assert _by_tensor(folder, "float32") is None
    config = AutoConfig.from_pretrained(folder)
    with pytest.raises(ModelError, match=r"model\.norm\.weight is stored with shape \[1\]"):
        load_fp8_model(AutoModelForCausalLM, folder, config, torch.float32, CPU, "shape")


def test_embeddings_stored_apart_stay_apart_where_the_config_ties_them(tmp_path):
    """tie_word_embeddings with both embeddings stored, differing: transformers keeps them
    apart, and so does the job with its weights read ahead."""
    folder = build_tiny_model(tmp_path / "both")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert _by_tensor(folder, "float32") is None
    plain, _ = _run(tmp_path, folder, "plain", "0")
    ahead, _ = _run(tmp_path, folder, "ahead", "1")
    assert ahead.equals(plain)


def test_an_fp8_job_that_names_an_attention_implementation_still_runs(tmp_path, tiny_model):
    """The fast engine runs its own attention: a named implementation (not installed here) is
    not asked of transformers while fp8 builds the model."""
    outputs, _ = _run(
        tmp_path,
        tiny_model,
        "named",
        "1",
        quantization="fp8",
        attn_implementation="flash_attention_2",
    )
    assert outputs.num_rows == 12


def test_it_is_on_by_default_for_a_gpu_only(tmp_path, tiny_model, monkeypatch):
    """Measured on an H100 (docs/perf.md, 2026-12-07): on by default for a CUDA device, off
    for the CPU unless asked; BULKINFER_READ_AHEAD=0 turns it off; never for the reference
    engine or an embed job."""
    from bulkinfer.engines.read_ahead import READ_AHEAD_ENV, wanted

    monkeypatch.delenv(READ_AHEAD_ENV, raising=False)
    gpu = torch.cuda.is_available()
    assert wanted(tiny_model, "auto", None, True, "auto") is gpu
    assert wanted(tiny_model, "auto", None, True, "cpu") is False
    monkeypatch.setenv(READ_AHEAD_ENV, "1")
    assert wanted(tiny_model, "auto", None, True, "cpu") is True
    assert wanted(tiny_model, "reference", None, True, "cpu") is False
    assert wanted(tiny_model, "auto", None, False, "cpu") is False
    monkeypatch.setenv(READ_AHEAD_ENV, "0")
    assert wanted(tiny_model, "auto", None, True, "auto") is False
