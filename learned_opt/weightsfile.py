"""Reading a generator's files without trusting them: regular files only, bounded reads, and the
safetensors header of the weights compared with what the manifest implies before any model is built.

The order in :func:`~learned_opt.pretrained.load_generator`: the manifest is read (bounded, checked
by :mod:`learned_opt.manifest`); the weights file must be a regular file of bounded size (a
symlink to one is followed; ``/dev/zero``, a FIFO or a folder is refused); it is read and hashed;
its safetensors header is parsed by hand (bounded) and checked against the file's size; the
depth, width, MLP size and token shape the manifest asks for are compared with the header's
tensors (:func:`check_header`); only then is the model built, and every one of its tensor shapes
compared with the header (:func:`compare_shapes`) before any weight is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from .errors import WeightsError

MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is not a generator's
MAX_WEIGHTS_BYTES = 16 * 2**30  # a weights file larger than this is not one of this package's generators
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def check_regular(path, what: str, limit: int | None = None) -> None:
    """:class:`WeightsError` unless ``path`` is a regular file (of at most ``limit`` bytes).

    Only a real path is checked; a file inside an installed package that is not a folder on disk
    (a zip) is taken as it is.
    """
    if not isinstance(path, Path):
        return
    try:
        st = os.stat(path)  # follows a symlink: what is checked is what would be read
    except OSError as exc:
        raise WeightsError(f"{what} {path} is missing or unreadable ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{what} {path} is not a regular file (a device, FIFO or folder); point it at the real file")
    if limit is not None and st.st_size > limit:
        raise WeightsError(f"{what} {path} is {st.st_size} bytes, more than the {limit} a {what} may have")


def read_header(blob: bytes, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` from the safetensors header in ``blob`` (the weights
    file's bytes); :class:`WeightsError` if the header is malformed or disagrees with the size."""

    def bad(why: str) -> WeightsError:
        return WeightsError(f"weights of {where} are not a valid safetensors file ({why}); re-download or re-save them")

    if len(blob) < 8:
        raise bad("truncated")
    n = int.from_bytes(blob[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise bad(f"a header of {n} bytes")
    raw, size = blob[8 : 8 + n], len(blob)
    if len(raw) < n:
        raise bad("truncated header")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
        header.pop("__metadata__", None)
        tensors, end = {}, 0
        for name, t in header.items():
            dtype, shape, (start, stop) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
            if dtype not in _ITEMSIZE or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r} has dtype {dtype!r} and shape {list(shape)}")
            if not (isinstance(start, int) and isinstance(stop, int)) or stop - start != math.prod(shape) * _ITEMSIZE[dtype]:
                raise ValueError(f"tensor {name!r} has offsets that do not match its shape")
            tensors[name] = (dtype, shape)
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise bad(f"unreadable header: {str(exc)[:200]}") from None
    if size != 8 + n + end:
        raise bad(f"{size} bytes, the header describes {8 + n + end}")
    return tensors


def check_header(tensors: dict[str, tuple[str, tuple[int, ...]]], model_config: dict, layout, where: str) -> None:
    """Compare the depth, width, MLP size and token shape the manifest asks for with the header,
    so a manifest cannot make the loader build a model larger than its weights file."""
    layers = {int(m.group(1)) for m in map(_BLOCK_RE.match, tensors) if m}
    depth = max(layers) + 1 if layers else 0
    d, n_layers = model_config.get("d_model"), model_config.get("n_layers")
    width = tensors.get("ln_f.weight", ("", ()))[1]
    problems = []
    if depth != n_layers:
        problems.append(f"n_layers is {n_layers}, the weights have {depth} blocks")
    if width != (d,):
        problems.append(f"d_model is {d}, the weights' final norm has shape {list(width)}")
    hidden = int(round(model_config.get("mlp_ratio", 4.0) * d))
    found = tensors.get("blocks.0.mlp.0.weight", ("", ()))[1]
    if depth and found != (hidden, d):
        problems.append(f"mlp_ratio {model_config.get('mlp_ratio', 4.0)} gives MLPs {[hidden, d]}, the file {list(found)}")
    tokens = (layout.num_groups, layout.token_dim, d)  # one encoder per token group: [G, M, d]
    found = tensors.get("theta_encoder.weight", ("", ()))[1]
    if found != tokens:
        problems.append(f"its signature and tokenisation give token encoders {list(tokens)}, the file {list(found)}")
    if problems:
        raise WeightsError(f"generator {where} does not match its manifest: {'; '.join(problems)}")


def compare_shapes(expected: dict[str, tuple[int, ...]], tensors: dict[str, tuple[str, tuple[int, ...]]], where: str) -> None:
    """:class:`WeightsError` listing every tensor whose name or shape differs between the model the
    manifest builds (``expected``) and the weights file's header."""
    diffs = [f"{k}: model {list(s)}, file {list(tensors[k][1])}" for k, s in expected.items()
             if k in tensors and tuple(tensors[k][1]) != tuple(s)]
    diffs += [f"{k}: missing from the file" for k in expected if k not in tensors]
    diffs += [f"{k}: in the file, not in the model" for k in tensors if k not in expected]
    if diffs:
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise WeightsError(f"generator {where} does not match its manifest: {'; '.join(diffs[:5])}{more}")
