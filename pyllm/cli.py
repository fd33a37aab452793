"""The ``pyllm`` command line: flags and names follow llama.cpp's tools."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from pyllm.errors import PyllmError

log = logging.getLogger("pyllm")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF model file (env MODEL_PATH; default: the default model)")
    p.add_argument("-c", "--ctx-size", type=int, help="context length in tokens (env MAX_CONTEXT_LENGTH; default 4096)")
    p.add_argument("-b", "--batch-size", type=int, help="logical batch size (env LLAMA_BATCH_SIZE)")
    p.add_argument("-ub", "--ubatch-size", type=int, help="physical batch size (env LLAMA_UBATCH_SIZE)")
    p.add_argument("-t", "--threads", type=int, help="threads (env LLAMA_THREADS; default: available CPUs)")
    p.add_argument("-ngl", "--gpu-layers", "--n-gpu-layers", dest="gpu_layers", type=int,
                   help="layers to offload to the GPU (env GPU_LAYERS; 99 = all)")
    p.add_argument("-fa", "--flash-attn", choices=("on", "off", "auto"), help="flash attention (env FLASH_ATTN; default auto)")
    p.add_argument("-ctk", "--cache-type-k", help="K cache type (env KV_CACHE_TYPE_K / KV_CACHE_TYPE)")
    p.add_argument("-ctv", "--cache-type-v", help="V cache type (env KV_CACHE_TYPE_V / KV_CACHE_TYPE)")
    p.add_argument("--kv-cache-type", help="K and V cache type (env KV_CACHE_TYPE)")


def _config_from_args(args: argparse.Namespace):
    from pyllm.config import EngineConfig

    over = {}
    for attr, field_name in (("model", "model_path"), ("ctx_size", "n_ctx"), ("batch_size", "n_batch"),
                             ("ubatch_size", "n_ubatch"), ("threads", "n_threads"), ("gpu_layers", "n_gpu_layers"),
                             ("flash_attn", "flash_attn"), ("chat_template", "chat_template")):
        value = getattr(args, attr, None)
        if value is not None:
            over[field_name] = value
    if getattr(args, "seed", None) is not None:
        over["seed"] = args.seed
    both = getattr(args, "kv_cache_type", None)
    k = getattr(args, "cache_type_k", None) or both
    v = getattr(args, "cache_type_v", None) or both
    if k is not None:
        over["kv_cache_type_k"] = k
    if v is not None:
        over["kv_cache_type_v"] = v
    if "n_gpu_layers" in over and over["n_gpu_layers"] < -1:
        over["n_gpu_layers"] = -1
    return EngineConfig.from_env(**over)


def cmd_info(args: argparse.Namespace) -> int:
    from pyllm import default_model
    from pyllm.buildinfo import build_info

    if getattr(args, "chat_templates", False):
        return _print_chat_templates(args.json)
    info = build_info()
    info["default_model"] = default_model.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pyllm {info['version']}")
    print(f"llama.cpp commit: {info['llama_cpp_commit']} (version {info['llama_cpp_version']})")
    print(f"backends: {', '.join(info['backends'])}")
    if "CUDA" in info["backends"]:
        print(f"CUDA architectures: {', '.join(info['cuda_architectures'])}")
        print(f"CUDA flash-attention K-V pairs: {', '.join(info['cuda_fa_kernel_pairs'])}")
    print(f"GPU offload: {'yes' if info['supports_gpu_offload'] else 'no'}")
    print(f"KV cache types: {', '.join(info['kv_cache_types'])}")
    dm = info["default_model"]
    where = dm["path"] if dm["installed"] else f"not installed ({dm['package']})"
    print(f"default model: {dm['name']} at {where}")
    print(f"system info: {info['system_info']}")
    return 0


def _print_chat_templates(as_json: bool) -> int:
    from pyllm import chat

    shipped = list(chat.shipped_templates())
    builtin = chat.builtin_templates()
    if as_json:
        print(json.dumps({"glm4": chat.GLM4_FALLBACK, "shipped": shipped, "builtin": builtin,
                          "templates_dir": str(chat.templates_dir() or "")}, indent=2))
        return 0
    print("Chat templates (MODEL_CHAT_TEMPLATE / --chat-template; default: the GGUF's tokenizer.chat_template)")
    print(f"  glm4: the model's own GLM template, else {chat.GLM4_FALLBACK}")
    print(f"shipped Jinja templates ({chat.templates_dir() or 'not installed'}):")
    for name in shipped:
        print(f"  {name}")
    print("llama.cpp built-in formats (its pattern matcher, no Jinja):")
    print("  " + " ".join(builtin))
    print("Also accepted: a path to a .jinja file, or the template text itself.")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pyllm.engine import Engine
    from pyllm.sampling import SamplingParams

    config = _config_from_args(args)
    sampling = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repeat_penalty=args.repeat_penalty,
                              seed=args.seed if args.seed is not None else config.seed)
    max_tokens = None if args.n_predict < 0 else args.n_predict
    with Engine(config) as engine:
        gen = engine.stream(args.prompt, max_tokens=max_tokens, sampling=sampling, stop=args.stop or (), chat=args.chat)
        out = sys.stdout
        while True:
            try:
                piece = next(gen)
            except StopIteration as done:
                result = done.value
                break
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        kv = engine.kv_cache_bytes()
        ctx = engine.context
        print(
            f"KV cache: K {kv.type_k} / V {kv.type_v}, {kv.total_mib:.2f} MiB for n_ctx={ctx.n_ctx} "
            f"(flash attention {'on' if ctx.flash_attn else 'off'}) | prompt: {result.n_prompt} tokens, "
            f"{result.prompt_tps:.1f} t/s | generation: {result.n_generated} tokens, {result.gen_tps:.1f} t/s "
            f"| stop: {result.stop_reason}",
            file=sys.stderr,
        )
    return 0


_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def _chat_turn(engine, history: list, args: argparse.Namespace, sampling, out, styled: bool) -> dict:
    """Stream one reply to ``out``; return it as an assistant message (partial when interrupted)."""
    enable_thinking = False if args.no_think else None
    max_tokens = None if args.n_predict < 0 else args.n_predict
    kind_now = None
    parts = {"reasoning": [], "content": []}
    try:
        for kind, text in engine.stream_chat(history, max_tokens=max_tokens, sampling=sampling,
                                             enable_thinking=enable_thinking):
            parts[kind].append(text)
            if kind == "reasoning" and args.hide_reasoning:
                continue
            if kind != kind_now:
                if kind == "reasoning":
                    out.write(_DIM if styled else "[reasoning] ")
                elif kind_now == "reasoning":
                    out.write(_RESET + "\n" if styled else "\n[answer] ")
                kind_now = kind
            out.write(text)
            out.flush()
    finally:
        if styled and kind_now == "reasoning":
            out.write(_RESET)
        out.write("\n")
        out.flush()
    msg = {"role": "assistant", "content": "".join(parts["content"]).strip()}
    if parts["reasoning"]:
        msg["reasoning_content"] = "".join(parts["reasoning"]).strip()
    return msg


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn chat on a terminal (/reset, /exit; Ctrl-C stops a reply); one turn from piped stdin."""
    from pyllm.engine import Engine
    from pyllm.errors import ConfigError
    from pyllm.sampling import SamplingParams

    config = _config_from_args(args)
    sampling = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repeat_penalty=args.repeat_penalty,
                              seed=args.seed if args.seed is not None else config.seed)
    system = [{"role": "system", "content": args.system}] if args.system else []
    out = sys.stdout
    styled = out.isatty()
    with Engine(config) as engine:
        if not sys.stdin.isatty():
            text = sys.stdin.read().strip()
            if not text:
                raise ConfigError("pyllm chat read no text from stdin; expected the user's message")
            _chat_turn(engine, system + [{"role": "user", "content": text}], args, sampling, out, styled)
            return 0
        history = list(system)
        print("pyllm chat: /reset starts over, /exit quits, Ctrl-C stops a reply", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                history = list(system)
                print("(conversation reset)", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            try:
                history.append(_chat_turn(engine, history, args, sampling, out, styled))
            except KeyboardInterrupt:
                partial = engine.last_result.text if engine.last_result is not None else ""
                history.append({"role": "assistant", "content": partial})
                print("(reply stopped)", file=sys.stderr)
            except PyllmError as exc:
                history.pop()  # the turn the template could not take
                print(f"pyllm: error: {exc}", file=sys.stderr)


def _add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with the model's own chat template (one turn from piped stdin)")
    _add_model_args(p)
    p.add_argument("--chat-template", help="template name, .jinja path or text (env MODEL_CHAT_TEMPLATE; "
                                           "default: the model's own; `pyllm info --chat-templates`)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--no-think", action="store_true", help="turn the model's thinking off (enable_thinking=false)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning block")
    p.add_argument("-n", "--n-predict", type=int, default=1024, help="max tokens per reply (-1 = until end)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy; default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed (env LLAMA_SEED; default random)")
    p.set_defaults(func=cmd_chat)


def _progress_bar(total: int, unit: str, enabled: bool):
    """A tqdm bar on stderr for long runs; None when output is not a terminal (or disabled)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit=unit, leave=False, dynamic_ncols=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from pyllm import bench, default_model

    params = bench.BenchParams(
        model_path=args.model or str(default_model.path()),
        n_prompt=args.n_prompt, n_gen=args.n_gen, n_depth=args.n_depth,
        type_k=args.cache_type_k, type_v=args.cache_type_v, flash_attn=args.flash_attn,
        n_batch=args.batch_size, n_ubatch=args.ubatch_size, n_threads=args.threads,
        n_gpu_layers=args.gpu_layers, repetitions=args.repetitions,
    )
    bar = _progress_bar(len(params.tests()), "test", enabled=args.output != "json" and not args.no_progress)

    def progress(label: str) -> None:
        if bar is not None:
            bar.set_description(label)
            bar.update(1)

    try:
        rows = bench.run_bench(params, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(bench.FORMATS[args.output](rows))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pyllm import default_model, plan

    result = plan.make_plan(
        args.model or str(default_model.path()), type_k=args.cache_type_k, type_v=args.cache_type_v,
        n_ctx=args.ctx_size, memory=args.memory, n_gpu_layers=args.gpu_layers, n_batch=args.batch_size,
        n_ubatch=args.ubatch_size, flash_attn=args.flash_attn, curves=bool(args.plot),
    )
    print(result.to_json() if args.json else plan.format_table(result))
    if args.plot:
        plan.plot(result, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_kv_eval(args: argparse.Namespace) -> int:
    from pyllm import default_model, kveval

    text, source = (kveval.read_text_file(args.file), args.file) if args.file else kveval.default_text()
    type_v = args.cache_type_v or args.cache_type_k
    pairs = [(k, v) for k in args.cache_type_k for v in type_v] if args.cache_type_v else [(k, k) for k in args.cache_type_k]
    print(f"text: {source}", file=sys.stderr)
    bar = _progress_bar(args.chunks, "chunk", enabled=not args.json)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        report = kveval.kv_eval(args.model or str(default_model.path()), pairs, text=text, text_source=source,
                                n_ctx=args.ctx_size, n_chunks=args.chunks, flash_attn=args.flash_attn,
                                n_threads=args.threads, n_gpu_layers=args.gpu_layers, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(kveval.format_json(report) if args.json else kveval.format_table(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from pyllm.server.run import ServeSettings, serve
    except ImportError as exc:
        raise PyllmError(f"pyllm serve needs the server extra ({exc.name} is missing): "
                         "pip install 'pyllm[server]'") from None

    over = {"n_parallel": args.parallel} if args.parallel is not None else {}
    config = _config_from_args(args)
    if args.chat_template is not None:
        over["chat_template"] = args.chat_template
    if over:
        config = config.replace(**over)
    settings = ServeSettings.from_env(host=args.host, port=args.port, api_key=args.api_key,
                                      model_name=args.alias[0] if args.alias else None,
                                      aliases=tuple(args.alias[1:]) if args.alias else None, grace_s=args.grace,
                                      max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
                                      default_max_tokens=args.n_predict,
                                      log_level="debug" if args.verbose >= 2 else "info")
    return serve(config, settings)


def _add_serve_parser(sub) -> None:
    # --env-file comes with the shared argument builder (config work on main); it loads before these are read.
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs pip install 'pyllm[server]')")
    _add_model_args(p)
    p.add_argument("-np", "--parallel", type=int, help="sequences decoded at once (env LLAMA_PARALLEL)")
    p.add_argument("--chat-template", help="chat template name or text (env MODEL_CHAT_TEMPLATE; default: the model's)")
    p.add_argument("--host", help="address to bind (env HOST; default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="TCP port (env PORT; default 8080)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (env PYLLM_API_KEY, preferred: "
                                     "flags are visible to other users in ps)")
    p.add_argument("-a", "--alias", action="append", help="model id to serve as (repeatable; default: the file name)")
    p.add_argument("--grace", type=float, help="seconds running requests may finish after SIGTERM "
                                               "(env PYLLM_SHUTDOWN_GRACE; default 30)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (env PYLLM_MAX_BODY_BYTES; default 8 MiB)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 503 (env PYLLM_MAX_QUEUE; default 64)")
    p.add_argument("-n", "--n-predict", type=int, help="max_tokens of requests that give none "
                                                       "(env PYLLM_DEFAULT_MAX_TOKENS; default n_ctx / n_parallel - prompt)")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    from pyllm.version import VERSION

    parser = argparse.ArgumentParser(prog="pyllm", description="llama.cpp from Python, with KV-cache quantization")
    parser.add_argument("--version", action="version", version=f"pyllm {VERSION}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: pyllm INFO logs, -vv: llama.cpp's too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="build identity: version, llama.cpp pin, backends, KV types")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--chat-templates", action="store_true", help="list the chat template names")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="stream a completion to stdout")
    p.add_argument("prompt", help="the prompt text")
    _add_model_args(p)
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1 = until end or full context)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy; default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed (env LLAMA_SEED; default random)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="format the prompt with the chat template")
    p.add_argument("--chat-template", help="template for --chat: name, .jinja path or text (env MODEL_CHAT_TEMPLATE)")
    p.set_defaults(func=cmd_generate)
    _add_chat_parser(sub)

    p = sub.add_parser("bench", help="llama-bench's tests through pyllm's engine (KV type matrix)")
    p.add_argument("-m", "--model", help="GGUF model file (default: MODEL_PATH, else the default model)")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], help="prompt-processing test sizes (default 512)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], help="generation test sizes (default 128)")
    p.add_argument("-d", "--n-depth", type=_int_list, default=[0], help="KV cache depth before each test (default 0)")
    p.add_argument("-ctk", "--cache-type-k", type=_str_list, default=["f16"], help="K cache types, comma-separated")
    p.add_argument("-ctv", "--cache-type-v", type=_str_list, default=["f16"], help="V cache types, comma-separated")
    p.add_argument("-fa", "--flash-attn", type=_str_list, default=["auto"], help="on, off, auto (comma-separated)")
    p.add_argument("-b", "--batch-size", type=int, default=2048)
    p.add_argument("-ub", "--ubatch-size", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=0, help="threads (default: the CPUs available)")
    p.add_argument("-ngl", "--n-gpu-layers", dest="gpu_layers", type=int, default=99)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("-o", "--output", choices=("md", "json", "csv"), default="md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="how much context fits in a memory budget, per KV type pair (metadata only)")
    p.add_argument("-m", "--model", help="GGUF model file (default: MODEL_PATH, else the default model)")
    p.add_argument("--memory", help="budget, e.g. 96GiB, or 'gpu' for the visible GPU's free memory "
                                    "(default: the GPU's free memory, else system RAM)")
    p.add_argument("-ctk", "--cache-type-k", type=_str_list, default=["f16", "q8_0", "q4_0"])
    p.add_argument("-ctv", "--cache-type-v", type=_str_list, default=None,
                   help="V cache types (default: the same list as -ctk, paired K = V)")
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context to report (default: the training context)")
    p.add_argument("-ngl", "--n-gpu-layers", dest="gpu_layers", type=int, default=0)
    p.add_argument("-b", "--batch-size", type=int, default=2048)
    p.add_argument("-ub", "--ubatch-size", type=int, default=512)
    p.add_argument("-fa", "--flash-attn", choices=("on", "off", "auto"), default="auto")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE.png", help="draw memory against context length (needs matplotlib)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("kv-eval", help="quality of quantized KV caches: perplexity, KL divergence and top-1 vs f16")
    p.add_argument("-m", "--model", help="GGUF model file (default: MODEL_PATH, else the default model)")
    p.add_argument("-f", "--file", help="UTF-8 text to evaluate (default: Python's pydoc topics, shipped with Python)")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk, as llama-perplexity -c (default 512)")
    p.add_argument("--chunks", type=int, default=10, help="chunks to evaluate (default 10)")
    p.add_argument("-ctk", "--cache-type-k", type=_str_list, default=["q8_0", "q4_0"])
    p.add_argument("-ctv", "--cache-type-v", type=_str_list, default=None,
                   help="V types (default: paired with -ctk, K = V); given, every K x V pair is evaluated")
    p.add_argument("-fa", "--flash-attn", choices=("on", "off", "auto"), default="auto")
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("-ngl", "--n-gpu-layers", dest="gpu_layers", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kv_eval)

    _add_serve_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    if args.verbose:
        logging.getLogger("pyllm").setLevel(logging.INFO)
    if args.verbose < 2:
        # Errors reach the user once, in the exception's one-line message, with llama.cpp's reason.
        logging.getLogger("pyllm.native").setLevel(logging.CRITICAL)
    else:
        logging.getLogger("pyllm.native").setLevel(logging.INFO)
    try:
        return args.func(args)
    except PyllmError as exc:
        print(f"pyllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npyllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
