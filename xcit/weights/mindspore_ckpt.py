"""MindSpore ``.ckpt`` files and MindCV's XCiT parameter names, without MindSpore.

File format
-----------
A MindSpore checkpoint is a concatenation of serialised ``Checkpoint`` protobuf messages, one per tensor chunk
(mindspore/train/serialization.py: ``_write_parameter_data`` / ``_write_parameter_bytes_data``). Parsing the whole
file as one ``Checkpoint`` merges them (protobuf concatenates repeated fields). The schema, as compiled into
mindspore/train/checkpoint_pb2.py (MindSpore 2.10, proto2)::

    message Checkpoint {
      message Value {
        required string tag = 1;
        oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; }
      }
      repeated Value value = 1;
    }
    message TensorProto {
      repeated int64 dims = 1;
      required string tensor_type = 2;   // "Float32", "BFloat16", "Int64", "Bool", ... or "str"
      required bytes tensor_content = 3; // raw little-endian C-order bytes
    }
    message MapTensorProto { repeated TensorProto tensor = 1; }

Details handled here:

* Tensors larger than 512 MiB are split over several consecutive ``Value`` entries with the same ``tag`` and the
  full ``dims`` each; their contents are concatenated.
* Scalars have ``dims == []``; older MindSpore wrote ``[0]`` (the loader maps ``[0]`` to a scalar).
* ``tensor_type == "str"`` entries (strings from ``append_dict``) hold UTF-32 text and ``maptensor`` entries hold
  MindSpore ``MapParameter`` hash tables; neither is a tensor, both are skipped (map tables with a warning).
* ``save_checkpoint(..., crc_check=True)`` appends ``b"crc_num"`` plus a 10-byte big-endian CRC32 of the protobuf
  bytes; it is stripped and verified.
* Encrypted checkpoints (``enc_key``) and MindSpore's ``format="safetensors"`` files are not supported.

MindCV's numerics differ from the official XCiT
-----------------------------------------------
Checked against mindcv/models/xcit.py (MindCV 0.3.0) and MindSpore 2.10's ``nn`` layers. Only two things differ;
with both switched (this project's ``flavour="mindcv"``) a PyTorch model reproduces MindCV's logits to ~1e-6.

1. **XCA does not L2-normalise q and k.** mindcv ``XCA.construct`` computes ``attn = (q @ k^T) * temperature``
   straight from the projections; the official code first applies ``F.normalize(., dim=-1)`` to q and k along the
   token axis. The Gram matrix therefore grows with the number of tokens, so MindCV's model is not resolution
   invariant in the way the official one is.
2. **Every GELU is the tanh approximation.** MindSpore's ``nn.GELU(approximate=True)`` is the default and MindCV
   never overrides it, so ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` is used at each site where the
   official model uses the exact erf GELU:

   * ConvPatchEmbed: the GELUs between the conv+BN stages (``patch_embed.proj.{1,3,5}``; ``{1,3}`` for p8);
   * LPI: ``local_mp.act`` between ``conv1`` and ``bn`` (``XCABlock`` passes ``act_layer=nn.GELU``);
   * MLP: ``mlp.act`` in every XCA block and in both class-attention blocks (mindcv ``layers/mlp.py``).

Everything else is numerically the same as the official model / timm at inference time:

* LayerNorm eps 1e-6 everywhere (``partial(nn.LayerNorm, epsilon=1e-6)``; MindSpore's own default would be 1e-7).
* BatchNorm eps 1e-5; momentum 0.9 in MindSpore's convention (``moving = moving * 0.9 + batch * 0.1``), i.e.
  PyTorch's 0.1 -- only relevant when training.
* Fourier positional encoding: hidden 32, temperature 10000, scale 2*pi, eps 1e-6, ``cat(y, x)``, 1x1 conv,
  recomputed from (Hp, Wp) each forward, added once before the blocks.
* Class attention: query from the cls token only, scale ``head_dim ** -0.5``, softmax over all tokens; the patch
  tokens pass through as ``norm1(x)[:, 1:]`` and are added to the residual (the official quirk), ``tokens_norm``
  applies norm2 to all tokens or to the cls token only; the final LayerNorm, token 0, then ``head``.
* Block order x + g1*XCA(n1 x), x + g3*LPI(n3 x), x + g2*MLP(n2 x); XCA temperature ``(heads, 1, 1)``.
* Drop path: one constant rate for all XCA blocks (``dpr = [drop_path_rate] * depth``), none in class attention;
  ``DropPath(scale_by_keep=True)``. MindCV's recipe uses 0.0.

MindCV quirks that are not numeric: ``XCiT(eta=None)`` (its default) fails, since ``XCABlock`` multiplies ``eta``;
``ConvPatchEmbed`` ignores ``in_chans`` and always takes 3 channels; only ``xcit_tiny_12_p16_224`` is registered
(``eta=1.0, tokens_norm=True``).

Parameter names
---------------
MindCV's names follow the official model's module tree (``pos_embeder``, fused class-attention ``attn.qkv``,
``patch_embed.proj.{0,2,4,6}.{0: conv, 1: BN}``) but with MindSpore's parameter names for the norms:
LayerNorm/BatchNorm ``gamma``/``beta`` and BatchNorm ``moving_mean``/``moving_variance``. LayerScale vectors are
``gamma1``/``gamma2``/``gamma3`` on the block itself, so they never collide with a norm's ``gamma``. Dense and
Conv2d weights have PyTorch's shapes (``(out, in)``, ``(out, in / groups, kh, kw)``), so no tensor is transposed.
MindCV training checkpoints (``TrainStep`` saved by its callback) also hold ``ema.``-prefixed EMA copies
(mindcv/utils/train_step.py) and optimiser / loss-scale state, which :func:`mindcv_to_timm` drops.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Mapping

import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "MindSporeCheckpointError",
    "mindcv_to_timm",
    "read_mindspore_ckpt",
    "read_mindspore_ckpt_strings",
    "timm_to_mindcv",
    "write_mindspore_ckpt",
]


class MindSporeCheckpointError(ValueError):
    """A file is not a readable MindSpore checkpoint; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# Protobuf schema, built at runtime (no protoc step, no MindSpore import)
