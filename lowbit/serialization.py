"""Save and load quantized models: safetensors for tensors, JSON for structure. No pickle.

    lowbit.save(model, "out/")             # out/model.safetensors + out/lowbit.json
    model = build_float_model()            # a fresh instance of the same float architecture
    lowbit.load("out/", model)             # swaps in the quantized layers, then loads every tensor

``model.safetensors`` holds the whole ``state_dict`` (packed codes, scales, zeros, fp8 weights,
biases, and the float tensors of layers that stayed float); tensors tied together are stored
once. ``lowbit.json`` says which layers were quantized and how to rebuild each one::

    {"format": "lowbit", "format_version": 1, "lowbit_version": "0.1.0",
     "modules": [{"name": "0", "class": "Int8Linear", "scheme": "int8",
                  "args": {"in_features": 64, "out_features": 256, "bias": true, "dtype": "float32"},
                  "tensors": {"qweight": {"dtype": "int8", "shape": [256, 64]}, ...}}, ...],
     "aliases": {"lm_head.weight": "model.embed_tokens.weight"}}

Conv2d layers (format_version 2, written only when the model has one; version-1 files load as
before) are entries of class ``QuantizedConv2d`` (the family's linear module, nested under
``"linear"``) or ``BinaryConv2d``, with the geometry the fresh model's nn.Conv2d must match::

     {"name": "0", "class": "QuantizedConv2d", "scheme": "int8",
      "conv": {"in_channels": 3, "out_channels": 16, "kernel_size": [3, 3], "stride": [1, 1],
               "padding": [1, 1], "dilation": [1, 1], "bias": true},
      "linear": {"class": "Int8Linear", "args": {...}, "tensors": {"qweight": ...}}}
     {"name": "2", "class": "BinaryConv2d", "scheme": "binary", "conv": {...},
      "args": {"binary_activations": true, "dtype": "float32"}, "tensors": {"packed": ...}}

Loading trusts nothing in the directory: a checkpoint is often downloaded, and its tensors go
straight to kernels that read raw pointers. Every field, shape, dtype and value range is checked
against the model and the formats before the model is touched; anything off raises ValueError
naming the file, module and tensor, and leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from . import _checks
from .formats import fp8 as fp8_fmt
from .formats import int4 as int4_fmt
from .formats import int8 as int8_fmt
from .nn.base import QuantizedLinear, check_parent
from .nn.fp8 import ACTIVATIONS, FP8Linear
from .nn.int4 import Int4Linear
from .nn.int8 import ACTIVATIONS as INT8_ACTIVATIONS
from .nn.int8 import Int8Linear, Int8WeightOnlyLinear
# ---- binary
from .formats import binary as binary_fmt
from .nn.binary import BinaryLinear
from .formats import sparse24 as sparse24_fmt  # ---- sparse24
from .nn.sparse24 import Sparse24Linear
# ---- codebook
from .formats import codebook as codebook_fmt
from .nn.codebook import CodebookLinear
# ---- conv
from .nn.binary import BinaryConv2d
from .nn.conv import QuantizedConv2d, check_float_conv2d
from .configs import Unsupported
# ---- int4 cutlass_sm90
from .nn.int4_sm90 import Int4LinearCutlassSm90

FORMAT = "lowbit"
FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "lowbit.json"
# The JSON only describes structure (a few hundred bytes per layer); anything near this is not ours.
MAX_CONFIG_BYTES = 64 * 2**20

_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Every dtype a quantized module may hold; the JSON names them by torch's own spelling.
_TENSOR_DTYPES = {**_FLOAT_DTYPES, "int8": torch.int8, "uint8": torch.uint8,
                  "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}

_CLASSES: dict[str, type[QuantizedLinear]] = {
    c.__name__: c for c in (Int8Linear, Int8WeightOnlyLinear, Int4Linear, FP8Linear, Sparse24Linear)}
# ---- binary
_TENSOR_DTYPES["int32"] = torch.int32
_CLASSES[BinaryLinear.__name__] = BinaryLinear
# ---- codebook
_CLASSES[CodebookLinear.__name__] = CodebookLinear
_CODEBOOK_ARGS = ("dim", "bits", "num_codebooks", "groups", "row_groups", "rotation_block")
# ---- conv: Conv2d entries need format_version 2; files without one are still written as version 1.
CONV_FORMAT_VERSION = 2
_READABLE_VERSIONS = (FORMAT_VERSION, CONV_FORMAT_VERSION)
_CONV_CLASSES: dict[str, type[nn.Module]] = {c.__name__: c for c in (QuantizedConv2d, BinaryConv2d)}
_CONV_PAIRS = (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1))  # (field, least value)
_CONV_GEOMETRY = ("in_channels", "out_channels", *(k for k, _ in _CONV_PAIRS), "bias")
# ---- int4 cutlass_sm90: the layout's own module (dtype = its scale dtype, float16 or bfloat16)
_CLASSES[Int4LinearCutlassSm90.__name__] = Int4LinearCutlassSm90


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- save
def _module_args(m: QuantizedLinear) -> dict:
    args = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
            "dtype": _dtype_name(m.orig_dtype)}
    if isinstance(m, Int4Linear):
        args.update(group_size=m.group_size, symmetric=m.zero is None, scale_dtype=_dtype_name(m.scale.dtype))
    elif isinstance(m, FP8Linear):
        args.update(format=m.format, granularity=m.granularity, activation=m.activation, act_format=m.act_format)
    elif isinstance(m, Int8Linear) and m.activation != "dynamic":  # omitted when dynamic: older files read as before
        args.update(activation=m.activation)
    elif isinstance(m, BinaryLinear):
        args.update(binary_activations=m.binary_activations)
    elif isinstance(m, Sparse24Linear):  # ---- sparse24
        args.update(values_dtype=_dtype_name(m.values_dtype))
    # ---- codebook
    elif isinstance(m, CodebookLinear):
        args.update({k: getattr(m, k) for k in _CODEBOOK_ARGS}, has_scale=m.scale is not None,
                    codebook_dtype=_dtype_name(m.codebooks.dtype))
    elif isinstance(m, Int4LinearCutlassSm90):  # ---- int4 cutlass_sm90
        args.update(group_size=m.group_size)
    return args


def _describe(m: QuantizedLinear) -> dict:
    return {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
            for name, t in m._buffers.items() if t is not None and name not in m._non_persistent_buffers_set}


def _write_atomically(path: Path, write) -> None:
    # A crash halfway must not leave a truncated file under the final name.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: str | os.PathLike, entropy_coding: bool = False) -> None:
    """Write `model` (quantized by :func:`lowbit.quantize`, or not) to the directory `path`.

    Creates ``path/model.safetensors`` (every tensor of ``model.state_dict()``) and
    ``path/lowbit.json`` (how to rebuild each quantized layer). Read back with :func:`load`.
    ``entropy_coding=True`` stores int8/int4 codes Huffman-coded (:mod:`lowbit.compress.huffman`).
    """
    if isinstance(model, (QuantizedLinear, QuantizedConv2d, BinaryConv2d)):
        raise ValueError("lowbit.save: model is itself a quantized layer; save the model that contains it")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    modules = []
    inner_linears = set()  # names of QuantizedConv2d.linear: written inside their conv's entry
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (QuantizedConv2d, BinaryConv2d)):
            modules.append(_describe_conv(name, m))
            inner_linears.add(f"{name}.linear")
            continue
        if not isinstance(m, QuantizedLinear) or name in inner_linears:
            continue
        if type(m).__name__ not in _CLASSES or _CLASSES[type(m).__name__] is not type(m):
            raise ValueError(f"lowbit.save: {name} is a {type(m).__name__}, which lowbit.save cannot write "
                             f"(known: {sorted(_CLASSES)})")
        modules.append({"name": name, "class": type(m).__name__, "scheme": m.scheme,
                        "args": _module_args(m), "tensors": _describe(m)})

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"lowbit.save: {key} is on the meta device; materialize the weights first")
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in views:  # tied weights: store once, re-tie on load
            aliases[key] = views[view]
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        # safetensors refuses tensors that share memory without being the same view; copy those.
        shared = t.numel() and storage in storages
        if t.numel():
            views[view] = key
            storages.add(storage)
        t = t.to("cpu")
        tensors[key] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()

    version = CONV_FORMAT_VERSION if any(e["class"] in _CONV_CLASSES for e in modules) else FORMAT_VERSION
    header = {"format": FORMAT, "format_version": version, "lowbit_version": _lowbit_version(),
              "modules": modules, "aliases": aliases}
    if entropy_coding:  # ---- compress: Huffman-coded codes (an older lowbit rejects the extra field)
        from .compress import huffman
        coded = huffman.encode_for_storage(tensors, _linear_entries(modules), aliases)
        if coded:
            header["entropy_coded"] = coded
    _write_atomically(path / TENSORS_FILE, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    _write_atomically(path / CONFIG_FILE,
                      lambda f: Path(f).write_text(json.dumps(header, indent=1) + "\n", encoding="utf-8"))


# ---- conv
def _describe_conv(name: str, m: nn.Module) -> dict:
    has_bias = (m.linear if isinstance(m, QuantizedConv2d) else m).bias is not None
    conv = {"in_channels": m.in_channels, "out_channels": m.out_channels,
            **{k: list(getattr(m, k)) for k, _ in _CONV_PAIRS}, "bias": has_bias}
    if isinstance(m, BinaryConv2d):
        return {"name": name, "class": "BinaryConv2d", "scheme": BinaryLinear.scheme, "conv": conv,
                "args": {"binary_activations": m.binary_activations, "dtype": _dtype_name(m.orig_dtype)},
                "tensors": _describe(m)}
    lin = m.linear
    if _CLASSES.get(type(lin).__name__) is not type(lin):
        raise ValueError(f"lowbit.save: {name}.linear is a {type(lin).__name__}, which lowbit.save cannot write "
                         f"(known: {sorted(_CLASSES)})")
    return {"name": name, "class": "QuantizedConv2d", "scheme": lin.scheme, "conv": conv,
            "linear": {"class": type(lin).__name__, "args": _module_args(lin), "tensors": _describe(lin)}}


def _linear_entries(modules: list[dict]) -> list[dict]:
    """`modules` with each QuantizedConv2d entry replaced by its linear's (named "<conv>.linear"):
    the codes the Huffman coder looks for are the linear's."""
    return [{"name": f"{e['name']}.linear", **e["linear"]} if e["class"] == "QuantizedConv2d" else e
            for e in modules]


