"""`expertsim trace ...`: inspect, convert, split and synthesise routing traces."""
from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

trace_app = typer.Typer(help="Routing traces: info, import, capture, statistics, synthetic traces.",
                        no_args_is_help=True)


def _out(path: str | None, option: str = "--out") -> str | None:
    """Check an output path before any work (a parent that is a file, a read-only folder)."""
    from expertsim.errors import check_output_path

    if path is not None:
        check_output_path(path, option)
    return path


def _write(trace, out: str, option: str = "--out") -> None:
    from expertsim.errors import ConfigError, foreign_errors
    from expertsim.traces import write_trace

    _out(out, option)
    with foreign_errors(ConfigError, f"cannot write {option} {out!r}", "choose another path"):
        path = write_trace(trace, out)
    typer.echo(f"wrote {path}: {trace!r}")


@trace_app.command("info")
def trace_info(path: str = typer.Argument(..., help="A routing trace (.parquet).")) -> None:
    """Shape, phases, requests and metadata of a trace (a streaming scan: large files are not loaded)."""
    from expertsim.traces.ops import lazy_info

    info = lazy_info(path)
    typer.echo(
        f"{info['path']}: tokens={info['tokens']} (decode {info['decode_tokens']}), layers={info['layers']}, "
        f"k={info['top_k']}, experts={info['num_experts']}, requests={info['requests']}, weights={info['weights']}"
    )
    for key, value in sorted(info["metadata"].items()):
        typer.echo(f"  {key}: {value}")


