"""Import routing traces from public formats (`expertsim trace import --format F FILE`).

Formats:

- ``vllm``: vLLM's routed experts (``--enable-return-routed-experts``), an integer array
  ``[tokens, layers, k]`` per request. A ``.npy`` file is one request. A ``.npz`` holds either
  ``routed_experts`` (alias ``experts``) for all requests' tokens back to back plus the request
  boundaries as ``request_lengths`` [R], ``request_offsets`` [R+1] or ``request_ids`` [tokens],
  or one array per request ``request_0``, ``request_1``, ...; optional ``prompt_lengths`` [R]
  marks each request's first tokens as prefill, the rest decode (without it every token is
  decode).
- ``moe-lightning``: MoE-Lightning's text logs: per forward pass ``input_ids: tensor([[...]])``
  then ``Layer l topk_ids: tensor([[e1, e2], ...])`` for each layer. One file is one request
  (several files: several requests). A pass over several tokens is prefill, a one-token pass
  decode.
- ``parquet`` / ``csv``: the long format of ../shared/traces and ``write_trace``.
- ``numpy``: a plain ``[tokens, layers, k]`` (or ``[tokens, layers]`` for top-1) array in a
  ``.npy``: one request, all tokens of ``phase``.

Per-layer arrays of unequal length (``layer_0``, ``layer_1``, ... in a ``.npz``, or a log whose
last pass stops mid-layer) are "ragged": an error that names the layer and lengths, unless
``truncate_ragged`` (cut every layer to the shortest).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from expertsim.errors import TraceError, foreign_errors
from expertsim.traces.trace import DECODE, MAX_EXPERTS, PREFILL, RoutingTrace, expert_dtype

FORMATS = ("vllm", "moe-lightning", "parquet", "csv", "numpy")


def _load_numpy(path: Path):
    """``np.load`` without pickles; any failure (random bytes, a pickled or object array, a
    truncated file) is one TraceError."""
    with foreign_errors(TraceError, f"cannot read {str(path)!r} as a NumPy .npy/.npz array",
                        "save integer arrays with numpy.save / numpy.savez (no pickled objects)"):
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as z:
                return {k: z[k] for k in z.files}
        return loaded


def _integers(arr, what: str) -> np.ndarray:
    """``arr`` when it holds integers; floats (never truncated silently), text and objects are an error."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.integer):
        sample = f" (first value {arr.ravel()[0].item()!r})" if arr.size and arr.dtype != object else ""
        raise TraceError(f"{what}: expected integers, got dtype {arr.dtype}{sample}; save an integer "
                         f"array (ids and lengths are never rounded)")
    return arr


def _trace_from_requests(arrays: list[np.ndarray], prompt_lengths, num_experts: int | None,
                         source: str, token_ids: list | None = None) -> RoutingTrace:
    experts, request, step, position, phase, tids = [], [], [], [], [], []
    for r, arr in enumerate(arrays):
        n = len(arr)
        p = int(prompt_lengths[r]) if prompt_lengths is not None else 0
        if not 0 <= p <= n:
            raise TraceError(f"{source}: request {r} has prompt length {p} but {n} tokens")
        experts.append(arr)
        request.append(np.full(n, r))
        position.append(np.arange(n))
        ph = np.full(n, DECODE)
        ph[:p] = PREFILL
        phase.append(ph)
        st = np.arange(n) - (p - 1 if p else 0)
        st[:p] = 0
        step.append(st)
        if token_ids is not None:
            tids.append(token_ids[r])
    ex = np.concatenate(experts)
    if ex.size == 0:
        raise TraceError(f"{source}: no tokens (the arrays are empty); nothing to import")
    _check_ids(ex, source, num_experts)
    ne = num_experts or int(ex.max()) + 1
    trace = RoutingTrace(experts=ex.astype(expert_dtype(ne)),
                         request=np.concatenate(request), step=np.concatenate(step),
                         position=np.concatenate(position), phase=np.concatenate(phase),
                         num_experts=ne, token_id=np.concatenate(tids) if tids else None,
                         metadata={"source": source, "num_experts": str(ne)})
    trace.validate()
    return trace


