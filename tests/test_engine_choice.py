"""`model.engine: auto` weighs a job's planned tokens against compiling the fast engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from bulkinfer.engines.base import EngineLimits, LoadOptions
from bulkinfer.engines.compiling import compiled_marker
from bulkinfer.engines.select import AUTO_FAST_TOKENS_COLD, AUTO_FAST_TOKENS_WARM, by_job_size

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
GPU = EngineLimits("fast", "NVIDIA H200", "cuda", 2, pads=False, slots=256, kv_tokens=1 << 20)


def options(cache: Path, engine: str = "auto") -> LoadOptions:
    return LoadOptions(
        folder=cache, label="m", device="auto", dtype="auto", engine=engine, cache_dir=cache
    )


def test_a_small_job_runs_on_the_reference_engine_and_says_why(tmp_path):
    limits, why = by_job_size(GPU, options(tmp_path), CONFIG, 74_000)
    assert limits.kind == "reference" and limits.pads and limits.slots is None
    assert "74,000 planned tokens are too few" in why and "compiling it the first time" in why
    assert limits.why_not_fast == why

    limits, why = by_job_size(GPU, options(tmp_path), CONFIG, AUTO_FAST_TOKENS_COLD)
    assert limits == GPU and "pay back" in why


def test_a_cached_compilation_lowers_the_bar(tmp_path):
    between = (AUTO_FAST_TOKENS_WARM + AUTO_FAST_TOKENS_COLD) // 2
    assert by_job_size(GPU, options(tmp_path), CONFIG, between)[0].kind == "reference"
    marker = compiled_marker(tmp_path, GPU.device_name, CONFIG)
    marker.parent.mkdir(parents=True)
    marker.touch()
    limits, why = by_job_size(GPU, options(tmp_path), CONFIG, between)
    assert limits.kind == "fast" and "cached" in why
    # another model shape has not compiled
    other = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    assert by_job_size(GPU, options(tmp_path), other, between)[0].kind == "reference"


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_named_engine_is_never_second_guessed(tmp_path, engine):
    limits, why = by_job_size(GPU, options(tmp_path, engine), CONFIG, 10)
    assert limits == GPU and why is None


def test_the_cpu_and_encoders_are_not_weighed(tmp_path):
    cpu = EngineLimits("reference", "cpu", "cpu", 4, pads=True)
    assert by_job_size(cpu, options(tmp_path), CONFIG, 10) == (cpu, None)


def test_generation_weighs_the_reference_engines_decode_steps(tmp_path):
    """A generation job's reference plan runs each batch for its longest-asked row's steps:
    three batches of 64 steps on a 30-layer model outlast compiling; one of 16 does not."""
    deep = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30)
    limits, why = by_job_size(GPU, options(tmp_path), deep, 5_409, reference_steps=3 * 64)
    assert limits.kind == "fast" and "192 decode steps on the reference engine" in why
    limits, why = by_job_size(GPU, options(tmp_path), deep, 500, reference_steps=16)
    assert limits.kind == "reference" and "too few to pay back" in why


def test_generation_of_long_prompts_and_few_new_tokens_runs_on_the_fast_engine(tmp_path):
    """Few decode steps, but prompts whose prefill outweighs compiling (a few-shot job)."""
    deep = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30)
    limits, why = by_job_size(
        GPU, options(tmp_path), deep, AUTO_FAST_TOKENS_COLD, reference_steps=16
    )
    assert limits.kind == "fast" and "planned tokens pay back" in why


ROPE_BY_LENGTH = {
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 64,
    },
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


def _rope_model(tmp_path, rope):
    import torch
    from tiny_model import tiny_config, train_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    config = tiny_config("llama", tokenizer, 64, 2, 64, rope_parameters=ROPE_BY_LENGTH[rope])
    torch.manual_seed(0)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _scores(tmp_path, folder, rope, name, rows, engine="reference", **input_section):
    """Each row's score (logprob_sum, or choice_logprobs with choices) from a score job."""
    from conftest import cli, read_outputs, set_model, write_job, write_jsonl

    job = write_job(
        tmp_path / f"{name}.yaml",
        folder,
        write_jsonl(tmp_path / f"{name}.jsonl", rows),
        tmp_path / name,
        task={"type": "score"},
        input=input_section,
    )
    set_model(job, engine=engine, dtype="float32", max_context=512)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    assert f"each row runs in a call of its own: the model's rope_type {rope}" in result.output
    table = read_outputs(tmp_path / name)
    assert table.column("error").null_count == len(rows)
    column = "choice_logprobs" if input_section.get("choices_column") else "logprob_sum"
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True))


