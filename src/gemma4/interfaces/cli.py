"""The `gemma4` command line: a thin adapter over the library."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from pathlib import Path

from ..config import ModelConfig
from ..errors import Gemma4Error
from ..quant.packed import KINDS
from ..weights.gguf_file import GGUFCheckpoint, gguf_loaded_bytes, open_gguf
from ..weights.gguf_synth import GGUF_KINDS
from ..weights.presets import PRESETS, preset_config

KV_DTYPES = ["bf16", "fp16", "fp32", "int8"]


def _model_config(model: str) -> ModelConfig:
    """A preset name, a .gguf file or a checkpoint folder (validated) -> its config."""
    if model in PRESETS and not Path(model).exists():
        return ModelConfig.from_dict(preset_config(model))
    if Path(model).suffix == ".gguf":
        return open_gguf(model).config
    from ..weights import open_checkpoint, validate

    checkpoint = open_checkpoint(model)
    validate(checkpoint)
    return checkpoint.config


def _info(args: argparse.Namespace) -> None:
    from ..summary import format_summary, summarize

    if Path(args.model).is_dir():  # a folder: also report the bytes its files hold, by dtype
        from ..weights import open_checkpoint, validate

        checkpoint = open_checkpoint(args.model)
        validate(checkpoint)
        on_disk: dict[str, int] = {}
        for t in checkpoint.tensors.values():
            on_disk[t.dtype] = on_disk.get(t.dtype, 0) + t.end - t.start
        summary = summarize(checkpoint.config, on_disk)
    else:
        summary = summarize(_model_config(args.model))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


def _tokenizer_bytes(model: str, gguf: GGUFCheckpoint | None) -> int | None:
    """What the checkpoint's own tokenizer will hold once loaded (`gguf`: the file `model` names, opened);
    None where it is not known (a preset, a GGUF vocabulary whose merges are derived at load): the planner
    counts the release tokenizer's then."""
    from ..planner import tokenizer_bytes
    from ..runtime.tokenizer import tokenizer_counts

    if gguf is not None:
        tokens, merges = gguf.field("tokenizer.ggml.tokens"), gguf.field("tokenizer.ggml.merges")
        return tokenizer_bytes(len(tokens), len(merges)) if tokens and merges else None
    counts = tokenizer_counts(Path(model)) if Path(model).is_dir() else None
    return tokenizer_bytes(*counts) if counts else None


def _plan(args: argparse.Namespace) -> None:
    from ..parallel.sharding import Shard
    from ..planner import savings_table, sweep
    from ..runtime.generate import MAX_MARKS

    gguf = open_gguf(args.model) if Path(args.model).suffix == ".gguf" else None  # opened once: config, stored bytes and vocabulary
    config = gguf.config if gguf else _model_config(args.model)
    saved = config.raw.get("quantization_config") or {}  # a checkpoint `gemma4 quantize` wrote: planned as saved
    quant, group = saved.get("kind", args.quant), saved.get("group_size", args.group)
    stored = None
    if gguf and quant is None and args.dtype is None:  # loaded in the file's own types
        from ..benchmark.driver import FILE_TYPES

        quant, stored = FILE_TYPES, gguf_loaded_bytes(gguf)
    options = dict(dtype=args.dtype or "bf16", kv_dtype=args.kv_dtype, batch=args.parallel or args.batch, prefill_chunk=args.prefill_chunk,
                   quant=quant, group=group, pack_tables=bool(saved), snapshots=MAX_MARKS if args.parallel else 0, media=args.media,
                   shard=Shard(0, args.tp), stored=stored, tokenizer=_tokenizer_bytes(args.model, gguf))
    contexts = [2048, 8192, 32768, 131072, 262144] if args.sweep else [args.context]
    plans = sweep(config, contexts, **options)
    if not plans:
        raise Gemma4Error(f"--context {args.context} exceeds the model's {config.text.max_position_embeddings} tokens")
    savings = savings_table(config, plans[-1]["context"], **options)
    if args.json:
        print(json.dumps({"plans": plans, "savings_at_context": plans[-1]["context"], "savings": savings}, indent=2))
        return
    gb = lambda n: f"{n / 1e9:8.3f} GB"  # noqa: E731
    for p in plans:
        ranks = f", per rank of {args.tp}" if args.tp > 1 else ""
        print(f"context {p['context']:>7} x batch {p['batch']}, weights {p['quant'] or p['dtype']}, KV {p['kv_dtype']}{ranks}")
        for component, n in p["weights"].items():
            if n:
                print(f"  weights  {component:<26}{gb(n)}")
        ple = p["ple_table"]
        if ple["bytes"]:
            where = "rows read as needed, resident" if ple["on_disk"] else "in RAM"
            print(f"  PLE table {ple['bytes'] / 1e9:.2f} GB on disk, {where:<15}{gb(ple['resident'])}")
        for kind, n in p["kv_cache"].items():
            print(f"  KV cache {kind:<26}{gb(n)}")
        if p["key_rotations"]:
            print(f"  K=V keys' rotation tables         {gb(p['key_rotations'])}")
        print(f"  prefill activation peak           {gb(p['activation_peak'])}")
        print(f"  runtime (Python, PyTorch)         {gb(p['runtime'])}")
        print(f"  tokenizer                         {gb(p['tokenizer'])}")
        print(f"  total resident                    {gb(p['total_resident'])}  (encoders stay on disk: {p['encoders_on_disk'] / 1e9:.2f} GB)")
    print(f"what each saving buys at context {plans[-1]['context']}:")
    for name, n in savings.items():
        print(f"  {name:<20}{gb(n)}")


