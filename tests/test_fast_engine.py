"""The fast engine (packed scoring, continuous-batching decode from a KV pool) computes what the
reference engine computes: the same scores within float32 rounding and the same tokens, greedy
and sampled, whatever rows share the pool with a row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import cli, read_outputs, sample_prompts, write_job, write_jsonl
from tiny_model import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from bulkinfer.engines.decoder import Decoder
from bulkinfer.engines.fast import GPU_SLOTS, SLOTS_ENV, FastEngine, decode_bucket, gpu_slots
from bulkinfer.engines.hf import HFEngine
from bulkinfer.engines.kv import RegionAllocator
from bulkinfer.engines.sampling import SamplingParams, row_key
from bulkinfer.engines.select import engine_around


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3"])
def engines(request, tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("m") / request.param, arch=request.param)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # few slots, so rows queue, finish at different steps and their regions are reused
    return engine_around(model, tokenizer, "reference"), engine_around(model, tokenizer, slots=5)


def random_sequences(n: int, vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, int(rng.integers(1, 50))) for _ in range(n)]


@pytest.mark.parametrize("piece_tokens", [None, 40], ids=["one-forward", "40-token-pieces"])
def test_packed_scores_equal_the_padded_reference(engines, piece_tokens, monkeypatch):
    """Also when the batch runs as several packed forwards of whole sequences (a sequence
    longer than a piece is a piece of its own)."""
    reference, fast = engines
    if piece_tokens:
        monkeypatch.setattr(fast, "forward_tokens", piece_tokens)
    assert isinstance(fast, FastEngine) and fast.limits.kind == "fast" and not fast.limits.pads
    seqs = random_sequences(17, fast.model.config.vocab_size, seed=1)
    starts = [int(s) for s in np.random.default_rng(2).integers(0, 40, len(seqs))]
    ours, theirs = fast.loglikelihood(seqs, starts), reference.loglikelihood(seqs, starts)
    for (a, n), (b, m) in zip(ours, theirs, strict=True):
        assert n == m
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(24),
        SamplingParams(24, temperature=0.9, top_p=0.9, top_k=40, seed=7),
        SamplingParams(24, temperature=1.2, seed=3, stop=("e",)),
        SamplingParams(24, ignore_eos=True),
    ],
    ids=["greedy", "sampled", "stop-string", "ignore-eos"],
)
def test_generations_equal_the_reference_token_for_token(engines, params):
    reference, fast = engines
    seqs = random_sequences(13, fast.model.config.vocab_size, seed=3)
    keys = [row_key(params.seed, i) for i in range(len(seqs))]
    limits = [int(x) for x in np.random.default_rng(4).integers(1, 24, len(seqs))]
    theirs = reference.generate(seqs, keys, params, limits)
    assert fast.generate(seqs, keys, params, limits) == theirs
    # a row alone decodes what it decoded among others
    assert fast.generate(seqs[5:6], keys[5:6], params, limits[5:6]) == theirs[5:6]


def test_unsupported_models_take_the_reference_path(tmp_path):
    folder = build_tiny_model(tmp_path / "gemma2", arch="gemma2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fast = engine_around(model, tokenizer, "fast")
    assert type(fast) is HFEngine and fast.limits.kind == "reference"
    assert "gemma2" in fast.limits.why_not_fast
    seqs = random_sequences(3, model.config.vocab_size, seed=5)
    reference = engine_around(model, tokenizer, "reference")
    params = SamplingParams(5)
    keys = [1, 2, 3]
    assert fast.generate(seqs, keys, params, [5] * 3) == reference.generate(
        seqs, keys, params, [5] * 3
    )


def test_unsupported_models_score_on_the_reference_path(tmp_path):
    folder = build_tiny_model(tmp_path / "neox", arch="gpt_neox")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fast = engine_around(model, tokenizer, "fast")
    assert type(fast) is HFEngine and fast.limits.kind == "reference"
    reference = engine_around(model, tokenizer, "reference")
    seqs = random_sequences(4, model.config.vocab_size, seed=9)
    assert fast.loglikelihood(seqs, [1] * 4) == reference.loglikelihood(seqs, [1] * 4)


def test_layers_the_fast_engine_cannot_run_fall_back_once_loaded(tmp_path):
    """A supported config whose weights hold a projection that is not a plain Linear (as a
    quantized one would be) runs on the reference engine around the same weights."""

    class OtherLinear(torch.nn.Linear):
        pass

    folder = build_tiny_model(tmp_path / "llama", arch="llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    attn = model.model.layers[0].self_attn
    other = OtherLinear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    other.load_state_dict(attn.q_proj.state_dict())
    attn.q_proj = other
    engine = engine_around(model, tokenizer, "fast")
    assert type(engine) is HFEngine and engine.model is model
    assert engine.limits.kind == "reference" and engine.limits.pads
    assert "Linear" in engine.limits.why_not_fast


def test_region_allocator_reuses_and_coalesces_freed_regions():
    pool = RegionAllocator(100, reserved=1)
    a, b, c = pool.allocate(30), pool.allocate(30), pool.allocate(30)
    assert (a, b, c) == (1, 31, 61) and pool.allocate(10) is None
    pool.release(b, 30)
    assert pool.allocate(31) is None and pool.largest == 30
    pool.release(a, 30)
    pool.release(c, 30)
    assert pool.free == [(1, 100)] and pool.allocate(99) == 1


def test_decode_slots_set_by_the_environment_stay_within_the_buckets(monkeypatch):
    assert gpu_slots() == GPU_SLOTS
    for asked, slots in [("2048", 2048), ("1500", 1500), ("4096", GPU_SLOTS), ("x", GPU_SLOTS)]:
        monkeypatch.setenv(SLOTS_ENV, asked)
        assert gpu_slots() == slots
    # a step computes the smallest bucket holding its rows, never more than the slots
    assert [decode_bucket(r, 1500) for r in (5, 1025, 1300, 1499)] == [8, 1280, 1500, 1500]
    assert decode_bucket(1025, 1024) == 1024


@pytest.mark.parametrize("task", [{"type": "score"}, {"type": "generate", "max_new_tokens": 7}])
def test_the_cli_gives_the_same_outputs_with_either_engine(tmp_path, tiny_model, task):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(30))
    tables = {}
    for engine in ("fast", "reference"):
        job = write_job(
            tmp_path / f"{engine}.yaml",
            tiny_model,
            inputs,
            tmp_path / engine,
            task=task,
        )
        spec = yaml.safe_load(job.read_text())
        spec["model"]["engine"] = engine
        job.write_text(yaml.safe_dump(spec))
        result = cli("run", str(job))
        assert result.exit_code == 0, result.output
        tables[engine] = read_outputs(tmp_path / engine)
    fast, reference = tables["fast"].to_pydict(), tables["reference"].to_pydict()
    for name, values in reference.items():
        if name in ("logprob_sum", "logprob_mean", "perplexity"):
            assert fast[name] == pytest.approx(values, rel=1e-5)
        else:
            assert fast[name] == values, name


def test_per_row_settings_and_logprobs_equal_the_reference(engines):
    reference, fast = engines
    seqs = random_sequences(9, fast.model.config.vocab_size, seed=6)
    params = [
        SamplingParams(
            12,
            temperature=[0.0, 0.7, 1.3][i % 3],
            top_k=[0, 5][i % 2],
            seed=2,
            stop=("a",) if i % 4 == 0 else (),
        )
        for i in range(len(seqs))
    ]
    keys = [row_key(2, i) for i in range(len(seqs))]
    limits = [12 - i for i in range(len(seqs))]
    theirs = reference.generate(seqs, keys, params, limits, logprobs=True)
    ours = fast.generate(seqs, keys, params, limits, logprobs=True)
    assert [(g.tokens, g.finish_reason) for g in ours] == [
        (g.tokens, g.finish_reason) for g in theirs
    ]
    for a, b in zip(ours, theirs, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_one_compiled_graph_serves_every_layer_and_batch_size(engines):
    """The written-out forward traced whole by torch.compile (fullgraph; the eager-running
    aot_eager backend, so CI needs no compiler): four graphs, whatever the layer or the number of
    tokens, and the same scores and tokens as the reference engine."""
    from torch._dynamo.utils import counters

    reference, fast = engines
    torch._dynamo.reset()
    counters.clear()
    compiled = FastEngine(fast.model, fast.tokenizer, fast.limits)
    compiled.decoder = Decoder(fast.model, backend="aot_eager")
    seqs = random_sequences(11, fast.model.config.vocab_size, seed=7)
    ours, theirs = compiled.loglikelihood(seqs, [1] * 11), reference.loglikelihood(seqs, [1] * 11)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], rel=1e-5)
    keys, params, limits = [row_key(0, i) for i in range(11)], SamplingParams(9), [9] * 11
    assert compiled.generate(seqs, keys, params, limits) == reference.generate(
        seqs, keys, params, limits
    )
    # before attention, after attention, the final norm, the scoring head
    assert counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "arch,extra",
    [
        (
            "llama",
            dict(
                attention_bias=True,
                mlp_bias=True,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        ),
        ("mistral", dict(sliding_window=None, head_dim=16)),
        ("qwen3", dict(tie_word_embeddings=True, head_dim=24)),
    ],
    ids=["llama-biases-llama3-rope", "mistral-no-window-wide-heads", "qwen3-tied"],
)
def test_the_written_out_forward_matches_transformers_on_other_shapes(arch, extra):
    """Biases on every projection, llama3 rope scaling, a head_dim that is not hidden/heads,
    tied embeddings: the fast path computes what transformers computes."""
    from tiny_model import train_tokenizer
    from transformers import AutoConfig

    tokenizer = train_tokenizer()
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"head_dim": 12, "tie_word_embeddings": False, **extra},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases are zero at init: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
        model.get_output_embeddings().weight.mul_(20.0)
    reference = engine_around(model, tokenizer, "reference")
    fast = engine_around(model, tokenizer, "fast")
    assert fast.limits.kind == "fast", fast.limits.why_not_fast
    seqs = random_sequences(9, config.vocab_size, seed=8)
    ours, theirs = fast.loglikelihood(seqs, [1] * 9), reference.loglikelihood(seqs, [1] * 9)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], rel=1e-5, abs=1e-5)
    keys, params, limits = [row_key(0, i) for i in range(9)], SamplingParams(10), [10] * 9
    assert fast.generate(seqs, keys, params, limits) == reference.generate(
        seqs, keys, params, limits
    )


def test_a_compiler_that_fails_leaves_the_forward_unfused(engines, capsys):
    """A machine that cannot build the fused kernels still runs the job, with one warning."""
    reference, fast = engines

    def broken_compiler(graph, example_inputs):
        raise RuntimeError("no working compiler here")

    torch._dynamo.reset()
    unfused = FastEngine(fast.model, fast.tokenizer, fast.limits)
    unfused.decoder = Decoder(fast.model, backend=broken_compiler)
    seqs = random_sequences(5, fast.model.config.vocab_size, seed=10)
    ours, theirs = unfused.loglikelihood(seqs, [1] * 5), reference.loglikelihood(seqs, [1] * 5)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], rel=1e-5)
    assert capsys.readouterr().err.count("compiling the fused forward failed (") == 1
    torch._dynamo.reset()


def test_engines_of_many_models_in_one_process_all_compile(tmp_path):
    """The layer functions of every engine share their source: dynamo keeps 8 compiled
    variants of one code object, and a process that built engines for a few models and
    settings (a notebook running jobs in turn) failed the next job's first forward. Each
    engine's functions now compile on their own, and none falls back to running unfused."""
    from tiny_model import train_tokenizer
    from transformers import AutoConfig

    tokenizer = train_tokenizer()
    ids = torch.tensor(random_sequences(1, len(tokenizer), seed=3)[0])
    positions = torch.arange(len(ids))

    def attend(layer, q, k, v):  # one causal sequence, grouped heads repeated
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
        )
        return out.transpose(0, 1)

    variants = 0
    for arch in ("llama", "qwen2", "qwen3"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for heads in (4, 8)[: 1 + (arch == "llama")]:
                config = AutoConfig.for_model(
                    arch,
                    vocab_size=len(tokenizer),
                    hidden_size=32,
                    intermediate_size=48,
                    num_hidden_layers=2,
                    num_attention_heads=heads,
                    num_key_value_heads=2,
                    head_dim=8,
                )
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
                with torch.no_grad():
                    compiled = Decoder(model, backend="eager")
                    got = compiled.hidden(ids, positions, attend)
                    want = Decoder(model).hidden(ids, positions, attend)
                assert not compiled.fell_back, (arch, dtype, heads)
                assert torch.equal(got, want), (arch, dtype, heads)
                variants += 1
    assert variants > 8  # more than dynamo keeps of one code object
