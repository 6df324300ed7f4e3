"""Tokenizers unlike the fixtures' byte-level BPE: a Llama-2-style SentencePiece conversion
(whose decoder strips a text's leading space, with byte-fallback pieces) and WordPiece."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, read_outputs, use_engine, write_job, write_jsonl
from tiny_model import tiny_config, train_sentencepiece_like_tokenizer, train_wordpiece_tokenizer
from transformers import AutoModelForCausalLM


def _model(folder, tokenizer, arch="llama"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer, 32, 2, 256))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_structured_output_and_logprob_tokens_with_a_sentencepiece_tokenizer(tmp_path):
    """The grammar library's view was checked against each token decoded alone, which drops
    `▁London`'s space: every such tokenizer was refused, and the OpenAI output's token texts
    lost their spaces and byte pieces their bytes."""
    model = _model(tmp_path / "l2", train_sentencepiece_like_tokenizer())
    write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Is the sky blue?"}])
    choice = {"type": "choice", "choices": [" yes", " no", " London Paris"]}
    job = write_job(
        tmp_path / "rf.yaml",
        model,
        tmp_path / "q.jsonl",
        tmp_path / "rf",
        task={"max_new_tokens": 8, "chat_template": "never", "response_format": choice},
    )
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    # the text the tokens add after the prompt, its leading space kept
    text = read_outputs(tmp_path / "rf").column("text").to_pylist()[0]
    assert text in choice["choices"]

    request = {
        "custom_id": "q1",
        "url": "/v1/completions",
        "body": {"prompt": "The capital of France is", "max_tokens": 12, "logprobs": 0},
    }
    write_jsonl(tmp_path / "batch.jsonl", [request])
    job = write_job(tmp_path / "oai.yaml", model, tmp_path / "batch.jsonl", tmp_path / "oai")
    assert cli("run", str(job)).exit_code == 0
    body = json.loads((tmp_path / "oai" / "responses.jsonl").read_text())["response"]["body"]
    choice = body["choices"][0]
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] <= len(choice["text"])
    for token, offset in zip(tokens, offsets, strict=True):  # where each token starts, up to
        if token.startswith("bytes:"):  # a byte piece (how many U+FFFD follow is the decoder's)
            break
        assert choice["text"][offset : offset + len(token)] == token
    if not any(t.startswith("bytes:") for t in tokens):  # the tokens join back into the text
        assert "".join(tokens) == choice["text"]
    assert any(t.startswith(" ") for t in tokens), tokens


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_a_format_holding_special_tokens_text_with_a_sentencepiece_tokenizer(tmp_path, engine):
    """`</s>` fixed by a format is written as plain text (`<`, `/`, `s`, `>`), not as the end
    token, which ended every row before its answer; the text between is tokenized as the
    tokenizer does, without the space it puts before a text of its own."""
    model = _model(tmp_path / "l2", train_sentencepiece_like_tokenizer())
    write_jsonl(tmp_path / "q.jsonl", [{"id": f"r{i}", "prompt": f"Row {i}"} for i in range(3)])
    choice = {"type": "choice", "choices": ["</s> ok", "a<s>b"]}
    task = {"max_new_tokens": 16, "chat_template": "never", "response_format": choice}
    job = write_job(tmp_path / "rf.yaml", model, tmp_path / "q.jsonl", tmp_path / "rf", task=task)
    use_engine(job, engine)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    rows = read_outputs(tmp_path / "rf").to_pylist()
    assert all(r["text"] in choice["choices"] and r["finish_reason"] == "stop" for r in rows), rows


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_generated_text_keeps_the_space_its_first_token_adds(tmp_path, engine):
    """`▁Paris` decoded alone is 'Paris': the text of a completion lost the space between the
    prompt and its first word ('The capital of France isParis' once joined). It is now what
    the tokens add after the prompt, as transformers' text-generation pipeline and vLLM give
    it, and the row's token texts join back into it."""
    tokenizer = train_sentencepiece_like_tokenizer()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config("llama", tokenizer, 32, 2, 256))
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = [i for i, piece in enumerate(pieces) if piece.startswith("\u2581")]
    with torch.no_grad():  # the random model's answers are words that start with '▁'
        head = lm.get_output_embeddings().weight
        kept = head[words] * 10
        head.zero_()
        head[words] = kept
    lm.save_pretrained(tmp_path / "l2")
    tokenizer.save_pretrained(tmp_path / "l2")
    model = tmp_path / "l2"
    prompts = ["The capital of France is", "Question: is the sky blue? Answer:", "London"]
    write_jsonl(tmp_path / "q.jsonl", [{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    job = write_job(
        tmp_path / "g.yaml",
        model,
        tmp_path / "q.jsonl",
        tmp_path / "g",
        task={"max_new_tokens": 10, "chat_template": "never", "logprobs": True},
    )
    use_engine(job, engine)
    result = cli("run", str(job))
    assert result.exit_code == 0, result.output
    rows = read_outputs(tmp_path / "g").to_pylist()
    spaced = 0
    for row, prompt in zip(rows, prompts, strict=True):
        context = tokenizer(prompt)["input_ids"]
        whole = tokenizer.decode(context + row["token_ids"], skip_special_tokens=True)
        start = len(tokenizer.decode(context, skip_special_tokens=True))
        assert row["text"] == whole[start:]  # the pipeline's text
        if "\ufffd" not in row["text"]:
            assert "".join(row["tokens"]) == row["text"]
        spaced += row["text"].startswith(" ")
    assert spaced, [r["text"] for r in rows]  # a first token with its '▁' was drawn


def test_structured_output_on_a_tokenizer_the_grammar_library_cannot_read(tmp_path):
    """A WordPiece decoder: a traceback before, one line now, from validate and run alike."""
    model = _model(tmp_path / "wp", train_wordpiece_tokenizer(), arch="gpt2")
    write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "is the sky blue"}])
    job = write_job(
        tmp_path / "rf.yaml",
        model,
        tmp_path / "q.jsonl",
        tmp_path / "rf",
        task={"response_format": {"type": "choice", "choices": ["yes", "no"]}},
    )
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert "the grammar library cannot read this tokenizer" in result.output.splitlines()[-1]