def _synth(args: argparse.Namespace) -> None:
    from ..weights import synthesize
    from ..weights.checkpoint import resolve_dtype
    from ..weights.gguf_synth import synthesize_gguf

    if args.out.endswith(".gguf"):  # one file in llama.cpp's layout, as its converter + quantizer write it
        out = synthesize_gguf(args.preset, args.out, args.quant or "q4_0", seed=args.seed)
    elif args.quant:
        raise Gemma4Error(f"--quant is for a GGUF file (OUT ending in .gguf); {args.out} is a checkpoint folder (use --dtype)")
    else:
        out = synthesize(args.preset, args.out, dtype=resolve_dtype(args.dtype), seed=args.seed)
    print(f"wrote {args.preset} to {out}")


def _bench(args: argparse.Namespace) -> None:
    from ..benchmark.driver import ENGINES, FILE_TYPES, BenchOptions, benchmark, markdown

    engines = tuple(e.strip() for e in args.engines.split(","))
    if unknown := [e for e in engines if e not in ENGINES]:
        raise Gemma4Error(f"unknown engine {unknown[0]!r}: choose from {', '.join(ENGINES)}")
    checkpoint = _benchmark_checkpoint(args.model)
    options = BenchOptions(args.quant or (FILE_TYPES if checkpoint.suffix == ".gguf" else "bf16"), args.threads, args.context, args.prompt_tokens, args.new_tokens, engines, args.fast_math,
                           tp=args.tp)
    report = benchmark(checkpoint, options)
    table = markdown(report)
    print(json.dumps(report, indent=2) if args.json else table)
    if args.results:
        with open(args.results, "a") as f:
            f.write(table + "\n")


def _benchmark_checkpoint(model: str) -> Path:
    """A checkpoint folder, a GGUF file, or a preset synthesized (once) into the cache."""
    if Path(model).is_dir() or (model.endswith(".gguf") and Path(model).is_file()):
        return Path(model)
    if model not in PRESETS:
        raise Gemma4Error(f"{model}: not a checkpoint folder nor a preset ({', '.join(PRESETS)})")
    from ..weights import synthesize
    from ..weights.default_model import cache_dir

    target = cache_dir() / "synthetic" / model
    if not (target / "config.json").is_file():
        print(f"gemma4 bench: writing a synthetic {model} checkpoint to {target} (first use only)...", file=sys.stderr)
        synthesize(model, target)
    return target


def _quantize(args: argparse.Namespace) -> None:
    from ..weights.quantized import save_quantized

    if args.quant is None:
        raise Gemma4Error("--quant is required: bf16, int8 or int4")
    out = save_quantized(args.model, args.out_dir, args.quant, args.group)
    print(f"wrote {args.quant} checkpoint to {out}")


def _add_weight_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="a plain model in this dtype (default: bf16; GGUF: the file's types)")
    parser.add_argument("--mmproj", metavar="FILE", help="llama.cpp's encoder GGUF beside a .gguf model (not supported yet)")
    _add_quant_options(parser, "pack the weights (bf16, int8, int4) and compute on the packed kernels")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, help="the K/V cache's dtype (default: fp16 with packed weights, else --dtype)")
    parser.add_argument("--fast-math", action="store_true",
                        help="packed matmuls round activations to 8 bits, as llama.cpp does: faster, but not the model's own answers")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="split the model over N ranks (tensor parallelism), under `torchrun --nproc-per-node N -m gemma4`")