# ----------------------------------------------------------------------------------------------------------------------


def _build_message_classes() -> tuple[type, type]:
    """Return the ``(Checkpoint, TensorProto)`` message classes of mindspore/train/checkpoint.proto.

    They live in a private descriptor pool, so they never clash with MindSpore's own ``checkpoint.proto`` when both
    are imported in one process.
    """
    fdp = descriptor_pb2.FileDescriptorProto(name="xcit_mindspore_checkpoint.proto", syntax="proto2")
    F = descriptor_pb2.FieldDescriptorProto
    req, opt, rep = F.LABEL_REQUIRED, F.LABEL_OPTIONAL, F.LABEL_REPEATED

    def field(msg, name: str, number: int, label: int, ftype: int, type_name: str = "", oneof: int | None = None):
        f = msg.field.add(name=name, number=number, label=label, type=ftype)
        if type_name:
            f.type_name = type_name
        if oneof is not None:
            f.oneof_index = oneof

    tensor = fdp.message_type.add(name="TensorProto")
    field(tensor, "dims", 1, rep, F.TYPE_INT64)
    field(tensor, "tensor_type", 2, req, F.TYPE_STRING)
    field(tensor, "tensor_content", 3, req, F.TYPE_BYTES)

    map_tensor = fdp.message_type.add(name="MapTensorProto")
    field(map_tensor, "tensor", 1, rep, F.TYPE_MESSAGE, ".TensorProto")

    ckpt = fdp.message_type.add(name="Checkpoint")
    value = ckpt.nested_type.add(name="Value")
    value.oneof_decl.add(name="value")
    field(value, "tag", 1, req, F.TYPE_STRING)
    field(value, "tensor", 2, opt, F.TYPE_MESSAGE, ".TensorProto", oneof=0)
    field(value, "maptensor", 3, opt, F.TYPE_MESSAGE, ".MapTensorProto", oneof=0)
    field(ckpt, "value", 1, rep, F.TYPE_MESSAGE, ".Checkpoint.Value")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    ckpt_desc = pool.FindMessageTypeByName("Checkpoint")
    tensor_desc = pool.FindMessageTypeByName("TensorProto")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.21
        return message_factory.GetMessageClass(ckpt_desc), message_factory.GetMessageClass(tensor_desc)
    factory = message_factory.MessageFactory(pool)  # pragma: no cover - protobuf 3.20
    return factory.GetPrototype(ckpt_desc), factory.GetPrototype(tensor_desc)