def test_choices_are_tokenized_as_they_follow_the_prompt(tmp_path):
    """A choice written with its leading space, encoded alone by a SentencePiece-style
    tokenizer, got an extra '▁' token ('▁', '▁Pa', 'ris'): scored as a double space. Now its
    tokens are those lm-evaluation-harness takes from prompt and choice encoded together. A
    choice that merges with the word it was encoded after ('nd' into '▁and') was encoded alone
    and got the '▁' too."""
    tokenizer = train_sentencepiece_like_tokenizer()
    folder = _model(tmp_path / "l2", tokenizer)
    prompt, choices = "The capital of France is", [" Paris", " London", "nd", " nd"]
    # lm-eval moves a prompt's trailing space into the choice: the same split as row a's
    spaced = {"id": "b", "prompt": prompt + " ", "choices": [c.lstrip() for c in choices[:2]]}
    write_jsonl(tmp_path / "mc.jsonl", [{"id": "a", "prompt": prompt, "choices": choices}, spaced])
    job = write_job(
        tmp_path / "mc.yaml",
        folder,
        tmp_path / "mc.jsonl",
        tmp_path / "mc",
        task={"type": "score"},
        input={"choices_column": "choices"},
    )
    assert cli("run", str(job)).exit_code == 0
    row, moved = read_outputs(tmp_path / "mc").to_pylist()
    assert moved["choice_tokens"] == row["choice_tokens"][:2]
    assert moved["choice_logprobs"] == pytest.approx(row["choice_logprobs"][:2], rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    context = tokenizer(prompt)["input_ids"]
    for k, choice in enumerate(choices):  # lm-eval's split of the two encoded together
        whole = tokenizer(prompt + choice)["input_ids"]
        assert whole[: len(context)] == context
        continuation = whole[len(context) :]
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        want = sum(logprobs[len(context) + i - 1, t].item() for i, t in enumerate(continuation))
        assert row["choice_tokens"][k] == len(continuation)
        assert row["choice_logprobs"][k] == pytest.approx(want, rel=1e-4)


def test_a_stop_string_after_byte_pieces_ends_the_row_where_it_is_made():
    """A newline after three CJK characters, each three byte-fallback pieces (<0xE3>...): the
    stop check decoded a window starting mid-character, which this decoder turns into U+FFFD
    whole, newline piece and all, so the row ran on past its stop string."""
    from bulkinfer.engines.stops import generated_texts, stop_hit

    tokenizer = train_sentencepiece_like_tokenizer()
    pieces = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "ㅎ中日\n".encode()]
    words = tokenizer.encode("Paris London", add_special_tokens=False)
    tokens = pieces + words
    assert generated_texts(tokenizer, [pieces])[0] == "ㅎ中日\n"
    hits = [stop_hit(tokenizer, tokens[:n], ("\n",)) for n in range(1, len(tokens) + 1)]
    assert hits.index(True) == len(pieces) - 1  # at the newline piece itself
    assert not stop_hit(tokenizer, pieces[:-1], ("\n",))


def test_text_after_a_tokenizer_with_no_token_for_a():
    """The anchor was the word 'a': a WordPiece vocabulary without it ([UNK]) decoded each
    sequence alone, without the space a word adds after the prompt, and the token texts did
    not join back into the text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bulkinfer.engines.stops import generated_texts

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    corpus = ["don't stop. it's the fox's den, isn't it? yes!"] * 20
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(special_tokens=["[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert tokenizer.encode("a", add_special_tokens=False) == [tokenizer.unk_token_id]
    prompt = tokenizer.encode("is it the fox", add_special_tokens=False)
    new = tokenizer.encode("don't stop.", add_special_tokens=False)
    pipeline = tokenizer.decode(prompt + new)[len(tokenizer.decode(prompt)) :]
    assert generated_texts(tokenizer, [new])[0] == pipeline
    assert pipeline.startswith(" don")