def _add_quant_options(parser: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    parser.add_argument("--quant", choices=list(KINDS), default=default, help=help)
    parser.add_argument("--group", type=int, default=0, help="columns per int8/int4 scale (default: int8 per channel, int4 64)")


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    _add_weight_options(parser)
    parser.add_argument("--context", type=int, help="longest conversation to serve, in tokens (default: the model's)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step (default 512)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, help="0 for greedy (default: the checkpoint's generation_config)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--thinking", action="store_true", help="let the model think before answering (shown dimmed)")
    parser.add_argument("--verbose", action="store_true", help="log KV bytes, PLE placement, context and attention paths")
    parser.add_argument("--image-tokens", type=int, default=280, choices=[70, 140, 280, 560, 1120], help="soft tokens an image may cost (default 280)")


def _sampling(args: argparse.Namespace) -> dict:
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    return {n: getattr(args, n) for n in names}


def _load(args: argparse.Namespace):  # noqa: ANN202 - a gemma4.Model
    import gemma4

    if args.mmproj:
        raise Gemma4Error(f"--mmproj {args.mmproj}: llama.cpp's mmproj encoders cannot be loaded yet; for images and audio use the "
                          "model's Hugging Face checkpoint folder, which holds the encoders")

    from ..weights.default_model import default_model_path

    if args.model is None:
        args.model = default_model_path()
    model = gemma4.load(
        args.model, dtype=args.dtype, context=args.context, prefill_chunk=args.prefill_chunk, quant=args.quant, group=args.group,
        kv_dtype=args.kv_dtype, fast_math=args.fast_math, tp=args.tp, progress=_talks_to_user(args),
    )
    if model.ranks.size > 1 and model.ranks.rank == 0:  # the other ranks repeat its calls to the model until it exits
        from ..parallel.follow import Leader
        from ..parallel.ranks import leave

        atexit.register(leave)
        atexit.register(Leader(model.lm, model.ranks).close)  # first: atexit runs last in, first out
    return model


def _talks_to_user(args: argparse.Namespace) -> bool:
    """Whether this process talks to the user: every process but the ranks that follow rank 0."""
    return args.tp == 1 or int(os.environ.get("RANK", "0")) == 0


def _follows(args: argparse.Namespace) -> bool:
    """With --tp N (under torchrun), ranks other than 0 load their part of the model and repeat rank
    0's calls to it until rank 0 exits; True there, once it has."""
    if args.tp == 1:
        return False
    from ..parallel.follow import follow
    from ..parallel.ranks import Ranks, leave

    if Ranks.start(args.tp).rank == 0:
        return False
    model = _load(args)
    follow(model.lm, model.ranks)
    leave()
    return True


def _print_answer(model, events) -> None:  # noqa: ANN001
    """Stream chat events: reasoning dimmed, content plain, tool calls as JSON lines."""
    dim, plain = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for event in events:
        if event.kind == "reasoning":
            print(f"{dim}{event.text}{plain}", end="", flush=True)
        elif event.kind == "content":
            print(event.text, end="", flush=True)
        else:
            print(f"\n[tool call] {json.dumps({'name': event.call.name, 'arguments': event.call.arguments})}", flush=True)
    print()


def _print_stats(model, verbose: bool) -> None:  # noqa: ANN001
    if verbose:
        for line in model.describe():
            print(f"[gemma4] {line}", file=sys.stderr)
    s = model.stats
    print(
        f"[{s.generated_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s; prompt {s.prompt_tokens} tokens"
        f" ({s.reused_tokens} cached) in {s.prefill_seconds:.2f} s]",
        file=sys.stderr,
    )


def _run(args: argparse.Namespace) -> None:
    if args.prompt is None:  # `gemma4 run "prompt"`: the default model
        args.model, args.prompt = None, args.model
    if _follows(args):
        return
    model = _load(args)
    if args.raw or model.chat_format is None and model.chat_template is None:  # a base model continues text
        deltas = model.generate(args.prompt, args.max_new_tokens, stream=True, stop=args.stop or (), **_sampling(args))
        for delta in deltas:
            print(delta, end="", flush=True)
        print()
    else:
        media = [{"type": kind, kind: path} for kind in ("image", "video", "audio") for path in getattr(args, kind) or []]
        messages = [{"role": "user", "content": [*media, {"type": "text", "text": args.prompt}] if media else args.prompt}]
        events = model.chat(messages, args.max_new_tokens, thinking=args.thinking, stream=True, image_tokens=args.image_tokens, **_sampling(args))
        _print_costs(model)
        _print_answer(model, events)
    if args.verbose:
        _print_stats(model, verbose=True)


def _print_costs(model) -> None:  # noqa: ANN001
    for cost in model.media_costs:
        print(f"[{cost}]", file=sys.stderr)


CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT, /think (toggle thinking), /image PATH, /audio PATH, /video PATH (attach to the next message), /exit"


def _chat(args: argparse.Namespace) -> None:
    if _follows(args):
        return
    model = _load(args)
    system, thinking, messages, attached = None, args.thinking, [], []
    print(f"gemma4 chat - {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        command, _, rest = line.strip().partition(" ")
        if command in ("/exit", "/quit", "/bye"):
            return
        if command == "/reset":
            messages = []
            model.reset_chat()
            print("[conversation cleared]", file=sys.stderr)
        elif command == "/system":
            system = rest.strip() or None
            print(f"[system prompt {'set' if system else 'cleared'}]", file=sys.stderr)
        elif command == "/think":
            thinking = not thinking
            print(f"[thinking {'on' if thinking else 'off'}]", file=sys.stderr)
        elif command in ("/image", "/audio", "/video"):
            kind, path = command[1:], Path(rest.strip()).expanduser()
            if kind not in model.encoder_kinds:
                print(f"[this model reads {', '.join(sorted(model.encoder_kinds | {'text'}))}: no {kind}]", file=sys.stderr)
            elif not path.is_file():
                print(f"[{path}: no such file]", file=sys.stderr)
            else:
                attached.append({"type": kind, kind: str(path)})
                print(f"[{kind} {path.name} goes with your next message]", file=sys.stderr)
        elif command.startswith("/"):
            print(f"[unknown command {command}; {CHAT_HELP}]", file=sys.stderr)
        elif line.strip():
            messages.append({"role": "user", "content": [*attached, {"type": "text", "text": line}] if attached else line})
            attached = []
            prompt = ([{"role": "system", "content": system}] if system else []) + messages
            events = model.chat(prompt, args.max_new_tokens, thinking=thinking, stream=True, image_tokens=args.image_tokens, **_sampling(args))
            _print_costs(model)
            answer = _collect(model, events)
            messages.append({"role": "assistant", "content": answer.content, **({"tool_calls": [c.to_openai(i) for i, c in enumerate(answer.tool_calls)]} if answer.tool_calls else {})})
            _print_stats(model, args.verbose)


def _collect(model, events):  # noqa: ANN001, ANN202
    """Print events as they stream and return the whole answer."""
    from ..runtime.chat_parser import ChatResult

    result = ChatResult()

    def tee():  # noqa: ANN202
        for event in events:
            result.add(event)
            yield event

    _print_answer(model, tee())
    return result


def _serve(args: argparse.Namespace) -> None:
    from .server import serve, served_name
    from ..weights.default_model import default_model_path

    api_key = args.api_key
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise Gemma4Error(f"--api-key-file {args.api_key_file}: {e.strerror}") from None
        if not api_key:
            raise Gemma4Error(f"--api-key-file {args.api_key_file} is empty")
    if args.model is None:
        args.model = default_model_path()
    elif not Path(args.model).exists():
        raise Gemma4Error(f"{args.model}: no such checkpoint folder or .gguf file")
    if args.parallel is not None and args.parallel < 1:
        raise Gemma4Error("--parallel must be at least 1")
    if _follows(args):
        return
    serve(lambda: _load(args), served_name(args.model), args.host, args.port, api_key, args.parallel, args.max_queue, args.metrics)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4", description="Run Google's Gemma 4 models locally.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe a checkpoint: variant, layer plan, parameters, bytes")
    info.add_argument("model", metavar="MODEL", help=f"checkpoint folder, .gguf file, or a preset ({', '.join(PRESETS)})")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=_info)

    plan = commands.add_parser("plan", help="the memory a model will need: weights, KV cache, activations")
    plan.add_argument("model", metavar="MODEL", help=f"checkpoint folder, .gguf file, or a preset ({', '.join(PRESETS)})")
    plan.add_argument("--context", type=int, default=8192)
    plan.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 (a .gguf: its own types)")
    plan.add_argument("--kv-dtype", choices=KV_DTYPES, help="default: --dtype (fp16 with --quant)")
    _add_quant_options(plan, "packed weights, as `run --quant` loads them")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--parallel", type=int, help="as `gemma4 serve --parallel N` holds it: N sequences, each with its prefix-cache snapshots")
    plan.add_argument("--media", action="store_true", help="images, video or audio arrive: the encoders resident, one encoded at a time")
    plan.add_argument("--prefill-chunk", type=int, default=512)
    plan.add_argument("--tp", type=int, default=1, metavar="N", help="what each of N ranks holds, the model split over them (serve --tp N)")
    plan.add_argument("--sweep", action="store_true", help="a table over 2K, 8K, 32K, 128K, 256K where the model allows")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(run=_plan)

    synth = commands.add_parser("synth", help="write a synthetic checkpoint with a real model's exact layout")
    synth.add_argument("preset", choices=list(PRESETS), metavar="PRESET", help=", ".join(PRESETS))
    synth.add_argument("out", metavar="OUT_DIR | OUT.gguf", help="a checkpoint folder, or one GGUF file in llama.cpp's layout")
    synth.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    synth.add_argument("--quant", choices=list(GGUF_KINDS), help="the GGUF file's type, as llama-quantize makes it (default q4_0)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth)

    quantize = commands.add_parser("quantize", help="save a checkpoint with packed int8/int4/bf16 weights (reloads as is)")
    quantize.add_argument("model", metavar="MODEL", help="checkpoint folder")
    quantize.add_argument("out_dir", metavar="OUT_DIR")
    _add_quant_options(quantize, "bf16, int8 or int4")
    quantize.set_defaults(run=_quantize)

    bench = commands.add_parser("bench", help="load, prefill and decode speed and memory, beside transformers and llama.cpp")
    bench.add_argument("model", metavar="MODEL", help=f"checkpoint folder, .gguf file (both engines load it), or a preset to synthesize ({', '.join(PRESETS)})")
    bench.add_argument("--quant", choices=list(KINDS), help="our weights (default bf16, llama.cpp gets F16, Q8_0, Q4_0; a .gguf: the file's own types)")
    bench.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    bench.add_argument("--context", type=int, default=4096)
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--engines", default="gemma4,transformers,llama.cpp", help="comma-separated subset")
    bench.add_argument("--fast-math", action="store_true", help="our packed matmuls with 8-bit activations, as llama.cpp's")
    bench.add_argument("--tp", type=int, default=1, metavar="N", help="our engine over N ranks on this machine (torchrun), sharing --threads")
    bench.add_argument("--json", action="store_true", help="print the full report as JSON")
    bench.add_argument("--results", metavar="FILE", help="append the Markdown table to FILE")
    bench.set_defaults(run=_bench)

    run = commands.add_parser("run", help="answer one prompt, streaming (default model: Gemma 3 270M)")
    run.add_argument("model", metavar="[MODEL]", help="checkpoint folder or .gguf file (default: Gemma 3 270M)")
    run.add_argument("prompt", metavar="PROMPT", nargs="?")
    _add_generation_options(run)
    run.add_argument("--raw", action="store_true", help="continue the text as is, without the chat format")
    run.add_argument("--image", action="append", metavar="PATH", help="an image to show the model (repeatable)")
    run.add_argument("--audio", action="append", metavar="PATH", help="audio for the model to hear, WAV/FLAC/OGG/MP3 (repeatable; E2B/E4B)")
    run.add_argument("--video", action="append", metavar="PATH", help="a video, as frames with timestamps (repeatable)")
    run.add_argument("--stop", action="append", metavar="TEXT", help="end the answer at this text (--raw; repeatable)")
    run.set_defaults(run=_run)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (default model: Gemma 3 270M)")
    serve.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint folder or .gguf file (default: Gemma 3 270M)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health")
    keys.add_argument("--api-key-file", metavar="FILE", help="the same, with the key read from FILE (kept out of the process list)")
    serve.add_argument("--parallel", type=int, help="sequences decoded together (default: what fits in memory, at most 4)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before new ones get 503 (default 64)")
    serve.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    _add_weight_options(serve)
    serve.add_argument("--context", type=int, help="longest sequence a slot holds, in tokens (default: the model's)")
    serve.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per step between decode steps (default 256)")
    serve.set_defaults(run=_serve)

    chat = commands.add_parser("chat", help="an interactive chat; " + CHAT_HELP)
    chat.add_argument("model", metavar="MODEL", nargs="?", help="checkpoint folder or .gguf file")
    _add_generation_options(chat)
    chat.set_defaults(run=_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except Gemma4Error as e:
        print(f"gemma4: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad option values (sampling ranges, dtypes)
        print(f"gemma4: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ngemma4: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`gemma4 info X | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