_Checkpoint, _TensorProto = _build_message_classes()

# mindspore/train/serialization.py: tensor_to_ms_type / _tensor_to_np_type (the strings are str(mindspore.dtype)).
_MS_TO_TORCH: dict[str, torch.dtype] = {
    "Bool": torch.bool,
    "Int8": torch.int8,
    "UInt8": torch.uint8,
    "Int16": torch.int16,
    "UInt16": torch.uint16,
    "Int32": torch.int32,
    "UInt32": torch.uint32,
    "Int64": torch.int64,
    "UInt64": torch.uint64,
    "Float16": torch.float16,
    "BFloat16": torch.bfloat16,
    "Float32": torch.float32,
    "Float64": torch.float64,
}
_TORCH_TO_MS: dict[torch.dtype, str] = {v: k for k, v in _MS_TO_TORCH.items()}

# serialization.py: SLICE_SIZE (KiB) * 1024; tensors above this are written as several chunks of this many bytes.
_CHUNK_BYTES = 512 * 1024 * 1024
# serialization.py: _exec_save appends b"crc_num" + crc32.to_bytes(10, "big") when crc_check=True.
_CRC_MARK, _CRC_LEN = b"crc_num", 10


# ----------------------------------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------------------------------


def _parse(path: str, data: bytes):
    """Parse the file's bytes into a ``Checkpoint`` message, raising :class:`MindSporeCheckpointError`."""
    if not data:
        raise MindSporeCheckpointError(f"{path}: empty file, not a MindSpore checkpoint")
    if len(data) > len(_CRC_MARK) + _CRC_LEN and data[-(len(_CRC_MARK) + _CRC_LEN) : -_CRC_LEN] == _CRC_MARK:
        expected = int.from_bytes(data[-_CRC_LEN:], "big")
        data = data[: -(len(_CRC_MARK) + _CRC_LEN)]
        if zlib.crc32(data) != expected:
            raise MindSporeCheckpointError(f"{path}: CRC32 mismatch, the MindSpore checkpoint is corrupted")
    msg = _Checkpoint()
    try:
        msg.ParseFromString(data)
    except Exception as e:  # DecodeError, RecursionError, ... all mean "not a checkpoint"
        raise MindSporeCheckpointError(
            f"{path}: not a valid MindSpore checkpoint (truncated, corrupted, encrypted or another format): {e}"
        ) from None
    if not msg.value:
        raise MindSporeCheckpointError(f"{path}: no tensors found, not a MindSpore checkpoint")
    return msg