@trace_app.command("capture")
def trace_capture(
    prompts: str = typer.Option(..., "--prompts", help="Prompts: a text file (one per line) or JSONL ('prompt' or 'text')."),
    out: str = typer.Option(..., "--out", help="Output trace (.parquet)."),
    model_path: Optional[str] = typer.Option(None, "--model-path", help="A local Hugging Face checkpoint directory (read offline)."),
    tiny: Optional[str] = typer.Option(None, "--tiny", help="A model preset: capture a tiny random model of its family (untrained; tests and demos)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=0, help="Greedy decode tokens per prompt (0: prefill only)."),
    max_prompt_tokens: int = typer.Option(256, "--max-prompt-tokens", min=1),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    spec_depth: int = typer.Option(0, "--spec-depth", min=0, help="Record speculative routing for d = 1..D layers ahead."),
    router_probs: bool = typer.Option(False, "--router-probs", help="Record the full router scores (float16)."),
    seed: int = typer.Option(0, "--seed", min=0),
) -> None:
    """Record routing from a transformers MoE model (needs the torch extra)."""
    from expertsim.traces.capture import capture_from_files

    _out(out)
    trace = capture_from_files(prompts_path=prompts, model_path=model_path, tiny=tiny,
                               max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                               batch_size=batch_size, spec_depth=spec_depth, router_probs=router_probs,
                               seed=seed)
    _write(trace, out)


@trace_app.command("import")
def trace_import(
    files: List[str] = typer.Argument(..., help="Input file(s); several only for moe-lightning logs."),
    fmt: Literal["vllm", "moe-lightning", "parquet", "csv", "numpy"] = typer.Option(..., "--format", help="vllm, moe-lightning, parquet, csv or numpy."),
    out: str = typer.Option(..., "--out", help="Output trace (.parquet)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model preset to check the shape against."),
    num_experts: Optional[int] = typer.Option(None, "--num-experts", min=1, max=65536, help="Routed experts per layer (1..65536)."),
    truncate_ragged: bool = typer.Option(False, "--truncate-ragged", help="Cut layers of unequal length to the shortest."),
    phase: str = typer.Option("decode", "--phase", help="Phase of a plain numpy array's tokens."),
) -> None:
    """Convert a public routing format to an expertsim trace."""
    from expertsim.traces.importers import import_trace

    _out(out)
    trace = import_trace(fmt, files, model=model, num_experts=num_experts,
                         truncate_ragged=truncate_ragged, phase=phase)
    _write(trace, out)


@trace_app.command("fit")
def trace_fit(
    path: str = typer.Argument(..., help="A routing trace (.parquet)."),
    out: str = typer.Option(..., "--out", help="Output fit (.json)."),
    phase: Optional[str] = typer.Option(None, "--phase", help="Tokens to fit (default: decode, prefill if none)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name to record in the fit."),
) -> None:
    """Fit the synthetic generator to a trace (popularity, reuse, cross-layer, lengths)."""
    from expertsim.traces import read_trace
    from expertsim.traces.synth import fit_trace, save_fit

    _out(out)
    fit = fit_trace(read_trace(path), phase=phase, model=model)
    save_fit(fit, out)
    t = fit["targets"]
    typer.echo(f"wrote {out}: {fit['model']} ({t['phase']}), LRU hit rates "
               + ", ".join(f"K={k}: {h:.4f}" for k, h in zip(t['lru_hit_curve']['cache_sizes'], t['lru_hit_curve']['hit_rate'])))


@trace_app.command("synth")
def trace_synth(
    out: str = typer.Option(..., "--out", help="Output trace (.parquet)."),
    fit: Optional[str] = typer.Option(None, "--fit", help="A fit JSON, or a shipped fit: mixtral-8x7b, llama4-maverick."),
    requests: int = typer.Option(8, "--requests", min=1),
    seed: int = typer.Option(0, "--seed", min=0),
    uniform: bool = typer.Option(False, "--uniform", help="Uniform independent routing (no fit)."),
    zipf: Optional[float] = typer.Option(None, "--zipf", help="Zipf(A) popularity per layer (no fit)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model preset for --uniform/--zipf shapes."),
    prefill_tokens: int = typer.Option(16, "--prefill-tokens", min=0, help="For --uniform/--zipf."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", min=1, help="For --uniform/--zipf."),
    compare: bool = typer.Option(False, "--compare", help="Print the sample's LRU curve next to the fit's real one."),
) -> None:
    """Sample a synthetic trace from a fit, or a uniform / Zipf baseline."""
    from expertsim.errors import TraceError
    from expertsim.traces import synth

    _out(out)
    if zipf is not None and not (zipf > 0 and zipf < float("inf")):
        raise TraceError(f"--zipf {zipf!r}: give a finite exponent > 0, e.g. --zipf 1.2")
    chosen = [x for x in (fit is not None, uniform, zipf is not None) if x]
    if len(chosen) != 1:
        raise TraceError("give exactly one of --fit FIT.json, --uniform or --zipf A")
    if fit is not None:
        f = synth.load_fit(fit)
        trace = synth.synth_from_fit(f, requests, seed=seed)
        _write(trace, out)
        if compare:
            cmp = synth.compare_to_fit(f, trace)
            for k, r, s in zip(cmp["cache_sizes"], cmp["real"], cmp["synthetic"]):
                typer.echo(f"  K={k}: real {r:.4f}  synthetic {s:.4f}")
        return
    if model is None:
        raise TraceError("--uniform and --zipf need --model PRESET for the number of layers, experts and k")
    from expertsim.specs import load_model

    spec = load_model(model)
    trace = synth.synth_baseline(spec.num_moe_layers, spec.num_experts, spec.top_k, requests,
                                 prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                                 zipf=zipf, seed=seed, model=spec.name)
    _write(trace, out)


@trace_app.command("stats")
def trace_stats_cmd(
    path: str = typer.Argument(..., help="A routing trace (.parquet)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    html: Optional[str] = typer.Option(None, "--html", help="Write plotly figures to this HTML file."),
    phase: Literal["decode", "prefill", "all"] = typer.Option("decode", "--phase", help="decode, prefill or all."),
) -> None:
    """Locality statistics: popularity, reuse, LRU hit-rate curve, cross-layer predictability."""
    from expertsim.console import echo_json, print_table
    from expertsim.traces import read_trace
    from expertsim.traces.stats import trace_stats

    _out(html, "--html")
    trace = read_trace(path)
    st = trace_stats(trace, phase=phase)
    if html:
        write_stats_html(st, html)
    if as_json:
        echo_json(st)
        return
    typer.echo(f"{path}: {st['tokens']} {phase} tokens, {st['requests']} requests, {st['layers']} layers, "
               f"{st['experts']} experts, top-{st['top_k']}")
    typer.echo(f"reuse_next_token {st['reuse_next_token']:.4f}; cold lookups {st['reuse_distance']['cold']:.4f}; "
               f"working set per request {st['working_set_mean']:.2f} experts per layer")
    typer.echo("\nLRU hit rate (per-layer cache of K slots, cold at each request):")
    print_table([{"K": k, "hit_rate": h} for k, h in zip(st["lru_hit_curve"]["cache_sizes"], st["lru_hit_curve"]["hit_rate"])])
    pl_ = st["per_layer"]
    typer.echo("\nPer layer:")
    print_table([{"layer": l, "max_share": pl_["max_share"][l], "entropy_bits": pl_["entropy_bits"][l],
                  "reuse_next": pl_["reuse_next_token"][l], "top1_repeat": pl_["top1_repeat"][l],
                  "H(next|this)_bits": pl_["cond_entropy_next_layer_bits"][l],
                  "working_set": pl_["working_set_mean"][l]} for l in range(st["layers"])])
    if html:
        typer.echo(f"\nwrote {html}")


def write_stats_html(st: dict, path: str) -> Path:
    """A self-contained HTML page of the statistics' figures (plotly)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = list(range(st["layers"]))
    pl_ = st["per_layer"]
    fig = make_subplots(rows=2, cols=2, subplot_titles=(
        "LRU hit rate vs cache slots per layer", "Reuse distance (share of lookups)",
        "Per-layer popularity and reuse", "Cross-layer conditional entropy (bits)"))
    c = st["lru_hit_curve"]
    fig.add_trace(go.Scatter(x=c["cache_sizes"], y=c["hit_rate"], mode="lines+markers", name="LRU hit rate"), 1, 1)
    rd = st["reuse_distance"]
    fig.add_trace(go.Bar(x=list(range(len(rd["share"]))) + ["cold"], y=rd["share"] + [rd["cold"]], name="reuse distance"), 1, 2)
    for key in ("max_share", "reuse_next_token", "top1_repeat"):
        fig.add_trace(go.Scatter(x=layers, y=pl_[key], mode="lines+markers", name=key), 2, 1)
    fig.add_trace(go.Scatter(x=layers, y=pl_["entropy_bits"], mode="lines", name="H(layer) bits"), 2, 2)
    fig.add_trace(go.Scatter(x=layers, y=pl_["cond_entropy_next_layer_bits"], mode="lines+markers",
                             name="H(l+1 | l) bits"), 2, 2)
    fig.update_layout(title=f"Routing statistics: {st['source']} ({st['phase']})", height=800)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(out, include_plotlyjs=True, full_html=True)
    return out


@trace_app.command("split")
def trace_split(
    path: str = typer.Argument(..., help="A routing trace (.parquet)."),
    train: str = typer.Option(..., "--train", help="Output of the training requests."),
    held_out: str = typer.Option(..., "--held-out", help="Output of the held-out requests."),
    fraction: float = typer.Option(0.8, "--fraction", help="Share of requests in the training set."),
    seed: int = typer.Option(0, "--seed", min=0),
) -> None:
    """Split by request into training and held-out traces."""
    from expertsim.traces import read_trace
    from expertsim.traces.ops import split_requests

    _out(train, "--train")
    _out(held_out, "--held-out")
    a, b = split_requests(read_trace(path), fraction, seed=seed)
    _write(a, train, "--train")
    _write(b, held_out, "--held-out")


@trace_app.command("slice")
def trace_slice(
    path: str = typer.Argument(..., help="A routing trace (.parquet)."),
    out: str = typer.Option(..., "--out"),
    requests: Optional[str] = typer.Option(None, "--requests", help="START:END over the trace's requests."),
    layers: Optional[str] = typer.Option(None, "--layers", help="START:END over MoE layers."),
    phase: str = typer.Option("all", "--phase"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1),
) -> None:
    """A part of a trace: some requests, layers, one phase, or the first tokens."""
    from expertsim.traces import read_trace
    from expertsim.traces.ops import slice_trace

    _out(out)
    _write(slice_trace(read_trace(path), requests=requests, layers=layers, phase=phase,
                       max_tokens=max_tokens), out)


@trace_app.command("concat")
def trace_concat(
    paths: List[str] = typer.Argument(..., help="Traces to join, in order."),
    out: str = typer.Option(..., "--out"),
    renumber: bool = typer.Option(False, "--renumber", help="Shift request ids so they do not collide."),
) -> None:
    """Join traces of one model."""
    from expertsim.traces import read_trace
    from expertsim.traces.ops import concat

    _out(out)
    _write(concat([read_trace(p) for p in paths], renumber=renumber), out)


@trace_app.command("fit-report")
def trace_fit_report(
    fit: List[str] = typer.Option(..., "--fit", help="A fit JSON or shipped fit name (repeat, paired with --trace)."),
    trace: List[str] = typer.Option(..., "--trace", help="The real trace the fit was made from (repeat)."),
    out: str = typer.Option(..., "--out", help="Markdown output."),
    html: Optional[str] = typer.Option(None, "--html", help="Also write the curves as a plotly HTML figure."),
    seed: int = typer.Option(0, "--seed", min=0),
) -> None:
    """Real vs synthetic LRU hit rates at every cache size (markdown table, optional figure)."""
    from expertsim.errors import TraceError
    from expertsim.traces.synth import fit_report, fit_report_figure

    if len(fit) != len(trace):
        raise TraceError(f"give one --trace per --fit (got {len(fit)} fits, {len(trace)} traces)")
    _out(out)
    _out(html, "--html")
    md, curves = fit_report(list(zip(fit, trace)), seed=seed)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = path.read_text().split("<!-- generated -->")[0] if path.is_file() else ""
    path.write_text((header + "<!-- generated -->\n\n" if header else "") + md)
    typer.echo(f"wrote {out}")
    if html:
        typer.echo(f"wrote {fit_report_figure(curves, html)}")