def _lowbit_version() -> str:
    from . import __version__
    return __version__


# ----------------------------------------------------------------------------- load: the JSON
class _Where:
    """Prefixes every error with the file (and module) it is about."""

    def __init__(self, file: Path, module: str | None = None):
        self.file, self.module = file, module

    def fail(self, message: str):
        where = f"{self.file}" + (f", module {self.module!r}" if self.module is not None else "")
        raise ValueError(f"lowbit.load: {where}: {message}")

    def field(self, d: dict, key: str, kind, what: str):
        if key not in d:
            self.fail(f"{what} is missing field {key!r}")
        v = d[key]
        # bool is an int to Python; a JSON `true` where a size belongs is corruption, not 1.
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.fail(f"{what} field {key!r} must be {want}, got {type(v).__name__} {v!r:.80}")
        return v

    def choice(self, d: dict, key: str, allowed, what: str):
        v = self.field(d, key, str, what)
        if v not in allowed:
            self.fail(f"{what} field {key!r} must be one of {sorted(allowed)}, got {v!r:.80}")
        return v

    def no_extra(self, d: dict, keys, what: str):
        extra = sorted(set(d) - set(keys))
        if extra:
            self.fail(f"{what} has unknown field(s) {extra}; written by a newer lowbit?")


def _read_header(path: Path) -> dict:
    file = path / CONFIG_FILE
    where = _Where(file)
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            where.fail(f"is {size} bytes, more than the {MAX_CONFIG_BYTES} a lowbit config can be")
        header = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"lowbit.load: cannot read {file}: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        where.fail(f"must hold a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        where.fail(f"is not a lowbit checkpoint (field 'format' is {header.get('format')!r:.80}, not {FORMAT!r})")
    version = where.field(header, "format_version", int, "the file")
    if version not in _READABLE_VERSIONS:
        where.fail(f"has format_version {version}; this lowbit reads versions {list(_READABLE_VERSIONS)}")
    where.field(header, "lowbit_version", str, "the file")
    where.field(header, "modules", list, "the file")
    where.field(header, "aliases", dict, "the file")
    where.no_extra(header, ("format", "format_version", "lowbit_version", "modules", "aliases", "entropy_coded"),
                   "the file")
    return header


