"""Loading a model for `model.quantization: fp8` tensor by tensor, so its weights are never all
on the device in bf16 at once (a 70B model's 141 GB would not fit a 141 GB GPU; in fp8 its
decoder weights take 68 GB).

The model is built on the meta device, its decoder layers' linears replaced by `Fp8Linear`
ones, and only then given device memory: fp8 for those matrices, the model's dtype for the rest
(embeddings, norms, LM head). Each tensor of the safetensors files is then read onto the device
(on a GPU by several threads through pinned buffers, as engines/to_device.py moves a loaded
model) and copied in: a linear weight in a floating dtype is quantized as it arrives (one matrix in
the model's dtype at a time); one already in float8 with its `weight_scale` (the checkpoints
llm-compressor and others save as "FP8 dynamic": a scale per output channel, or one per tensor)
is taken as it is, with no bf16 detour.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bulkinfer.configs import text_config
from bulkinfer.engines.fp8 import FP8, Fp8Linear, Fp8Weight, quantize_weight
from bulkinfer.engines.to_device import THREADS, StagedMover
from bulkinfer.errors import ModelError, counted

if TYPE_CHECKING:
    from bulkinfer.engines.read_ahead import ReadAhead

LINEARS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", ("gate_proj", "up_proj", "down_proj")),
)
FLOAT8_TYPES = tuple(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
# tensors an fp8 checkpoint keeps beside a weight that this loader has no use for (activations
# are quantized per token on the fly, whatever static scale the checkpoint calibrated)
IGNORED_SUFFIXES = (".input_scale", ".weight_zero_point", ".input_zero_point")
# the quantization_config of a checkpoint saved in llm-compressor's FP8 dynamic scheme (its
# compressed-tensors format), the kind of fp8 checkpoint this loader reads as stored
FP8_DYNAMIC = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
}


def checkpoint_in_fp8(config, files: list[Path] = ()) -> bool:
    """Whether the checkpoint's linear weights are stored in fp8: its config says so, or (a
    checkpoint saved without a quantization_config) a header of its safetensors `files` holds
    float8 tensors."""
    quant = quantization_dict(config)
    if quant is not None:
        text = json.dumps(quant).lower()
        if "float8" in text or "fp8" in text or "float-quantized" in text:
            return True
    return any(dtype.startswith("F8") for dtype in stored_dtypes(files))


def quantization_dict(config) -> dict | None:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    return quant if isinstance(quant, dict) else quant.to_dict()


def refuse_other_quantization(config, label: str) -> None:
    """A checkpoint quantized some way this loader does not read (block scales, GPTQ, AWQ...)
    is refused in one line naming it, before its tensors are read as if they were fp8."""
    quant = quantization_dict(config)
    if quant is None:
        return
    method = quant.get("quant_method", "?")
    if quant.get("weight_block_size"):
        raise ModelError(
            f"{label}: its fp8 weights have a scale per block "
            f"(quantization_config.weight_block_size {quant['weight_block_size']}); "
            "model.quantization: fp8 reads per-output-channel or per-tensor scales"
        )
    if not checkpoint_in_fp8(config):
        raise ModelError(
            f"{label}: its weights are quantized with {method}, which model.quantization: fp8 "
            "does not read; run it without model.quantization (the reference engine), or give "
            "the model in bf16 or in fp8"
        )


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, as transformers' loader picks them:
    model.safetensors where there is one, else those its index names, else the folder's one
    .safetensors file. None where several are there without either: every file was read, and
    a stray copy beside the model (an EMA's) replaced its weights silently."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / name for name in names]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable index: as without one
    found = sorted(folder.glob("*.safetensors"))
    return found if len(found) == 1 else []


def loaded_files(folder: Path, fp8: bool) -> list[Path]:
    """The safetensors files a load reads: with `fp8`, checkpoint_files; otherwise the ones
    transformers' loader reads, model.safetensors where there is one, else those its index
    names (none where neither is there: transformers' loader says what is missing)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if fp8 or single.is_file() or index.is_file():
        return checkpoint_files(folder)
    return []


def _stores_both_embeddings(model, files: list[Path]) -> bool:
    """Whether the checkpoint holds the input and the output embedding each under its name."""
    head, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or inputs is None:
        return False
    keys = {
        name
        for name, p in model.named_parameters(remove_duplicate=False)
        if p is head.weight or p is inputs.weight
    }
    return len(keys & {name for header in _headers(files) for name in header}) >= 2


def stored_dtypes(files: list[Path]) -> set[str]:
    """The dtypes (safetensors' names: BF16, F8_E4M3...) of the tensors in these files, read
    from their headers alone; a file that cannot be read adds none (loading says why)."""
    return {dtype for header in _headers(files) for dtype, _ in _tensor_bytes(header)}


def stored_width(files: list[Path]) -> int | None:
    """Bytes per value of the float dtype holding most of the files' bytes (2 for a bf16
    checkpoint, 4 for float32), fp8 matrices aside; None where the headers say nothing."""
    held: dict[str, int] = {}
    for header in _headers(files):
        for dtype, size in _tensor_bytes(header):
            held[dtype] = held.get(dtype, 0) + size
    widths = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
    floats = {d: n for d, n in held.items() if d in widths}
    return widths[max(floats, key=floats.get)] if floats else None


def _headers(files: list[Path]):
    for file in files:
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 1 << 28:
                    continue
                header = json.loads(f.read(size))
        except (OSError, ValueError):
            continue
        if isinstance(header, dict):
            yield header


def _tensor_bytes(header: dict):
    """(dtype, bytes) of each tensor a safetensors header lists."""
    for value in header.values():
        if isinstance(value, dict) and "dtype" in value:
            offsets = value.get("data_offsets") or (0, 0)
            try:
                yield value["dtype"], int(offsets[1]) - int(offsets[0])
            except (TypeError, ValueError, IndexError):
                yield value["dtype"], 0


def load_fp8_weights(auto_class, options, ahead: ReadAhead | None = None):
    """`load_fp8_model` for a job's load options: its config, dtype and device; a checkpoint
    it cannot read is a one-line error. `ahead`: the run's read-ahead of the files, if any."""
    from bulkinfer.errors import model_error

    try:
        return load_by_tensor(auto_class, options, fp8=True, ahead=ahead)
    except ModelError:
        raise
    except Exception as exc:
        raise model_error(f"cannot load the weights of {options.label}", exc) from None


def load_by_tensor(auto_class, options, fp8: bool, ahead: ReadAhead | None = None):
    """The model of a job's load options built on the meta device, then given its tensors by
    name (`load_fp8_model`), with its config, dtype and device; `fp8` false: every weight in the
    model's dtype, as from_pretrained loads it."""
    from transformers import AutoConfig

    from bulkinfer.engines.hf import resolve_device, resolve_dtype

    device = resolve_device(options.device)
    config = AutoConfig.from_pretrained(options.folder, trust_remote_code=options.trust_remote_code)
    kwargs = {"trust_remote_code": options.trust_remote_code}
    if options.attn_implementation is not None and not fp8:  # as from_pretrained is given it
        kwargs["attn_implementation"] = options.attn_implementation
    return load_fp8_model(
        auto_class,
        Path(options.folder),
        config,
        resolve_dtype(options.dtype, device),
        device,
        options.label,
        fp8=fp8,
        ahead=ahead,
        **kwargs,
    )


def load_fp8_model(
    auto_class,
    folder: Path,
    config,
    dtype: torch.dtype,
    device,
    label: str,
    fp8: bool = True,
    ahead: ReadAhead | None = None,
    **kwargs,
):
    """The model in `folder` with its decoder linears in fp8 on `device` (see the module); with
    `fp8` false, in `dtype`. Tensors `ahead` holds are taken from it, not read again; it is
    closed once the model is built. `kwargs` go to the model's from_config."""
    try:
        return _load_by_name(auto_class, folder, config, dtype, device, label, fp8, ahead, kwargs)
    finally:
        if ahead is not None:
            ahead.close()


def _load_by_name(auto_class, folder, config, dtype, device, label, fp8, ahead, kwargs):
    from safetensors import safe_open

    files = loaded_files(folder, fp8)
    if not files:
        several = len(list(folder.glob("*.safetensors"))) > 1
        raise ModelError(
            f"{label}: model.quantization: fp8 reads safetensors files; "
            + (
                "there are several and neither model.safetensors nor "
                "model.safetensors.index.json says which hold the model"
                if several
                else "none found"
            )
        )
    if fp8:
        refuse_other_quantization(config, label)
    elif quantization_dict(config) is not None:
        raise ModelError(f"{label}: a quantized checkpoint is loaded by transformers")
    if hasattr(config, "quantization_config"):  # the checkpoint's fp8 is read here, not by
        del config.quantization_config  # transformers' quantizers
    with torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype, **kwargs)
    computed = [] if fp8 else _computed_buffers(model)
    if computed:  # (the fp8 layers' models have none but the rotary's)
        raise ModelError(f"{label}: buffers computed when the model is made ({computed[0]})")
    slots = _fp8_slots(model) if fp8 else {}
    for owner, name in slots.values():
        linear = getattr(owner, name)
        weight = torch.empty(linear.out_features, linear.in_features, dtype=FP8)
        scale = torch.empty(linear.out_features, dtype=torch.float32)
        bias = torch.empty(linear.out_features, dtype=dtype) if linear.bias is not None else None
        setattr(owner, name, Fp8Linear(Fp8Weight(weight, scale), bias))
    model.to_empty(device=device)
    tied = getattr(text_config(config), "tie_word_embeddings", False) or getattr(
        config, "tie_word_embeddings", False
    )
    both = tied and _stores_both_embeddings(model, files)
    if both and not fp8:
        # transformers keeps the two apart then (with a warning), whatever the config says
        raise ModelError(f"{label}: the checkpoint stores both tied embeddings")
    if not both and tied:  # one tensor under both names: the checkpoint may store either
        model.tie_weights()
    # (both stored, in fp8: kept apart as transformers keeps them, each filled under its own
    # name; tied, one of them took the other's values, whichever was read last)
    state = model.state_dict()
    filled: set[str] = set()
    reader = _Reader(device, ahead)
    with ExitStack() as stack:
        where = {}  # each tensor's name -> its file, open (a weight's scale may be in another)
        for file in files:
            f = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            where.update(dict.fromkeys(f.keys(), (file, f)))
        tasks = []  # (what fills it, its arguments), each a tensor of the files
        for key in sorted(where):
            if key.endswith(IGNORED_SUFFIXES) or key.endswith(".weight_scale"):
                continue
            module_name = key.removesuffix(".weight")
            if key.endswith(".weight") and module_name in slots:
                owner, name = slots[module_name]
                tasks.append((_fill_linear, (getattr(owner, name), where, key, label)))
                filled.update({key, f"{module_name}.weight_scale"})
            elif key in state:
                tasks.append((_fill_tensor, (state[key], where, key, label)))
                filled.add(key)
        reader.run(tasks)
    _rebuild_rotary(model, config, device)
    _read_generation_config(model, folder)
    for key, tensor in state.items():  # a name sharing its tensor with a filled one
        if key not in filled and any(
            state[other].data_ptr() == tensor.data_ptr() for other in filled if other in state
        ):
            filled.add(key)
    missing = sorted(k for k in state if k not in filled)
    if missing:
        raise ModelError(
            f"{label}: the checkpoint lacks {counted(len(missing), 'weight')} the model needs "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    return model.eval()


def _computed_buffers(model) -> list[str]:
    """Buffers not kept in a checkpoint (computed when the model is made), the rotary
    embedding's aside: on the meta device they were never computed."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    return [
        f"{name}.{buffer}" if name else buffer
        for name, module in model.named_modules()
        if rotary is None or not any(module is m for m in rotary.modules())
        for buffer in module._non_persistent_buffers_set
        if module._buffers.get(buffer) is not None
    ]


def _fp8_slots(model) -> dict[str, tuple[torch.nn.Module, str]]:
    """Each decoder-layer linear's full name -> (its parent module, attribute name)."""
    slots = {}
    prefix = next(n for n, m in model.named_modules() if m is model.base_model.layers)
    for i, layer in enumerate(model.base_model.layers):
        for part, names in LINEARS:
            owner = getattr(layer, part)
            for name in names:
                slots[f"{prefix}.{i}.{part}.{name}"] = (owner, name)
    return slots


class _Reader:
    """Runs the fills, each reading its tensors onto the device: on a GPU from several threads,
    each through its own pinned staging buffer (engines/to_device.py: the page-cache reads and
    the copies of different threads overlap), on the CPU one after another."""

    def __init__(self, device: torch.device, ahead: ReadAhead | None = None):
        self.device, self.ahead = device, ahead
        self.mover = StagedMover(device) if device.type == "cuda" else None

    def get(self, source: tuple[Path, Any], key: str) -> torch.Tensor:
        """The tensor `key` of `source` (its file, open) on the device."""
        file, f = source
        if self.ahead is not None:
            tensor = self.ahead.get(file, key)
            if tensor is not None:
                return tensor
        tensor = f.get_tensor(key)
        if self.mover is not None:
            self.mover.move(tensor)
        return tensor

    def run(self, tasks) -> None:
        if self.mover is None:
            for fill, args in tasks:
                fill(self, *args)
            return
        with ThreadPoolExecutor(THREADS, thread_name_prefix="bulkinfer-fp8-load") as pool:
            list(pool.map(lambda task: task[0](self, *task[1]), tasks))
        torch.cuda.synchronize(self.device)


def _fill_tensor(reader: _Reader, target: torch.Tensor, where: dict, key: str, label: str):
    """A tensor kept in the model's dtype (embeddings, norms, an LM head): one stored in
    float8 is multiplied back by its scale."""
    stored = reader.get(where[key], key)
    _same_shape(stored, target.shape, key, label)
    if stored.dtype in FLOAT8_TYPES:
        stored = _scaled(stored, _scale(reader, where, key, stored, label))
    target.copy_(stored)


def _same_shape(stored: torch.Tensor, shape, key: str, label: str) -> None:
    """A stored tensor of another shape than the model's is refused, not broadcast into it."""
    if stored.shape != shape:
        raise ModelError(
            f"{label}: {key} is stored with shape {list(stored.shape)}; the model's config "
            f"makes it {list(shape)}"
        )


def _fill_linear(reader: _Reader, linear: Fp8Linear, where: dict, key: str, label: str):
    """One linear's weight: quantized as read, or taken as stored when it is float8_e4m3 with
    its scale (another float8, such as e5m2, is scaled back and quantized again)."""
    stored = reader.get(where[key], key)
    _same_shape(stored, linear.weight.shape, key, label)
    if stored.dtype == FP8:
        weight = Fp8Weight(stored, _scale(reader, where, key, stored, label))
    elif stored.dtype in FLOAT8_TYPES:
        scale = _scale(reader, where, key, stored, label)
        weight = quantize_weight(_scaled(stored, scale))
    elif stored.dtype.is_floating_point:
        weight = quantize_weight(stored)
    else:
        raise ModelError(f"{label}: {key} is stored as {stored.dtype}, not a float or float8")
    del stored
    linear.weight.view(torch.uint8).copy_(weight.weight.view(torch.uint8))
    linear.weight_scale.copy_(weight.scale)


def _scale(reader: _Reader, where: dict, key: str, stored: torch.Tensor, label: str):
    """The float32 scale per output channel of a float8 tensor, from its `weight_scale` (one
    per row, or one for the whole tensor)."""
    scale_key = key + "_scale"
    if scale_key not in where:
        raise ModelError(f"{label}: {key} is float8 but the checkpoint has no {scale_key}")
    scale = reader.get(where[scale_key], scale_key).float().reshape(-1)
    rows = stored.shape[0] if stored.dim() else 1
    if scale.numel() == 1:  # one scale for the whole tensor
        scale = scale.expand(rows)
    if scale.numel() != rows:
        raise ModelError(
            f"{label}: {scale_key} has {scale.numel()} scales; per-output-channel or "
            f"per-tensor scales are read ({rows} or 1), not blocks"
        )
    return scale


def _scaled(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 values times their scale (one a row), in float32."""
    return stored.float() * scale.reshape(-1, *[1] * (stored.dim() - 1))


def _read_generation_config(model, folder: Path) -> None:
    """generation_config.json, as from_pretrained reads it (its EOS ids end generation)."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)


def _rebuild_rotary(model, config, device) -> None:
    """The rotary embedding's frequencies are computed, not stored: compute them again (the
    meta model has none)."""
    base = model.base_model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return
    rebuilt = type(rotary)(config=text_config(config))
    base.rotary_emb = rebuilt.to(device)