def _check_ids(ex: np.ndarray, source: str, num_experts: int | None) -> None:
    """Expert ids in 0..num_experts-1 (and below 65536: ids are stored in 16 bits)."""
    limit = min(num_experts or MAX_EXPERTS, MAX_EXPERTS)
    bad = (ex < 0) | (ex >= limit)
    if bad.any():
        t, l, j = np.argwhere(bad)[0]
        raise TraceError(
            f"{source}: expert id {int(ex[t, l, j])} at token {t}, layer {l} is out of range "
            f"0..{limit - 1}" + (f" ({num_experts} experts per layer)" if num_experts else
                                 " (ids are stored in 16 bits)") + "; check the array and --num-experts")


def _as_3d(arr, what: str) -> np.ndarray:
    if isinstance(arr, dict):
        raise TraceError(f"{what}: a .npz archive; this format reads one array from a .npy file")
    arr = np.asarray(arr)
    if arr.dtype == object:
        raise TraceError(f"{what}: an object (ragged) array; save one integer array per layer or per request")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TraceError(f"{what}: expert ids must be integers, got dtype {arr.dtype}; they are never rounded")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise TraceError(f"{what}: expected shape [tokens, layers, k], got {arr.shape}")
    if arr.size == 0:
        raise TraceError(f"{what}: the array is empty (shape {arr.shape}); nothing to import")
    return arr


def _stack_layers(per_layer: list[np.ndarray], truncate_ragged: bool, what: str) -> np.ndarray:
    """[tokens, k] arrays per layer -> [tokens, layers, k], checking equal lengths."""
    lengths = [len(a) for a in per_layer]
    if len(set(lengths)) > 1:
        short = int(np.argmin(lengths))
        if not truncate_ragged:
            raise TraceError(
                f"{what}: ragged layers: layer {short} has {lengths[short]} tokens but layer 0 has "
                f"{lengths[0]} (lengths {lengths[:8]}{'...' if len(lengths) > 8 else ''}); pass "
                f"--truncate-ragged to cut every layer to the shortest ({min(lengths)} tokens)"
            )
        per_layer = [a[: min(lengths)] for a in per_layer]
    return np.stack([np.asarray(a).reshape(len(a), -1) for a in per_layer], axis=1)


def import_vllm(path: str | Path, *, num_experts: int | None = None, truncate_ragged: bool = False) -> RoutingTrace:
    path = Path(path)
    source = f"vllm routed experts: {path.name}"
    if path.suffix == ".npy":
        return _trace_from_requests([_as_3d(_load_numpy(path), str(path))], None,
                                    num_experts, source)
    if path.suffix != ".npz":
        raise TraceError(f"{path}: vLLM routed experts are read from .npy or .npz, got {path.suffix!r}")
    data = _load_numpy(path)
    if not isinstance(data, dict):
        raise TraceError(f"{path}: a .npz archive was expected, found a plain array; name it .npy")
    prompts = data.get("prompt_lengths")
    if prompts is not None:
        prompts = _integers(prompts, f"{path}:prompt_lengths").ravel()
    per_request = sorted((int(m.group(1)), k) for k in data if (m := re.fullmatch(r"request_(\d+)", k)))
    per_layer = sorted((int(m.group(1)), k) for k in data if (m := re.fullmatch(r"layer_(\d+)", k)))
    if per_request:
        arrays = [_as_3d(data[k], f"{path}:{k}") for _, k in per_request]
    elif per_layer:
        flat = _stack_layers([data[k] for _, k in per_layer], truncate_ragged, str(path))
        arrays = _split_boundaries(flat, data, path)
    else:
        key = "routed_experts" if "routed_experts" in data else "experts" if "experts" in data else None
        if key is None:
            raise TraceError(
                f"{path}: no routed_experts (or experts, request_0.., layer_0..) array; found {sorted(data)}"
            )
        arrays = _split_boundaries(_as_3d(data[key], f"{path}:{key}"), data, path)
    if prompts is not None and len(prompts) != len(arrays):
        raise TraceError(f"{path}: prompt_lengths has {len(prompts)} entries for {len(arrays)} requests")
    return _trace_from_requests(arrays, prompts, num_experts, source)