def _parse_args(where: _Where, cls: type[QuantizedLinear], args: dict) -> dict:
    what = "'args'"
    out = {"in_features": where.field(args, "in_features", int, what),
           "out_features": where.field(args, "out_features", int, what),
           "bias": where.field(args, "bias", bool, what),
           "dtype": _FLOAT_DTYPES[where.choice(args, "dtype", _FLOAT_DTYPES, what)]}
    keys = ["in_features", "out_features", "bias", "dtype"]
    if cls is Int4Linear:
        out["group_size"] = where.field(args, "group_size", int, what)
        out["symmetric"] = where.field(args, "symmetric", bool, what)
        out["scale_dtype"] = _FLOAT_DTYPES[where.choice(args, "scale_dtype", _FLOAT_DTYPES, what)]
        keys += ["group_size", "symmetric", "scale_dtype"]
        if not int4_fmt.valid_group_size(out["group_size"], out["in_features"]):
            where.fail(f"group_size {out['group_size']} is not one of {int4_fmt.GROUP_SIZES} or "
                       f"in_features={out['in_features']}")
    elif cls is FP8Linear:
        out["format"] = where.choice(args, "format", fp8_fmt.FORMATS, what)
        out["granularity"] = where.choice(args, "granularity", fp8_fmt.GRANULARITIES, what)
        out["activation"] = where.choice(args, "activation", ACTIVATIONS, what)
        out["act_format"] = where.choice(args, "act_format", fp8_fmt.FORMATS, what)
        keys += ["format", "granularity", "activation", "act_format"]
    elif cls is Int8Linear and "activation" in args:
        out["activation"] = where.choice(args, "activation", INT8_ACTIVATIONS, what)
        keys += ["activation"]
    elif cls is BinaryLinear:
        out["binary_activations"] = where.field(args, "binary_activations", bool, what)
        keys += ["binary_activations"]
    elif cls is Sparse24Linear:  # ---- sparse24
        out["values_dtype"] = _TENSOR_DTYPES[where.choice(args, "values_dtype", ("float32", "float16", "bfloat16",
                                                                                 "int8"), what)]
        keys += ["values_dtype"]
        if out["values_dtype"] == torch.int8 and out["in_features"] > _checks.INT8_MAX_K:
            where.fail(f"in_features={out['in_features']} exceeds {_checks.INT8_MAX_K} for int8 values")
    # ---- codebook
    elif cls is CodebookLinear:
        for k in _CODEBOOK_ARGS:
            out[k] = where.field(args, k, int, what)
        out["has_scale"] = where.field(args, "has_scale", bool, what)
        out["codebook_dtype"] = _FLOAT_DTYPES[where.choice(args, "codebook_dtype", _FLOAT_DTYPES, what)]
        keys += [*_CODEBOOK_ARGS, "has_scale", "codebook_dtype"]
        # Sizes the constructor would allocate from: bounded before anything is built.
        if out["dim"] not in codebook_fmt.DIMS or not 1 <= out["bits"] <= codebook_fmt.MAX_BITS \
                or not 1 <= out["num_codebooks"] <= 64 or out["groups"] < 1 or out["row_groups"] < 1 \
                or out["rotation_block"] < 0:
            where.fail(f"codebook args out of range: dim {out['dim']} (one of {codebook_fmt.DIMS}), bits "
                       f"{out['bits']} (1..{codebook_fmt.MAX_BITS}), num_codebooks {out['num_codebooks']} (1..64), "
                       f"groups {out['groups']}, row_groups {out['row_groups']} (>= 1), rotation_block "
                       f"{out['rotation_block']} (>= 0)")
        K, N, d = out["in_features"], out["out_features"], out["dim"]
        if K % d or (K // d) % out["groups"] or N % out["row_groups"] or \
                (out["rotation_block"] and (K % out["rotation_block"] or out["rotation_block"] % d)):
            where.fail(f"codebook args do not fit [out, in]=[{N}, {K}]: dim {d} must divide in_features, groups "
                       f"{out['groups']} the sub-vectors, row_groups {out['row_groups']} out_features, "
                       f"rotation_block {out['rotation_block']} in_features (and be a multiple of dim)")
    elif cls is Int4LinearCutlassSm90:  # ---- int4 cutlass_sm90 (the constructor checks alignment and dtype)
        out["group_size"] = where.field(args, "group_size", int, what)
        keys += ["group_size"]
    where.no_extra(args, keys, what)
    return out


def _parse_tensors(where: _Where, tensors: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    out = {}
    for name, spec in tensors.items():
        what = f"tensor {name!r}"
        if not isinstance(spec, dict):
            where.fail(f"{what} must be described by an object, got {type(spec).__name__}")
        dtype = _TENSOR_DTYPES[where.choice(spec, "dtype", _TENSOR_DTYPES, what)]
        shape = where.field(spec, "shape", list, what)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            where.fail(f"{what} shape must be a list of non-negative integers, got {shape!r:.80}")
        where.no_extra(spec, ("dtype", "shape"), what)
        out[name] = (dtype, tuple(shape))
    return out


def _parse_module(file: Path, i: int, entry) -> tuple[str, type[QuantizedLinear], dict, dict]:
    where = _Where(file)
    if not isinstance(entry, dict):
        where.fail(f"modules[{i}] must be an object, got {type(entry).__name__}")
    name = where.field(entry, "name", str, f"modules[{i}]")
    where = _Where(file, name)
    if not name:
        where.fail("module name is empty (the model's root cannot be replaced in place)")
    cls = _CLASSES.get(where.choice(entry, "class", _CLASSES, "the entry"))
    scheme = where.field(entry, "scheme", str, "the entry")
    if scheme != cls.scheme:
        where.fail(f"scheme {scheme!r:.80} does not match class {cls.__name__} (scheme {cls.scheme!r})")
    args = _parse_args(where, cls, where.field(entry, "args", dict, "the entry"))
    tensors = _parse_tensors(where, where.field(entry, "tensors", dict, "the entry"))
    where.no_extra(entry, ("name", "class", "scheme", "args", "tensors"), "the entry")
    return name, cls, args, tensors


# ---- conv
def _parse_conv_module(file: Path, i: int, entry: dict, version: int) -> tuple[str, type[nn.Module], dict, dict]:
    """A QuantizedConv2d / BinaryConv2d entry -> (name, class, args, tensors keyed as in its state_dict).

    ``args`` holds ``conv`` (the geometry) and, for QuantizedConv2d, ``linear`` = (class, args)."""
    where = _Where(file)
    name = where.field(entry, "name", str, f"modules[{i}]")
    where = _Where(file, name)
    if not name:
        where.fail("module name is empty (the model's root cannot be replaced in place)")
    cls = _CONV_CLASSES[entry["class"]]
    if version < CONV_FORMAT_VERSION:
        where.fail(f"is a {cls.__name__}, which needs format_version {CONV_FORMAT_VERSION}, but the file says "
                   f"{version}")
    scheme = where.field(entry, "scheme", str, "the entry")
    conv = _parse_conv_geometry(where, where.field(entry, "conv", dict, "the entry"))
    C, O, (kh, kw) = conv["in_channels"], conv["out_channels"], conv["kernel_size"]
    if cls is BinaryConv2d:
        if scheme != BinaryLinear.scheme:
            where.fail(f"scheme {scheme!r:.80} does not match class BinaryConv2d (scheme {BinaryLinear.scheme!r})")
        raw = where.field(entry, "args", dict, "the entry")
        args = {"conv": conv, "binary_activations": where.field(raw, "binary_activations", bool, "'args'"),
                "dtype": _FLOAT_DTYPES[where.choice(raw, "dtype", _FLOAT_DTYPES, "'args'")]}
        where.no_extra(raw, ("binary_activations", "dtype"), "'args'")
        tensors = _parse_tensors(where, where.field(entry, "tensors", dict, "the entry"))
        where.no_extra(entry, ("name", "class", "scheme", "conv", "args", "tensors"), "the entry")
        return name, cls, args, tensors
    inner = where.field(entry, "linear", dict, "the entry")
    lin_cls = _CLASSES[where.choice(inner, "class", _CLASSES, "'linear'")]
    if scheme != lin_cls.scheme:
        where.fail(f"scheme {scheme!r:.80} does not match its linear class {lin_cls.__name__} "
                   f"(scheme {lin_cls.scheme!r})")
    lin_args = _parse_args(where, lin_cls, where.field(inner, "args", dict, "'linear'"))
    if (lin_args["out_features"], lin_args["in_features"], lin_args["bias"]) != (O, C * kh * kw, conv["bias"]):
        where.fail(f"'linear' is [out, in]=[{lin_args['out_features']}, {lin_args['in_features']}] "
                   f"{'with' if lin_args['bias'] else 'without'} bias; the conv geometry needs [{O}, {C * kh * kw}] "
                   f"(out_channels, in_channels*kh*kw) {'with' if conv['bias'] else 'without'} bias")
    lin_tensors = _parse_tensors(where, where.field(inner, "tensors", dict, "'linear'"))
    where.no_extra(inner, ("class", "args", "tensors"), "'linear'")
    where.no_extra(entry, ("name", "class", "scheme", "conv", "linear"), "the entry")
    return name, cls, {"conv": conv, "linear": (lin_cls, lin_args)}, {f"linear.{k}": v for k, v in lin_tensors.items()}


def _parse_conv_geometry(where: _Where, conv: dict) -> dict:
    what = "'conv'"
    out = {}
    for k in ("in_channels", "out_channels"):
        out[k] = where.field(conv, k, int, what)
        if out[k] < 1:
            where.fail(f"{what} field {k!r} must be >= 1, got {out[k]}")
    for k, least in _CONV_PAIRS:
        v = where.field(conv, k, list, what)
        if len(v) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= least for d in v):
            where.fail(f"{what} field {k!r} must be two integers >= {least}, got {v!r:.80}")
        out[k] = tuple(v)
    out["bias"] = where.field(conv, "bias", bool, what)
    where.no_extra(conv, _CONV_GEOMETRY, what)
    return out


def _check_conv_replaceable(where: _Where, old: nn.Module, named: dict[str, nn.Module], name: str, cls: type,
                            args: dict) -> None:
    """`old` is an nn.Conv2d that lowbit.quantize would convert, with the saved geometry."""
    if not isinstance(old, nn.Conv2d):
        where.fail(f"is a {type(old).__name__} in the model, not the nn.Conv2d it was quantized from")
    try:
        check_float_conv2d(old)
    except Unsupported as e:
        where.fail(f"the model's Conv2d cannot hold a {cls.__name__}: {e}")
    if parametrize.is_parametrized(old):
        where.fail("has a parametrization, which replacing the module would drop")
    parent_name, _, child = name.rpartition(".")
    try:
        check_parent(named[parent_name], child)
    except ValueError as e:
        where.fail(str(e))
    conv = args["conv"]
    for k in _CONV_GEOMETRY:
        theirs = old.bias is not None if k == "bias" else getattr(old, k)
        theirs = tuple(theirs) if isinstance(theirs, (tuple, list)) else theirs
        if conv[k] != theirs:
            saved = list(conv[k]) if isinstance(conv[k], tuple) else conv[k]
            where.fail(f"conv field {k!r} was saved as {saved}, the model's Conv2d has "
                       f"{list(theirs) if isinstance(theirs, tuple) else theirs}")
    if cls is QuantizedConv2d:
        lin_cls, lin_args = args["linear"]
        limit = getattr(lin_cls, "max_in_features", None)
        if limit is not None and lin_args["in_features"] > limit:
            where.fail(f"in_features={lin_args['in_features']} (in_channels*kh*kw) exceeds {limit}, beyond which "
                       f"{lin_cls.__name__}'s int32 accumulation could overflow")


def _build_conv(cls: type, args: dict, device: torch.device) -> nn.Module:
    g = args["conv"]
    geometry = (g["in_channels"], g["out_channels"], g["kernel_size"], g["stride"], g["padding"], g["dilation"])
    if cls is BinaryConv2d:
        return BinaryConv2d(*geometry, g["bias"], binary_activations=args["binary_activations"], device=device,
                            dtype=args["dtype"])
    lin_cls, lin_args = args["linear"]
    return QuantizedConv2d(lin_cls(device=device, **lin_args), *geometry)


# ----------------------------------------------------------------------------- load: the tensors
def _finite(where: _Where, name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        where.fail(f"tensor {name!r} has inf or NaN values")


def _fp8_codes_finite(where: _Where, q: torch.Tensor) -> None:
    # Checked on the bits: fp8 arithmetic is not implemented everywhere, and decoding to float32
    # would cost 4 bytes per weight. e4m3fn: S.1111.111 is NaN (it has no inf); e5m2: exponent
    # 11111 is inf (mantissa 0) or NaN.
    bits = q.view(torch.uint8) & 0x7F
    bad = bits == 0x7F if q.dtype == torch.float8_e4m3fn else bits >= 0x7C
    if bool(bad.any()):
        where.fail("tensor 'qweight' has NaN or inf fp8 codes, which no quantizer produces")


def _check_values(where: _Where, m: nn.Module, t: dict[str, torch.Tensor]) -> None:
    """The module's tensors against its format: what the kernels rely on and never re-check."""
    try:
        if isinstance(m, (Int8Linear, Int8WeightOnlyLinear)):
            int8_fmt.validate(t["qweight"], t["scale"])
            if t["qweight"].numel() and int(t["qweight"].min()) < -int8_fmt.QMAX:
                where.fail(f"tensor 'qweight' has the value -128; int8 weights lie in "
                           f"[-{int8_fmt.QMAX}, {int8_fmt.QMAX}]")
            _finite(where, "scale", t["scale"])
            if "act_scale" in t:
                _finite(where, "act_scale", t["act_scale"])
                if not float(t["act_scale"]) > 0:
                    where.fail("tensor 'act_scale' must be > 0")
        elif isinstance(m, Int4Linear):
            x = torch.empty(1, m.in_features, dtype=m.orig_dtype, device=t["packed"].device)
            _checks.int4_weight_only_mm("int4_weight_only_mm", x, t["packed"], t["scale"], t.get("zero"),
                                        m.group_size, t.get("bias"))
            _finite(where, "scale", t["scale"])
            if "zero" in t:
                _finite(where, "zero", t["zero"])
        elif isinstance(m, FP8Linear):
            fp8_fmt.validate(t["qweight"], t["scale"], m.granularity)
            _fp8_codes_finite(where, t["qweight"])
            _finite(where, "scale", t["scale"])
            if "act_scale" in t:
                _finite(where, "act_scale", t["act_scale"])
                if not float(t["act_scale"]) > 0:
                    where.fail("tensor 'act_scale' must be > 0")
        elif isinstance(m, (BinaryLinear, BinaryConv2d)):  # ---- conv: BinaryConv2d holds the same buffers
            binary_fmt.validate(t["packed"], t["scale"], m.in_features)
            _finite(where, "scale", t["scale"])
        elif isinstance(m, Sparse24Linear):  # ---- sparse24: shapes, dtypes and every metadata nibble
            sparse24_fmt.validate(t["values"], t["meta"], m.in_features, t.get("scale"))
            if t["values"].dtype != torch.int8:
                _finite(where, "values", t["values"])
            else:
                _finite(where, "scale", t["scale"])
        # ---- codebook
        elif isinstance(m, CodebookLinear):
            # Every packed code is in range by construction (2**bits entries); what the kernel
            # relies on is the shapes, checked as the op checks them, and finite values.
            codebook_fmt.validate(t["codes"], t["codebooks"], t.get("scale"), t.get("rotation"), m.in_features)
            x = torch.empty(1, m.in_features, dtype=m.orig_dtype, device=t["codes"].device)
            _checks.codebook_mm("codebook_mm", x, t["codes"], t["codebooks"], t.get("scale"), t.get("bias"))
            for name in ("codebooks", "scale", "rotation"):
                if name in t:
                    _finite(where, name, t[name])
        elif isinstance(m, Int4LinearCutlassSm90):  # ---- int4 cutlass_sm90: every nibble is a valid code
            x = torch.empty(1, m.in_features, dtype=m.orig_dtype, device=t["packed"].device)
            _checks.int4_cutlass_sm90_mm("int4_cutlass_sm90_mm", x, t["packed"], t["scale"], t["zero"], m.group_size,
                                         t.get("bias"))
            _finite(where, "scale", t["scale"])
            _finite(where, "zero", t["zero"])
    except ValueError as e:
        if str(e).startswith("lowbit.load:"):
            raise
        where.fail(str(e))


def _read_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file, checked against `expected` (same keys, dtypes, shapes)."""
    file = path / TENSORS_FILE
    where = _Where(file)
    out = {}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing:
                where.fail(f"is missing tensor(s) the model needs: {missing[:10]}")
            if extra:
                where.fail(f"has tensor(s) the model does not have: {extra[:10]}")
            for key, ref in expected.items():
                # Shape first, from the header: a wrong tensor is never read into memory.
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(ref.shape):
                    where.fail(f"tensor {key!r} has shape {list(shape)}, the model expects {list(ref.shape)}")
                t = f.get_tensor(key)
                if t.dtype != ref.dtype:
                    where.fail(f"tensor {key!r} has dtype {_dtype_name(t.dtype)}, the model expects "
                               f"{_dtype_name(ref.dtype)} (cast the model with .to(dtype) before loading?)")
                out[key] = t
    except ValueError as e:
        if str(e).startswith("lowbit.load:"):
            raise
        raise ValueError(f"lowbit.load: cannot read {file}: {e}") from None
    except Exception as e:  # noqa: BLE001  safetensors raises its own SafetensorError, OSError, ...
        raise ValueError(f"lowbit.load: cannot read {file} (truncated or corrupted?): "
                         f"{type(e).__name__}: {e}") from None
    return out


# ----------------------------------------------------------------------------- load
def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a directory written by :func:`save` into `model`, a fresh instance of the same float
    architecture: each layer listed in ``lowbit.json`` is replaced by its quantized module, then
    every tensor is loaded. Returns `model`.

    Raises ValueError (naming the file, module and tensor) for anything that does not match the
    model or the formats; `model` is left unchanged then.
    """
    path = Path(path)
    file = path / CONFIG_FILE
    header = _read_header(path)
    if isinstance(model, QuantizedLinear) or not isinstance(model, nn.Module):
        raise ValueError(f"lowbit.load: model must be the float nn.Module to load into, got {type(model).__name__}")

    named = dict(model.named_modules(remove_duplicate=False))
    plan = []  # (name, parent, child_name, old linear, new module)
    built: dict[int, tuple[nn.Module, type, dict]] = {}  # id(float linear) -> module built for it
    seen = set()
    for i, entry in enumerate(header["modules"]):
        is_conv = isinstance(entry, dict) and isinstance(entry.get("class"), str) and entry["class"] in _CONV_CLASSES
        if is_conv:  # ---- conv
            name, cls, args, tensors = _parse_conv_module(file, i, entry, header["format_version"])
        else:
            name, cls, args, tensors = _parse_module(file, i, entry)
        where = _Where(file, name)
        if name in seen:
            where.fail("is listed twice")
        seen.add(name)
        old = named.get(name)
        if old is None:
            where.fail(f"the model has no module named {name!r}")
        if is_conv:
            _check_conv_replaceable(where, old, named, name, cls, args)
        else:
            _check_replaceable(where, old, named, name)
            if (old.in_features, old.out_features) != (args["in_features"], args["out_features"]):
                where.fail(f"was saved as [out, in]=[{args['out_features']}, {args['in_features']}], the model's "
                           f"layer is [{old.out_features}, {old.in_features}]")
            if (old.bias is not None) != args["bias"]:
                where.fail(f"was saved {'with' if args['bias'] else 'without'} a bias, the model's layer "
                           f"{'has' if old.bias is not None else 'has no'} bias")
            limit = getattr(cls, "max_in_features", None)
            if limit is not None and args["in_features"] > limit:
                where.fail(f"in_features={args['in_features']} exceeds {limit}, beyond which "
                           f"{cls.__name__}'s int32 accumulation could overflow")
        if old.weight.device.type == "meta":
            where.fail("the model's layer is on the meta device; load into a materialized model")
        if id(old) in built:  # one Linear at several places: one quantized module at all of them
            new, first_cls, first_args = built[id(old)]
            if (first_cls, first_args) != (cls, args):
                where.fail("is the same layer as another listed module but was saved with different arguments")
        else:
            try:
                new = _build_conv(cls, args, old.weight.device) if is_conv else cls(device=old.weight.device, **args)
            except ValueError as e:
                where.fail(str(e))
            built[id(old)] = (new, cls, args)
        want = {k: (t.dtype, tuple(t.shape)) for k, t in new.state_dict().items()}
        if tensors != want:
            where.fail(f"tensors {_fmt_specs(tensors)} do not match what {cls.__name__} with these arguments "
                       f"holds: {_fmt_specs(want)}")
        parent_name, _, child = name.rpartition(".")
        plan.append((name, named[parent_name], child, old, new))

    # Swap, check every tensor against the swapped model, and swap back if anything is wrong.
    for _, parent, child, _, new in plan:
        parent._modules[child] = new
    try:
        expected = model.state_dict()
        for key, t in expected.items():
            if t.device.type == "meta":
                raise ValueError(f"lowbit.load: model tensor {key!r} is on the meta device; load into a "
                                 f"materialized model")
        aliases = _check_aliases(_Where(file), header["aliases"], expected)
        stored = {k: v for k, v in expected.items() if k not in aliases}
        coded = header.get("entropy_coded")
        if coded is not None:  # ---- compress: Huffman-coded codes, decoded before the value checks
            from .compress import huffman
            where = _Where(path / TENSORS_FILE)
            linears = [(f"{name}.linear", new.linear) if isinstance(new, QuantizedConv2d) else (name, new)
                       for name, _, _, _, new in plan]  # ---- conv: a QuantizedConv2d's codes are its linear's
            code_tensors = {f"{name}.{'packed' if isinstance(new, Int4Linear) else 'qweight'}":
                            ("int4" if isinstance(new, Int4Linear) else "int8", new.in_features * new.out_features)
                            for name, new in linears if isinstance(new, (Int4Linear, Int8Linear,
                                                                         Int8WeightOnlyLinear))}
            tensors = _read_tensors(path, huffman.storage_plan(coded, stored, code_tensors, _Where(file).fail))
            huffman.decode_from_storage(coded, tensors, stored, where.fail)
        else:
            tensors = _read_tensors(path, stored)
        for key, target in aliases.items():
            tensors[key] = tensors[target]
        done = set()
        for name, _, _, _, new in plan:
            if id(new) in done:
                continue
            done.add(id(new))
            prefix = name + "."
            if isinstance(new, QuantizedConv2d):  # ---- conv: the values are its linear's
                new, prefix = new.linear, name + ".linear."
            _check_values(_Where(path / TENSORS_FILE, name), new,
                          {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                           and "." not in k[len(prefix):]})
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:  # keys, shapes and dtypes were checked; only a model's own hooks get here
            raise ValueError(f"lowbit.load: {path / TENSORS_FILE}: {e}") from None
    except BaseException:
        for _, parent, child, old, _ in plan:
            parent._modules[child] = old
        raise
    return model


def _check_replaceable(where: _Where, old: nn.Module, named: dict[str, nn.Module], name: str) -> None:
    # What lowbit.quantize would have refused to swap (see check_float_linear), minus the checks
    # on weight values: a fresh model's weights are about to be overwritten and may be garbage.
    if not isinstance(old, nn.Linear) or isinstance(old, QuantizedLinear):
        where.fail(f"is a {type(old).__name__} in the model, not the nn.Linear it was quantized from")
    if (isinstance(old, nn.modules.linear.NonDynamicallyQuantizableLinear)
            or type(old).forward is not nn.Linear.forward):
        where.fail(f"is a {type(old).__name__}, which lowbit.quantize never replaces")
    if parametrize.is_parametrized(old) or old._forward_hooks or old._forward_pre_hooks:
        where.fail("has a parametrization or forward hooks, which replacing the module would drop")
    parent_name, _, child = name.rpartition(".")
    try:
        check_parent(named[parent_name], child)
    except ValueError as e:
        where.fail(str(e))


def _check_aliases(where: _Where, aliases: dict, expected: dict[str, torch.Tensor]) -> dict[str, str]:
    for key, target in aliases.items():
        if not isinstance(target, str):
            where.fail(f"alias {key!r} must name a tensor, got {type(target).__name__}")
        if key not in expected:
            where.fail(f"alias {key!r} is not a tensor of the model")
        if target not in expected or target in aliases:
            where.fail(f"alias {key!r} -> {target!r:.80} must point to a stored tensor of the model")
        a, b = expected[key], expected[target]
        if a.dtype != b.dtype or a.shape != b.shape:
            where.fail(f"alias {key!r} -> {target!r}: the model's tensors differ in dtype or shape")
    return aliases


def _fmt_specs(specs: dict) -> str:
    return "{" + ", ".join(f"{k}: {_dtype_name(d)}{list(s)}" for k, (d, s) in sorted(specs.items())) + "}"


__all__ = ["save", "load", "FORMAT_VERSION"]