FOX = "the quick brown fox jumps over the lazy dog "


@pytest.mark.parametrize("rope", sorted(ROPE_BY_LENGTH))
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_rotary_scaling_by_length_keeps_each_rows_result_its_own(tmp_path, rope, engine):
    """transformers picks a dynamic or longrope scaling from a call's longest sequence: a short
    row scored beside a long one (one packed call on the fast engine, one padded batch on the
    reference) got another score than alone. Such a model's rows now run alone, and dynamic
    scaling's frequencies, which transformers keeps from a longer call, start afresh for each
    (the medium row, past the model's 64 positions, ran after the long one with its scaling)."""
    folder = _rope_model(tmp_path, rope)
    rows = {
        "short": {"id": "short", "prompt": "the quick brown fox jumps over"},
        "medium": {"id": "medium", "prompt": FOX * 8},
        "long": {"id": "long", "prompt": FOX * 12},
    }
    together = _scores(tmp_path, folder, rope, "together", list(rows.values()), engine)
    for name, row in rows.items():
        alone = _scores(tmp_path, folder, rope, f"alone-{name}", [row], engine)
        assert together[name] == pytest.approx(alone[name], rel=1e-6), name


@pytest.mark.parametrize("rope", sorted(ROPE_BY_LENGTH))
def test_a_rotary_scaling_by_length_scores_each_choice_alone(tmp_path, rope):
    """A row's choices ran in one call after its context: each choice's positions were scaled by
    the longest choice's length. Each choice now scores as its context and it scored alone."""
    folder = _rope_model(tmp_path, rope)
    question = {"id": "q", "prompt": FOX * 5, "choices": [" cat", " and the dog" * 6]}
    got = _scores(tmp_path, folder, rope, "choices", [question], choices_column="choices")["q"]
    pairs = [
        {"id": str(k), "prompt": question["prompt"], "completion": choice}
        for k, choice in enumerate(question["choices"])
    ]
    alone = _scores(tmp_path, folder, rope, "pairs", pairs, completion_column="completion")
    assert got == pytest.approx([alone["0"], alone["1"]], rel=1e-6)