def _split_boundaries(flat: np.ndarray, data: dict, path: Path) -> list[np.ndarray]:
    n = len(flat)
    if "request_offsets" in data:
        off = _integers(data["request_offsets"], f"{path}:request_offsets").ravel().astype(np.int64)
    elif "request_lengths" in data:
        lengths = _integers(data["request_lengths"], f"{path}:request_lengths").ravel().astype(np.int64)
        off = np.concatenate([[0], np.cumsum(lengths)])
    elif "request_ids" in data:
        ids = np.asarray(data["request_ids"]).ravel()
        if len(ids) != n:
            raise TraceError(f"{path}: request_ids has {len(ids)} entries for {n} tokens")
        change = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        off = np.append(change, n)
    else:
        off = np.array([0, n])
    if len(off) < 2 or off[0] != 0 or off[-1] != n or (np.diff(off) <= 0).any():
        raise TraceError(
            f"{path}: request boundaries {off[:6].tolist()}... do not cover the {n} tokens "
            f"(they must start at 0, increase, and end at {n})"
        )
    return [flat[a:b] for a, b in zip(off[:-1], off[1:])]


_TENSOR_MARK = re.compile(r"(input_ids|Layer\s+(\d+)\s+topk_ids)\s*:\s*tensor\(")


def _parse_tensor_text(text: str, start: int, where: str) -> tuple[np.ndarray, int]:
    """Parse the bracketed list that starts at ``text[start]`` (after ``tensor(``)."""
    i = text.index("[", start)
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                break
        j += 1
    body = text[i: j + 1]
    if "..." in body:
        raise TraceError(
            f"{where}: the tensor was printed abbreviated ('...'); log it with "
            f"torch.set_printoptions(profile='full')"
        )
    rows = re.findall(r"\[([^\[\]]*)\]", body)
    values = [[int(x) for x in re.findall(r"-?\d+", row)] for row in rows]
    widths = {len(v) for v in values}
    if len(widths) > 1:
        raise TraceError(f"{where}: rows of different widths {sorted(widths)} in one tensor")
    try:
        return np.asarray(values, dtype=np.int64), j + 1
    except OverflowError:
        raise TraceError(f"{where}: a value does not fit 64 bits; expert and token ids are small integers") from None


def parse_moe_lightning(text: str, where: str, *, truncate_ragged: bool = False):
    """Per pass: experts [tokens, layers, k] and the input token ids, of one request's log."""
    passes: list[dict] = []
    pos = 0
    while (m := _TENSOR_MARK.search(text, pos)):
        line = text.count("\n", 0, m.start()) + 1
        arr, pos = _parse_tensor_text(text, m.end(), f"{where}:{line}")
        if m.group(1) == "input_ids":
            passes.append({"ids": arr.ravel(), "layers": {}, "line": line})
        else:
            if not passes:
                raise TraceError(f"{where}:{line}: a 'Layer ... topk_ids' before any 'input_ids' line")
            layer = int(m.group(2))
            if layer in passes[-1]["layers"]:
                raise TraceError(f"{where}:{line}: layer {layer} appears twice in the pass of line {passes[-1]['line']}")
            passes[-1]["layers"][layer] = arr
    if not passes:
        raise TraceError(f"{where}: no 'input_ids: tensor(...)' line; is this a MoE-Lightning routing log?")
    num_layers = max(max(p["layers"], default=-1) for p in passes) + 1
    out, tokens = [], []
    for i, p in enumerate(passes):
        n = len(p["ids"])
        missing = [l for l in range(num_layers) if l not in p["layers"]]
        if missing:
            last = i == len(passes) - 1
            if truncate_ragged and last:
                break  # the log stops mid-pass: drop that pass
            raise TraceError(
                f"{where}:{p['line']}: the pass has no topk_ids for layers {missing[:8]} "
                f"(ragged: other passes have {num_layers} layers)"
                + ("; pass --truncate-ragged to drop the unfinished last pass" if last else "")
            )
        per_layer = [p["layers"][l] for l in range(num_layers)]
        bad = [l for l, a in enumerate(per_layer) if len(a) != n]
        if bad:
            if not truncate_ragged:
                raise TraceError(
                    f"{where}:{p['line']}: ragged pass: {n} input ids but layer {bad[0]} has "
                    f"{len(per_layer[bad[0]])} topk rows; pass --truncate-ragged to cut the pass to "
                    f"its shortest layer"
                )
            n = min(n, *(len(a) for a in per_layer))
        out.append(np.stack([a[:n] for a in per_layer], axis=1))
        tokens.append(p["ids"][:n])
    return out, tokens