def _to_tensor(path: str, tag: str, dims: list[int], tensor_type: str, content: bytes) -> torch.Tensor:
    """Turn one tensor's (dims, type, bytes) into a torch tensor, validating sizes."""
    dtype = _MS_TO_TORCH.get(tensor_type)
    if dtype is None:
        raise MindSporeCheckpointError(f"{path}: tensor {tag!r} has unsupported tensor_type {tensor_type!r}")
    if any(d < 0 for d in dims):
        raise MindSporeCheckpointError(f"{path}: tensor {tag!r} has negative dims {dims}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dims == [0] and len(content) == itemsize:
        dims = []  # serialization.py (_load_ckpt_into_param_dict): "if dims == [0]: dims = []" (old scalar layout)
    expected = math.prod(dims) * itemsize
    if len(content) != expected:
        raise MindSporeCheckpointError(
            f"{path}: tensor {tag!r} has {len(content)} bytes of data, expected {expected} "
            f"for {tensor_type}{list(dims)} (file truncated or corrupted?)"
        )
    if expected == 0:
        return torch.empty(dims, dtype=dtype)
    t = torch.frombuffer(bytearray(content), dtype=torch.uint8)
    if dtype == torch.bool and bool((t > 1).any()):
        raise MindSporeCheckpointError(f"{path}: Bool tensor {tag!r} holds bytes other than 0 and 1")
    return t.view(dtype).reshape(dims)


def read_mindspore_ckpt(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a MindSpore ``.ckpt`` file into ``{name: tensor}`` (CPU tensors, in file order); see
    :func:`read_mindspore_ckpt_strings` for the string entries as well.

    String entries and ``MapParameter`` tables are skipped. Raises :class:`MindSporeCheckpointError` (a
    ``ValueError``) naming ``path`` for an empty, truncated, corrupted or foreign file, an unknown dtype, a data
    length that does not match ``prod(dims) * itemsize``, or a name that occurs twice. A file cut exactly between two
    tensors cannot be told from a complete one (the format has no footer unless written with ``crc_check=True``).
    """
    return read_mindspore_ckpt_strings(path)[0]


def read_mindspore_ckpt_strings(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`read_mindspore_ckpt` plus the file's string entries (``save_checkpoint(append_dict={name: str})``),
    such as the numerics flavour this project records."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise MindSporeCheckpointError(f"{path}: is a directory, not a MindSpore checkpoint") from None
    msg = _parse(path, data)

    out: dict[str, torch.Tensor] = {}
    strings: dict[str, str] = {}
    skipped_maps: list[str] = []
    values = msg.value
    i = 0
    while i < len(values):
        v = values[i]
        tag = v.tag
        if not isinstance(tag, str):  # python protobuf returns proto2 strings that are not valid UTF-8 as bytes
            raise MindSporeCheckpointError(f"{path}: parameter name {tag!r} is not valid UTF-8 (corrupted file)")
        if tag in out:
            raise MindSporeCheckpointError(f"{path}: tensor {tag!r} occurs twice")
        if not v.HasField("tensor"):  # a MapParameter (its slices share the tag) or an empty Value
            if not v.HasField("maptensor"):
                raise MindSporeCheckpointError(f"{path}: entry {tag!r} holds no tensor")
            skipped_maps.append(tag)
            while i < len(values) and values[i].tag == tag:
                i += 1
            continue
        dims, tensor_type = list(v.tensor.dims), v.tensor.tensor_type
        chunks = [v.tensor.tensor_content]
        i += 1
        # serialization.py (_load_ckpt_into_param_dict): consecutive values with one tag are chunks of one tensor.
        while i < len(values) and values[i].tag == tag:
            c = values[i]
            if not c.HasField("tensor") or list(c.tensor.dims) != dims or c.tensor.tensor_type != tensor_type:
                raise MindSporeCheckpointError(f"{path}: inconsistent chunks for tensor {tag!r}")
            chunks.append(c.tensor.tensor_content)
            i += 1
        if tensor_type == "str":  # a string from save_checkpoint(append_dict=...); not a tensor
            strings[tag] = _decode_string(b"".join(chunks))
            continue
        out[tag] = _to_tensor(path, tag, dims, tensor_type, b"".join(chunks))
    if skipped_maps:
        warnings.warn(f"{path}: skipped MapParameter entries {skipped_maps}", stacklevel=2)
    if not out:
        raise MindSporeCheckpointError(f"{path}: no tensors found, not a MindSpore checkpoint")
    return out, strings


def _decode_string(content: bytes) -> str:
    """A string entry's text. serialization.py stores ``np.array(value)``'s bytes: numpy's ``<U`` dtype, UTF-32-LE
    without a byte-order mark, padded with NULs (load_checkpoint reads it back with ``np.frombuffer``)."""
    return content.decode("utf-32-le", errors="replace").rstrip("\0")


def _string_message(name: str, text: str) -> bytes:
    msg = _Checkpoint()
    value = msg.value.add()
    value.tag = name
    value.tensor.dims.append(0)  # serialization.py writes strings with dims [0]
    value.tensor.tensor_type = "str"
    value.tensor.tensor_content = text.encode("utf-32-le")
    return msg.SerializeToString()


def _serialise(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise ``state`` the way MindSpore's ``save_checkpoint`` does: one ``Checkpoint`` message per chunk."""
    parts: list[bytes] = []
    for name, t in state.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"checkpoint names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _TORCH_TO_MS:
            raise TypeError(f"{name!r}: dtype {t.dtype} has no MindSpore checkpoint equivalent")
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        for start in range(0, max(len(raw), 1), _CHUNK_BYTES):
            msg = _Checkpoint()
            value = msg.value.add()
            value.tag = name
            # serialization.py (save_checkpoint): dims = list(shape), so a scalar has dims [].
            value.tensor.dims.extend(t.shape)
            value.tensor.tensor_type = _TORCH_TO_MS[t.dtype]
            value.tensor.tensor_content = raw[start : start + _CHUNK_BYTES]
            parts.append(msg.SerializeToString())
    return b"".join(parts)


def write_mindspore_ckpt(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], strings: Mapping[str, str] | None = None
) -> None:
    """Write ``state`` as a MindSpore ``.ckpt`` that ``mindspore.load_checkpoint`` and MindCV read, plus
    ``strings`` as string entries after the tensors (what ``save_checkpoint``'s ``append_dict`` writes for a ``str``;
    ``load_param_into_net`` ignores names the network lacks).

    The file is written to a temporary file in the same directory and renamed over ``path``, so readers never see
    a partial file. Tensors are written in ``state``'s order, in their own dtype, on the CPU.
    """
    if not state:
        raise ValueError(f"{os.fspath(path)}: refusing to write an empty checkpoint")
    data = _serialise(state) + b"".join(_string_message(k, v) for k, v in (strings or {}).items())
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------------------
# Key maps: MindCV <-> timm layout
# ----------------------------------------------------------------------------------------------------------------------

# Modules whose parameters are renamed. mindcv/models/xcit.py: XCABlock.norm{1,2,3}, ClassAttentionBlock.norm{1,2},
# XCiT.norm are nn.LayerNorm; conv3x3() = SequentialCell([Conv2d, BatchNorm2d]) inside ConvPatchEmbed.proj (indices
# 0, 2, 4[, 6]) and LPI.bn are nn.BatchNorm2d.
_LN_MODULE = re.compile(r"norm|blocks\.\d+\.norm[123]|cls_attn_blocks\.\d+\.norm[12]")
_BN_MODULE = re.compile(r"patch_embed\.proj\.\d+\.1|blocks\.\d+\.local_mp\.bn")
_LN_MS_TO_PT = {"gamma": "weight", "beta": "bias"}
_BN_MS_TO_PT = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_LN_PT_TO_MS = {v: k for k, v in _LN_MS_TO_PT.items()}
_BN_PT_TO_MS = {v: k for k, v in _BN_MS_TO_PT.items()}

# Parameters with the same name in both layouts.
_SAME = re.compile(
    r"cls_token"
    r"|head\.(weight|bias)"
    r"|patch_embed\.proj\.\d+\.0\.weight"  # conv3x3: Conv2d(has_bias=False)
    r"|blocks\.\d+\.(gamma[123]|attn\.temperature|attn\.(qkv|proj)\.(weight|bias)"
    r"|mlp\.fc[12]\.(weight|bias)|local_mp\.conv[12]\.(weight|bias))"
    r"|cls_attn_blocks\.\d+\.(gamma[12]|attn\.proj\.(weight|bias)|mlp\.fc[12]\.(weight|bias))"
)
# mindcv: XCiT.pos_embeder = PositionalEncodingFourier; timm renames it pos_embed (timm xcit.checkpoint_filter_fn).
_POS_MS = re.compile(r"pos_embeder\.token_projection\.(weight|bias)")
_POS_PT = re.compile(r"pos_embed\.token_projection\.(weight|bias)")
# mindcv ClassAttention.qkv is one nn.Dense(dim, 3 * dim); timm's ClassAttn has separate q, k, v Linears.
_CA_QKV = re.compile(r"(cls_attn_blocks\.\d+\.attn)\.qkv\.(weight|bias)")
_CA_QKV_SPLIT = re.compile(r"(cls_attn_blocks\.\d+\.attn)\.([qkv])\.(weight|bias)")

# Entries of MindCV / MindSpore training checkpoints that are not model weights.
_EMA_PREFIX = "ema."  # mindcv/utils/train_step.py: weights_all.clone("ema", init="same")
_TRAINING_PREFIXES = (
    "adam_m.", "adam_v.",  # mindcv/optim/adamw.py, mindspore AdamWeightDecay
    "moments.",  # mindspore nn.Momentum
    "moment1.", "moment2.", "moment3.", "vhat.",  # mindspore nn.Adam, mindcv/optim/adan.py
    "prev_gradient.", "lion_m.", "nadam_m.", "nadam_v.",  # mindcv/optim/{adan,lion,nadam}.py
    "accu_grads.",  # mindspore gradient accumulation
    "swap.",  # mindcv/utils/callbacks.py: EMA swap buffer
)  # fmt: skip
_TRAINING_NAMES = frozenset({
    "global_step", "learning_rate", "weight_decay", "momentum",  # mindspore nn.Optimizer and subclasses
    "beta1_power", "beta2_power", "mu_schedule",  # Adam/AdamW/NAdam
    "scale_sense", "current_iterator_step", "last_overflow_iterator_step",  # loss-scale cells
    "updates",  # mindcv TrainStep EMA counter
    "epoch_num", "step_num",  # mindspore ModelCheckpoint append_info
    "graceful_exit", "graceful_init",  # mindspore TrainOneStepCell
})  # fmt: skip


def _split_training_checkpoint(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a MindCV checkpoint into (model weights, EMA weights with ``ema.`` stripped), dropping training state."""
    model: dict[str, torch.Tensor] = {}
    ema: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_EMA_PREFIX):
            ema[k[len(_EMA_PREFIX) :]] = v
        elif k in _TRAINING_NAMES or k.startswith(_TRAINING_PREFIXES):
            continue
        else:
            model[k] = v
    return model, ema


def _unknown(keys: list[str], what: str) -> ValueError:
    shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
    return ValueError(f"not a {what} XCiT state dict; unrecognised keys: {shown}")


def _mindcv_weights_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename one set of MindCV XCiT weights (no prefixes, no training state) to timm's names."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        module, _, leaf = k.rpartition(".")
        if _SAME.fullmatch(k):
            out[k] = v
        elif m := _POS_MS.fullmatch(k):
            out[f"pos_embed.token_projection.{m[1]}"] = v
        elif _LN_MODULE.fullmatch(module) and leaf in _LN_MS_TO_PT:
            out[f"{module}.{_LN_MS_TO_PT[leaf]}"] = v
        elif _BN_MODULE.fullmatch(module) and leaf in _BN_MS_TO_PT:
            out[f"{module}.{_BN_MS_TO_PT[leaf]}"] = v
            if leaf == "moving_variance":  # torch BatchNorm's extra buffer; MindSpore has no counterpart
                out[f"{module}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        elif m := _CA_QKV.fullmatch(k):
            # mindcv ClassAttention: qkv(x).reshape(B, N, 3, heads, head_dim) -> rows are [q; k; v].
            if v.shape[0] % 3:
                raise ValueError(f"{k}: first dimension {v.shape[0]} is not divisible by 3")
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{m[1]}.{name}.{m[2]}"] = part.clone()
        else:
            unknown.append(k)
    if unknown:
        raise _unknown(unknown, "MindCV")
    return out


def mindcv_to_timm(sd: Mapping[str, torch.Tensor], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Map a MindCV XCiT checkpoint (as read by :func:`read_mindspore_ckpt`) to timm's ``Xcit`` state dict.

    Args:
        sd: MindCV parameter names to tensors. A training checkpoint may also hold ``ema.``-prefixed EMA copies and
            optimiser / loss-scale entries (``adam_m.*``, ``adam_v.*``, ``moments.*``, ``global_step``,
            ``learning_rate``, ``scale_sense``, ...); the latter are dropped.
        use_ema: return the EMA copy instead of the trained weights. Raises ``ValueError`` when there is none or it
            lacks some of the trained weights.

    Returns:
        timm names to the same tensors (the class-attention ``qkv`` split into ``q``, ``k``, ``v`` copies), plus a
        zero ``num_batches_tracked`` for each BatchNorm. Unrecognised keys raise ``ValueError``.
    """
    model, ema = _split_training_checkpoint(sd)
    if use_ema:
        if not ema:
            raise ValueError("use_ema=True but the checkpoint has no 'ema.' entries")
        missing = sorted(set(model) - set(ema))
        if missing:
            raise ValueError(f"the checkpoint's EMA copy lacks {len(missing)} weights, e.g. {missing[:5]}")
        model = ema
    if not model:
        raise ValueError("the checkpoint holds no model weights")
    return _mindcv_weights_to_timm(model)


def timm_to_mindcv(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map timm's ``Xcit`` state dict to MindCV's parameter names; the inverse of :func:`mindcv_to_timm`.

    ``num_batches_tracked`` buffers are dropped and each class-attention ``q``/``k``/``v`` triple is concatenated
    into one ``qkv`` tensor. The official layout (``pos_embeder.*``, fused class-attention ``attn.qkv``) is accepted
    too. Unrecognised keys raise ``ValueError``.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        module, _, leaf = k.rpartition(".")
        if _SAME.fullmatch(k) or _POS_MS.fullmatch(k) or _CA_QKV.fullmatch(k):
            out[k] = v
        elif m := _POS_PT.fullmatch(k):
            out[f"pos_embeder.token_projection.{m[1]}"] = v
        elif _LN_MODULE.fullmatch(module) and leaf in _LN_PT_TO_MS:
            out[f"{module}.{_LN_PT_TO_MS[leaf]}"] = v
        elif _BN_MODULE.fullmatch(module) and leaf == "num_batches_tracked":
            continue
        elif _BN_MODULE.fullmatch(module) and leaf in _BN_PT_TO_MS:
            out[f"{module}.{_BN_PT_TO_MS[leaf]}"] = v
        elif m := _CA_QKV_SPLIT.fullmatch(k):
            key = f"{m[1]}.qkv.{m[3]}"
            parts = qkv_parts.setdefault((m[1], m[3]), {})
            parts[m[2]] = v
            if len(parts) == 3:  # emit at the position of the last of q, k, v
                shapes = {tuple(p.shape) for p in parts.values()}
                if len(shapes) != 1:
                    raise ValueError(f"{m[1]}.{{q,k,v}}.{m[3]}: shapes differ: {sorted(shapes)}")
                out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:
            unknown.append(k)
    incomplete = [f"{mod}.{{q,k,v}}.{leaf}" for (mod, leaf), p in qkv_parts.items() if len(p) != 3]
    if incomplete:
        raise ValueError(f"class attention needs q, k and v together; incomplete: {incomplete}")
    if unknown:
        raise _unknown(unknown, "timm")
    return out