def test_a_llama_config_naming_a_window_decodes_as_its_forward_does(tmp_path, tiny_model):
    """transformers' cache for a config drops keys past its `sliding_window`, even where the
    architecture's attention has no window (llama's): the reference engine's decode saw only
    the last window and its tokens differed from the model's own forward and the fast
    engine's. Both engines now equal greedy decoding by whole forwards."""
    import json
    import shutil

    import torch
    from conftest import cli, read_outputs, sample_prompts, use_engine, write_job, write_jsonl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "windowed"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    rows = sample_prompts(4)
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    texts = {}
    for engine in ("reference", "fast"):
        job = write_job(
            tmp_path / f"{engine}.yaml",
            folder,
            inputs,
            tmp_path / engine,
            task={"max_new_tokens": 6, "chat_template": "never"},
        )
        assert cli("run", str(use_engine(job, engine))).exit_code == 0
        texts[engine] = read_outputs(tmp_path / engine).column("text").to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = []
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(6):
                ids = torch.cat([ids, hf(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        expected.append(tokenizer.decode(ids[0, start:], skip_special_tokens=True))
    assert texts["reference"] == expected
    assert texts["fast"] == expected


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_a_longrope_model_decodes_past_its_switch_as_its_forward_does(tmp_path, arch):
    """transformers rotates a longrope model's positions by its long factors once a call
    reaches `original_max_position_embeddings`; keys cached before were rotated by the short
    ones, so decoding past that point drifted from a forward of the same text (and from
    Phi-3's own generation, which computes the whole sequence again there). Greedy tokens now
    equal greedy decoding by whole forwards, for prompts that start short and past it."""
    import torch
    from conftest import cli, read_outputs, set_model, write_job, write_jsonl
    from tiny_model import tiny_config, train_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    rope = dict(ROPE_BY_LENGTH["longrope"], long_factor=[1.0, 2, 3, 4, 5, 6, 7, 8])
    # weights large enough for attention, and so positions, to decide the greedy tokens
    config = tiny_config(arch, tokenizer, 64, 2, 256, rope_parameters=rope, initializer_range=0.2)
    if arch == "phi3":
        config.original_max_position_embeddings = rope["original_max_position_embeddings"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = [FOX * 4, FOX * 9]  # ~40 and ~90 tokens: the switch is at position 64
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    assert ids[0].shape[1] < 64 - 10 and ids[1].shape[1] > 64
    job = write_job(
        tmp_path / "job.yaml",
        folder,
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts]),
        tmp_path / "out",
        task={"max_new_tokens": 40, "chat_template": "never", "logprobs": True},
    )
    set_model(job, engine="reference", dtype="float32", max_context=256)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    tokens = read_outputs(tmp_path / "out").column("token_ids").to_pylist()
    for row, start in zip(tokens, ids, strict=True):
        seq = start
        with torch.no_grad():
            for _ in range(len(row)):
                nxt = model(seq, use_cache=False).logits[:, -1:].argmax(-1)
                seq = torch.cat([seq, nxt], 1)
        assert row == seq[0, start.shape[1] :].tolist()


# Architectures whose logits are more than the LM head over the last hidden states, by a
# config key the engine had no name for (each built at toy size; falcon_h1 a Mamba hybrid)
HEAD_TRANSFORMS = {
    "falcon_h1": dict(
        lm_head_multiplier=0.5,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=16,
        head_dim=16,
        num_key_value_heads=2,
    ),
    "recurrent_gemma": dict(
        num_hidden_layers=3,
        lru_width=64,
        attention_window_size=16,
        head_dim=16,
        num_key_value_heads=1,
        logits_soft_cap=3.0,
        block_types=["recurrent", "recurrent", "attention"],
    ),
}


def _toy_model(tmp_path, arch: str, settings: dict | None = None):
    """A toy model of `arch` (`settings`, by default HEAD_TRANSFORMS') saved with its
    tokenizer: the tokenizer, the model and its folder; skipped where this transformers lacks
    the type."""
    import torch
    from tiny_model import train_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if arch not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {arch}")
    tokenizer = train_tokenizer()
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    shape.update(num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **{**shape, **(HEAD_TRANSFORMS[arch] if settings is None else settings)},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer, model, folder


@pytest.mark.parametrize("arch", sorted(HEAD_TRANSFORMS))
def test_scores_go_through_a_logit_transform_the_config_names_its_own_way(tmp_path, arch):
    """Scoring ran the LM head over the base model's hidden states unless the config had one of
    four known keys: falcon_h1's lm_head_multiplier and recurrent_gemma's logits_soft_cap were
    skipped, and every score was off by nats. Each score now equals the model's own forward."""
    import torch
    from conftest import cli, read_outputs, set_model, write_job, write_jsonl

    tokenizer, model, folder = _toy_model(tmp_path, arch)
    prompts = [FOX, FOX * 3, "the lazy dog"]
    job = write_job(
        tmp_path / "job.yaml",
        folder,
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts]),
        tmp_path / "out",
        task={"type": "score", "chat_template": "never"},
    )
    set_model(job, engine="reference", dtype="float32")
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    table = read_outputs(tmp_path / "out")
    assert table.column("error").null_count == len(prompts)
    for prompt, got in zip(prompts, table.column("logprob_sum").to_pylist(), strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits.float()
        want = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum().item()
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("arch", sorted(HEAD_TRANSFORMS))
def test_a_model_with_a_recurrent_state_scores_choices_and_is_refused_generating(tmp_path, arch):
    """Mamba hybrids and recurrent Gemma carry a state between tokens that the reference
    engine's KV cache does not hold: generation failed on every row (falcon_h1) or went wrong
    from its second token (recurrent_gemma), and choices reused a prefix cache they cannot
    share. Generation is now refused in one line before any weights load, by validate too, and
    each choice is scored whole, as the model's own forward scores it."""
    from conftest import cli, read_outputs, set_model, write_job, write_jsonl

    _, _, folder = _toy_model(tmp_path, arch)
    question = {"id": "q", "prompt": FOX * 2, "choices": [" cat", " and the lazy dog" * 3]}
    pairs = [
        {"id": str(k), "prompt": question["prompt"], "completion": choice}
        for k, choice in enumerate(question["choices"])
    ]
    scores = {}
    for name, rows, section in (
        ("choices", [question], {"choices_column": "choices"}),
        ("pairs", pairs, {"completion_column": "completion"}),
    ):
        job = write_job(
            tmp_path / f"{name}.yaml",
            folder,
            write_jsonl(tmp_path / f"{name}.jsonl", rows),
            tmp_path / name,
            task={"type": "score", "chat_template": "never"},
            input=section,
        )
        set_model(job, engine="reference", dtype="float32")
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        table = read_outputs(tmp_path / name)
        assert table.column("error").null_count == len(rows)
        column = "choice_logprobs" if name == "choices" else "logprob_sum"
        scores[name] = table.column(column).to_pylist()
    assert scores["choices"][0] == pytest.approx(scores["pairs"], rel=1e-5)
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": FOX}])
    for weights in folder.glob("*.safetensors"):  # refused before they load
        weights.write_bytes(b"not weights")
    generate = write_job(tmp_path / "gen.yaml", folder, rows, tmp_path / "gen")
    for command in ("validate", "run"):
        refused = cli(command, str(generate))
        assert refused.exit_code == 2, refused.output
        line = refused.output.strip()
        assert "\n" not in line and "recurrent state" in line and "not generate" in line, line


@pytest.mark.parametrize(
    ("layers", "recurrent"),
    [
        (["hybrid", "hybrid_sliding"], True),  # zaya, inkling: attention with a state beside
        (["linear_attention", "full_attention"], True),  # qwen3_next
        (["conv", "full_attention"], True),  # lfm2
        (["sliding_attention", "full_attention"], False),  # gemma3, cohere2
        (["full_attention", "chunked_attention"], False),  # llama4
    ],
)
def test_a_recurrent_state_is_found_by_the_kinds_of_a_models_layers(layers, recurrent):
    """A model type bulkinfer has no name for is judged by its layer kinds: any layer that keeps
    a state between tokens makes it one that scores but does not generate."""
    from types import SimpleNamespace

    from bulkinfer.configs import recurrent_state

    config = SimpleNamespace(model_type="unnamed", layer_types=layers)
    assert (recurrent_state(config) is not None) == recurrent


def test_a_model_whose_base_model_is_itself_scores_by_its_hidden_states_and_embeds(tmp_path):
    """Llama 4's text model names a base-model prefix it has no module for, so transformers'
    base_model is the whole model: scoring fell back to full float32 logits over its ~200k
    vocabulary and embedding failed on every row. Its trunk is its `model`: scores equal the
    model's own forward and embeddings its last hidden states, pooled."""
    import torch
    import yaml
    from conftest import cli, read_outputs, set_model, write_job, write_jsonl

    from bulkinfer.engines.hf import head_gives_logits

    settings = dict(
        intermediate_size_mlp=128, num_key_value_heads=2, head_dim=16, num_local_experts=2
    )
    tokenizer, model, folder = _toy_model(tmp_path, "llama4_text", settings)
    assert model.base_model is model and head_gives_logits(model)
    prompts = [FOX, "the lazy dog"]
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])
    got = {}
    for kind in ("score", "embed"):
        job = write_job(
            tmp_path / f"{kind}.yaml",
            folder,
            rows,
            tmp_path / kind,
            task={"type": kind, "chat_template": "never"},
        )
        set_model(job, engine="reference", dtype="float32")
        spec = yaml.safe_load(job.read_text())
        if kind == "embed":
            spec["task"].pop("max_new_tokens")
            spec["task"].update(pooling="mean", normalize=False)
        job.write_text(yaml.safe_dump(spec))
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        table = read_outputs(tmp_path / kind)
        assert table.column("error").null_count == len(prompts)
        got[kind] = table
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits.float()
            hidden = model.model(ids).last_hidden_state[0]
        want = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum().item()
        assert got["score"].column("logprob_sum")[i].as_py() == pytest.approx(want, rel=1e-4)
        embedding = torch.tensor(got["embed"].column("embedding")[i].as_py())
        assert torch.allclose(embedding, hidden.mean(0), atol=1e-4)