def import_moe_lightning(paths, *, num_experts: int | None = None, truncate_ragged: bool = False) -> RoutingTrace:
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    experts, request, step, position, phase, tids = [], [], [], [], [], []
    for r, path in enumerate(paths):
        if not path.is_file():
            raise TraceError(f"log file {str(path)!r} does not exist")
        passes, tokens = parse_moe_lightning(path.read_text(errors="replace"), str(path),
                                             truncate_ragged=truncate_ragged)
        pos = 0
        for s, (arr, tok) in enumerate(zip(passes, tokens)):
            n = len(arr)
            experts.append(arr)
            request.append(np.full(n, r))
            step.append(np.full(n, s))
            position.append(np.arange(pos, pos + n))
            phase.append(np.full(n, PREFILL if n > 1 or s == 0 else DECODE))
            tids.append(tok)
            pos += n
    shapes = {a.shape[1:] for a in experts}
    if len(shapes) > 1:
        raise TraceError(f"logs disagree on (layers, k): {sorted(shapes)}; import them separately")
    ex = np.concatenate(experts)
    if ex.size == 0:
        raise TraceError(f"{paths[0]}: the log has no routed tokens; nothing to import")
    _check_ids(ex, "moe-lightning log", num_experts)
    ne = num_experts or int(ex.max()) + 1
    trace = RoutingTrace(experts=ex, request=np.concatenate(request), step=np.concatenate(step),
                         position=np.concatenate(position), phase=np.concatenate(phase), num_experts=ne,
                         token_id=np.concatenate(tids),
                         metadata={"source": "moe-lightning log: " + ", ".join(p.name for p in paths),
                                   "num_experts": str(ne)})
    trace.validate()
    return trace


def import_numpy(path: str | Path, *, num_experts: int | None = None, phase: str = "decode") -> RoutingTrace:
    path = Path(path)
    if phase not in ("prefill", "decode"):
        raise TraceError(f"--phase must be prefill or decode for a plain array, got {phase!r}")
    arr = _as_3d(_load_numpy(path), str(path))
    trace = _trace_from_requests([arr], [len(arr)] if phase == "prefill" else None, num_experts,
                                 f"numpy array: {path.name}")
    return trace


def import_table(path: str | Path, *, num_experts: int | None = None) -> RoutingTrace:
    from expertsim.traces.io import frame_to_trace, read_trace

    path = Path(path)
    if path.suffix == ".parquet":
        return read_trace(path, num_experts=num_experts)
    import polars as pl

    with foreign_errors(TraceError, f"cannot read {str(path)!r} as CSV",
                        "give a CSV with a header row of the long trace format"):
        df = pl.read_csv(path)
    return frame_to_trace(df, num_experts=num_experts, metadata={"source": path.name}, source=str(path))


def import_trace(fmt: str, paths, *, model=None, num_experts: int | None = None,
                 truncate_ragged: bool = False, phase: str = "decode") -> RoutingTrace:
    """Import ``paths`` in format ``fmt``; with ``model`` (a ModelSpec or preset name) check the
    shape and keep only its MoE layers when the file lists every model layer."""
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    for p in paths:
        if not p.is_file():
            raise TraceError(f"input file {str(p)!r} does not exist")
    spec = None
    if model is not None:
        from expertsim.specs import load_model

        spec = load_model(model)
        num_experts = num_experts or spec.num_experts
    if fmt == "moe-lightning":
        trace = import_moe_lightning(paths, num_experts=num_experts, truncate_ragged=truncate_ragged)
    else:
        if len(paths) != 1:
            raise TraceError(f"format {fmt!r} reads one file, got {len(paths)}")
        if fmt == "vllm":
            trace = import_vllm(paths[0], num_experts=num_experts, truncate_ragged=truncate_ragged)
        elif fmt in ("parquet", "csv"):
            trace = import_table(paths[0], num_experts=num_experts)
        elif fmt == "numpy":
            trace = import_numpy(paths[0], num_experts=num_experts, phase=phase)
        else:
            raise TraceError(f"unknown import format {fmt!r}; use one of {', '.join(FORMATS)}")
    if spec is not None:
        if trace.num_layers == spec.num_layers != spec.num_moe_layers:
            keep = np.asarray(spec.moe_layers)
            trace = RoutingTrace(
                experts=trace.experts[:, keep], request=trace.request, step=trace.step,
                position=trace.position, phase=trace.phase, num_experts=trace.num_experts,
                token_id=trace.token_id, weights=None if trace.weights is None else trace.weights[:, keep],
                metadata=trace.metadata)
        trace.check_model(spec)
        trace.metadata["model"] = spec.name
    return trace
