"""The ``pyllm`` command line: flags and names follow llama.cpp's tools."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from pyllm.errors import PyllmError



# Settings every engine-backed subcommand takes (a subset for list commands; see _add_model_args).
ENGINE_FIELDS = ("model_path", "chat_template", "n_ctx", "n_batch", "n_ubatch", "n_gpu_layers", "n_threads",
                 "seed", "use_mlock", "use_mmap", "flash_attn", "kv_cache_type", "kv_cache_type_k", "kv_cache_type_v",
                 "split_mode", "tensor_split", "main_gpu", "rpc_servers", "rpc_timeout", "repack", "backend_sampling")
# Where the model's layers go and how: several GPUs of this box, llama.cpp RPC servers' devices, CPU repacking.
SPLIT_FIELDS = ("split_mode", "tensor_split", "main_gpu", "rpc_servers", "rpc_timeout", "repack")
KV_FIELDS = ("kv_cache_type", "kv_cache_type_k", "kv_cache_type_v")
# Long sessions (llama-server's names): the host-memory prompt cache and the slot save directory. Serve's.
SESSION_FIELDS = ("cache_ram_mib", "slot_save_path")


def _add_env_file_arg(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    # SUPPRESS on subcommands, so `pyllm --env-file F plan` is not reset by the subparser's default.
    p.add_argument("--env-file", metavar="PATH", default=None if top else argparse.SUPPRESS,
                   help="read settings from this .env file (env PYLLM_ENV_FILE); real environment variables win")


def _add_model_args(p: argparse.ArgumentParser, fields: Sequence[str] = ENGINE_FIELDS, *,
                    kv_lists: bool = False, help_defaults: Optional[dict] = None) -> None:
    """The one argument builder: a flag for each setting in ``fields`` (named as llama.cpp names it), whose
    help names the variable behind it; flags left out fall back to the environment, then the defaults.

    ``kv_lists``: -ctk/-ctv/--kv-cache-type take comma-separated lists (bench, plan, kv-eval): without V
    types each K type runs with itself (K = V), with them every K x V pair runs. ``help_defaults``: the
    command's own defaults, for the help text; a command sets the values themselves with
    ``p.set_defaults(_defaults={field: value})``.
    """
    from pyllm.config import SETTINGS

    help_defaults = help_defaults or {}
    for s in SETTINGS:
        if s.field not in fields or not s.flags:
            continue
        text = s.help
        if s.field in help_defaults:
            text = text.split(" (default")[0] + f" (default {help_defaults[s.field]})"
        listed = kv_lists and s.kind == "kv"
        if listed:
            text = text.replace("type", "types, comma-separated", 1)
        if s.off_flags:  # a switch pair, as llama.cpp's --repack / --no-repack
            p.add_argument(*s.flags, dest=s.field, default=None, action="store_const", const="1",
                           help=f"{text} [env {s.env}]")
            p.add_argument(*s.off_flags, dest=s.field, action="store_const", const="0", help=f"see {s.flags[0]}")
            continue
        p.add_argument(*s.flags, dest=s.field, default=None, type=_str_list if listed else str,
                       metavar=_METAVARS[s.kind] + (",..." if listed else ""), help=f"{text} [env {s.env}]")
    _add_env_file_arg(p)
    p.set_defaults(_fields=tuple(fields), _defaults={}, _kv_lists=kv_lists)


_METAVARS = {"int": "N", "kv": "TYPE", "fa": "auto|on|off", "str": "VALUE", "bool": "1|0",
             "split": "none|layer|row", "ts": "N,N,...", "rpc": "HOST:PORT,...", "seconds": "SECONDS",
             "mib": "MiB", "dir": "DIR"}


def _environment(args: argparse.Namespace):
    from pyllm.config import Environment

    return Environment(env_file=getattr(args, "env_file", None))


def _config_from_args(args: argparse.Namespace, env=None, **overrides):
    """The EngineConfig of a subcommand: its flags > the environment (> the .env file) > its defaults."""
    from pyllm.config import SETTINGS_BY_FIELD, EngineConfig, settings_from_env

    env = env if env is not None else _environment(args)
    fields = [f for f in args._fields if not (args._kv_lists and f in KV_FIELDS)]
    kw = dict(args._defaults)
    sources: dict[str, str] = {}
    kw.update(settings_from_env(env, fields, sources=sources))
    for name in fields:
        raw = getattr(args, name, None)
        if raw is not None:
            setting = SETTINGS_BY_FIELD[name]
            kw[name] = setting.parse(raw, setting.flags[0])
            sources[name] = setting.flags[0]
    kw.update(overrides)
    return EngineConfig.build(kw, {k: v for k, v in sources.items() if k not in overrides})


def _engine_config(args: argparse.Namespace, env=None):
    """The EngineConfig of a command that creates one engine (generate, chat, serve): as _config_from_args,
    with KV_CACHE_TYPE / -ctk / -ctv ``auto`` resolved to the pair that fits (pyllm.plan.resolve_kv_auto,
    which logs its choice; ``-v`` shows it)."""
    config = _config_from_args(args, env)
    if not config.kv_auto:
        return config
    from pyllm import plan
    from pyllm.engine import gpu_layers_of, placement_of

    config, choice = plan.resolve_kv_auto(config, model_path=_model_path(config), n_gpu_layers=gpu_layers_of(config),
                                          placement=placement_of(config))
    if not logging.getLogger("pyllm").isEnabledFor(logging.INFO):
        print(f"pyllm: {choice.message()}", file=sys.stderr)
    return config


def _kv_pairs_from_args(args: argparse.Namespace, env, default_k: Sequence[str],
                        flash_attn: str = "auto") -> list[tuple[str, str]]:
    """-ctk > --kv-cache-type > KV_CACHE_TYPE_K > KV_CACHE_TYPE > the command's list; -ctv > KV_CACHE_TYPE_V,
    absent = K = V pairs (see pyllm.config.kv_pairs). ``auto`` alone on a side (a .env written for serve, or
    -ctk auto): the pairs auto chooses among (pyllm.plan.auto_kv_candidates), so plan, bench and kv-eval
    compare exactly those."""
    from pyllm.config import KV_AUTO, kv_pairs, settings_from_env

    from_env = settings_from_env(env, KV_FIELDS)
    env_k = from_env.get("kv_cache_type_k") or from_env.get("kv_cache_type")
    types_k = args.kv_cache_type_k or args.kv_cache_type or ([env_k] if env_k else list(default_k))
    types_v = args.kv_cache_type_v
    if types_v is None and args.kv_cache_type is None and "kv_cache_type_v" in from_env:
        types_v = [from_env["kv_cache_type_v"]]
    low_k = [str(t).strip().lower() for t in types_k]
    low_v = [str(t).strip().lower() for t in types_v] if types_v is not None else None
    if KV_AUTO in low_k + (low_v or []) and len(low_k) == 1 and (low_v is None or len(low_v) == 1):
        from pyllm.config import check_kv_type
        from pyllm.plan import auto_kv_candidates

        k = check_kv_type("-ctk", low_k[0], allow_auto=True)
        v = k if low_v is None else check_kv_type("-ctv", low_v[0], allow_auto=True)
        return auto_kv_candidates(k, v, flash_attn)
    return kv_pairs(types_k, types_v)


def _flash_attn_list(args: argparse.Namespace, env) -> list[str]:
    """bench's -fa list; without it FLASH_ATTN (checked, named in errors), else auto."""
    from pyllm.config import settings_from_env

    return args.flash_attn or [settings_from_env(env, ("flash_attn",)).get("flash_attn", "auto")]


def _model_path(config) -> str:
    from pyllm.engine import model_path_of

    return model_path_of(config)


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
    print("GPU offload: " + (f"yes ({', '.join(info['gpu_devices'])})" if info["supports_gpu_offload"] else
                             "no (no GPU device visible" + ("; RPC servers' devices can take layers: --rpc)"
                                                            if info["rpc"] else ")")))
    print(f"RPC (llama.cpp ggml-rpc, protocol {info['rpc_protocol']}): "
          + ("yes: --rpc HOST:PORT, pyllm rpc-server" if info["rpc"] else "no (built with PYLLM_RPC=0)"))
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

    config = _engine_config(args)
    sampling = _sampling_from_args(args)
    max_tokens = None if args.n_predict < 0 else args.n_predict
    with Engine(config) as engine:
        stream = engine.stream(args.prompt, max_tokens=max_tokens, sampling=sampling, stop=args.stop or (),
                               chat=args.chat, ignore_eos=args.ignore_eos)
        out = sys.stdout
        for piece in stream:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        result = stream.result
        kv = engine.kv_cache_bytes()
        ctx = engine.context
        # Split over several devices (GPUs, RPC servers): the KV bytes each holds, as llama.cpp accounts them.
        per_device = (" (" + ", ".join(f"{name} {b / 2**20:.2f}" for name, b in kv.devices.items()) + " MiB)"
                      if len(kv.devices) > 1 else "")
        print(
            f"KV cache: K {kv.type_k} / V {kv.type_v}, {kv.total_mib:.2f} MiB{per_device} for n_ctx={ctx.n_ctx} "
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
    max_tokens = "auto" if args.n_predict is None else None if args.n_predict < 0 else args.n_predict
    kind_now = None
    parts = {"reasoning": [], "content": []}
    try:
        for kind, text in engine.stream_chat(history, max_tokens=max_tokens, sampling=sampling,
                                             enable_thinking=enable_thinking, ignore_eos=args.ignore_eos):
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
    result = engine.last_result
    print(f"[stop: {result.stop_reason}, {result.n_generated} tokens]", file=sys.stderr)
    msg = {"role": "assistant", "content": "".join(parts["content"]).strip()}
    if parts["reasoning"]:
        msg["reasoning_content"] = "".join(parts["reasoning"]).strip()
    return msg


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn chat on a terminal (/reset, /exit; Ctrl-C stops a reply); one turn from piped stdin."""
    from pyllm.engine import Engine
    from pyllm.errors import ConfigError

    config = _engine_config(args)
    sampling = _sampling_from_args(args)
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
    p.add_argument("--system", help="system prompt")
    p.add_argument("--no-think", action="store_true", help="turn the model's thinking off (enable_thinking=false)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning block")
    from pyllm.config import CHAT_MAX_TOKENS

    _add_sampling_args(p, n_predict=None, n_help=f"max tokens per reply (default: up to {CHAT_MAX_TOKENS}, as many as "
                                                 "the context has room for; -1 = until end or a full context)")
    p.set_defaults(func=cmd_chat)


def _add_sampling_args(p: argparse.ArgumentParser, *, n_predict: Optional[int], n_help: str) -> None:
    """llama.cpp's generation flags, with its defaults (the seed is a setting: --seed / LLAMA_SEED)."""
    p.add_argument("-n", "--n-predict", type=int, default=n_predict, help=n_help)
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy; default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="never sample end-of-generation tokens (llama.cpp's --ignore-eos): generate -n tokens")


def _sampling_from_args(args: argparse.Namespace):
    from pyllm.sampling import SamplingParams

    # No seed here: the engine's (--seed / LLAMA_SEED) applies to every sampled generation without one.
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty)


def _progress_bar(total: int, unit: str, enabled: bool):
    """A tqdm bar on stderr for long runs; None when output is not a terminal (or disabled)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit=unit, leave=False, dynamic_ncols=True)


def _with_progress(run, params, total: int, unit: str, enabled: bool):
    """``run(params, progress=...)`` with a progress bar advanced once per labelled step."""
    bar = _progress_bar(total, unit, enabled=enabled)

    def progress(label: str) -> None:
        if bar is not None:
            bar.set_description(label)
            bar.update(1)

    try:
        return run(params, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# The settings of the list commands: K/V types are lists there, and n_ctx is their own (bench sizes each
# test's context; kv-eval's -c is llama-perplexity's chunk size). n_ctx=0 keeps n_batch unbounded by it.
LIST_FIELDS = ("model_path", "n_batch", "n_ubatch", "n_gpu_layers", "n_threads") + KV_FIELDS


def cmd_bench(args: argparse.Namespace) -> int:
    from pyllm import bench
    from pyllm.engine import placement_of
    from pyllm.errors import ConfigError

    env = _environment(args)
    if args.batched:
        return _cmd_bench_batched(args, env)
    for flag, value in (("-c", args.n_ctx), ("-npp", args.n_pp), ("-ntg", args.n_tg), ("-npl", args.n_pl),
                        ("-pps", args.shared_prompt or None), ("-kvu", args.kv_unified or None)):
        if value is not None:
            raise ConfigError(f"{flag} applies to pyllm bench --batched only; llama-bench's tests size their own "
                              "contexts (-p, -n, -d)")
    config = _config_from_args(args, env, n_ctx=0)
    params = bench.BenchParams(
        model_path=_model_path(config), n_prompt=args.n_prompt, n_gen=args.n_gen, n_depth=args.n_depth,
        kv_pairs=_kv_pairs_from_args(args, env, ["f16"]),
        flash_attn=_flash_attn_list(args, env),
        n_batch=config.n_batch, n_ubatch=config.n_ubatch, n_threads=config.n_threads,
        n_gpu_layers=config.n_gpu_layers, repetitions=args.repetitions, placement=placement_of(config),
    )
    rows = _with_progress(bench.run_bench, params, len(params.tests()), "test",
                          enabled=args.output != "json" and not args.no_progress)
    print(bench.FORMATS[args.output](rows))
    return 0


def _cmd_bench_batched(args: argparse.Namespace, env) -> int:
    from pyllm import bench
    from pyllm.engine import placement_of

    config = _config_from_args(args, env)
    params = bench.BatchedBenchParams(
        model_path=_model_path(config), n_pp=args.n_pp or [128, 512], n_tg=args.n_tg or [128],
        n_pl=args.n_pl or [1, 2, 4, 8, 16, 32], shared_prompt=args.shared_prompt, kv_unified=args.kv_unified,
        n_ctx=config.n_ctx, kv_pairs=_kv_pairs_from_args(args, env, ["f16"]),
        flash_attn=_flash_attn_list(args, env),
        n_batch=config.n_batch, n_ubatch=config.n_ubatch, n_threads=config.n_threads,
        n_gpu_layers=config.n_gpu_layers, placement=placement_of(config),
    )
    n_rows = len(params.rows()) * len(params.kv_pairs) * len(params.flash_attn)
    rows = _with_progress(bench.run_batched_bench, params, n_rows, "row",
                          enabled=args.output != "json" and not args.no_progress)
    print(bench.BATCHED_FORMATS[args.output](rows))
    if args.verbose:
        print("\nstep trace of the tg phase (medians per step):\n" + bench.format_batched_trace(rows), file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pyllm import plan
    from pyllm.engine import gpu_layers_of, placement_of

    env = _environment(args)
    config = _config_from_args(args, env)
    # -b / -ub (else their defaults) before they are fitted to -c: plan measures other context sizes too, each
    # with the batch sizes the same flags give a context of that size.
    batch = _config_from_args(args, env, n_ctx=0)
    result = plan.make_plan(
        _model_path(config), pairs=_kv_pairs_from_args(args, env, ["f16", "q8_0", "q4_0"], config.flash_attn),
        n_ctx=config.n_ctx, memory=args.memory, n_gpu_layers=gpu_layers_of(config),
        n_batch=batch.n_batch, n_ubatch=batch.n_ubatch, flash_attn=config.flash_attn, curves=bool(args.plot),
        placement=placement_of(config),
        n_parallel=config.n_parallel, kv_unified=not args.no_kv_unified,
    )
    print(result.to_json() if args.json else plan.format_table(result))
    if args.plot:
        plan.plot(result, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_kv_eval(args: argparse.Namespace) -> int:
    from pyllm import kveval
    from pyllm.devices import resolve_gpu_layers

    env = _environment(args)
    config = _config_from_args(args, env, n_ctx=0)
    pairs = _kv_pairs_from_args(args, env, ["q8_0", "q4_0"])
    text, source = (kveval.read_text_file(args.file), args.file) if args.file else kveval.default_text()
    print(f"text: {source}", file=sys.stderr)
    bar = _progress_bar(args.chunks, "chunk", enabled=not args.json)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        report = kveval.kv_eval(_model_path(config), pairs, text=text, text_source=source,
                                n_ctx=args.ctx_size, n_chunks=args.chunks, flash_attn=config.flash_attn,
                                n_threads=config.n_threads, n_gpu_layers=resolve_gpu_layers(config.n_gpu_layers),
                                progress=progress)
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

    env = _environment(args)
    config = _engine_config(args, env)
    # llama-server keeps its aliases in a sorted set and serves as the first of them: the same id here
    names = sorted(dict.fromkeys(_comma_list(args.alias) or ()))
    settings = ServeSettings.from_env(env, host=args.host, port=args.port, api_key=args.api_key,
                                      model_name=names[0] if names else None,
                                      aliases=tuple(names[1:]) if names else None, grace_s=args.grace,
                                      max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
                                      default_max_tokens=args.n_predict,
                                      log_level="debug" if args.verbose >= 2 else "info",
                                      special_in_messages=True if args.special_in_messages else None,
                                      default_temperature=args.temp, metrics=args.metrics, slots=args.slots,
                                      cors_origins=args.cors_origins, tags=tuple(_comma_list(args.tags)) or None,
                                      jinja=args.jinja, reasoning_format=args.reasoning_format,
                                      reasoning=args.reasoning, verbose_responses=args.verbose_responses or None,
                                      any_model=args.any_model or None)
    if args.replicas is not None:
        try:
            from pyllm.server.replicas import serve_replicas
        except ImportError as exc:
            raise PyllmError(f"pyllm serve --replicas needs the ray extra ({exc.name} is missing): "
                             "pip install 'pyllm[ray]'") from None
        return serve_replicas(config, settings, args.replicas, num_cpus=args.replica_cpus,
                              imbalance_threshold=args.imbalance_threshold, router=args.replica_router)
    return serve(config, settings)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected a number of replicas >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; expected a number of replicas >= 1")
    return value


def _comma_list(values: Optional[Sequence[str]]) -> list[str]:
    """Repeated flags whose values may each be a comma-separated list (llama-server's --alias, --tags):
    the names in order, blanks and repeats dropped."""
    out: list[str] = []
    for v in values or ():
        out += [x.strip() for x in v.split(",") if x.strip()]
    return list(dict.fromkeys(out))


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs pip install 'pyllm[server]')",
                       description="An OpenAI-compatible HTTP server that also answers llama-server's own endpoints "
                                   "(/completion, /props, /slots, /tokenize, /apply-template) and takes its flags.")
    _add_model_args(p, ENGINE_FIELDS + ("n_parallel", "kv_unified") + SESSION_FIELDS)
    p.add_argument("--host", help="address to bind (env HOST; default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="TCP port (env PORT; default 8080)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' or 'X-Api-Key: KEY' (env PYLLM_API_KEY, "
                                     "preferred: flags are visible to other users in ps)")
    p.add_argument("-a", "--alias", action="append",
                   help="model id to serve as (repeatable or comma-separated, as llama-server's; as llama-server, the "
                        "alphabetically first is the id /v1/models reports; default: the file name)")
    p.add_argument("--tags", action="append", help="model tags /v1/models lists (comma-separated, informational)")
    p.add_argument("--grace", type=float, help="seconds running requests may finish after SIGTERM "
                                               "(env PYLLM_SHUTDOWN_GRACE; default 30)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (env PYLLM_MAX_BODY_BYTES; default 8 MiB)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 503 (env PYLLM_MAX_QUEUE; default 64)")
    p.add_argument("--replicas", type=_positive_int, metavar="N",
                   help="N engines on Ray Serve behind one address, prefix-affinity routing (needs pip install "
                        "'pyllm[ray]'; starts Ray on this machine; see README 'More than one box')")
    p.add_argument("--replica-cpus", type=float, default=1.0, metavar="CPUS",
                   help="Ray CPUs reserved per replica with --replicas (default 1; set -t to match)")
    p.add_argument("--imbalance-threshold", type=int, default=4, metavar="REQUESTS",
                   help="with --replicas: the replica holding a prompt's longest prefix gets it unless it has more "
                        "than this many ongoing requests above the least-loaded one (default 4)")
    p.add_argument("--replica-router", choices=("prefix-affinity", "power-of-two"), default="prefix-affinity",
                   help="with --replicas: pyllm's prefix-affinity router (default) or Ray Serve's default "
                        "power-of-two-choices router (the baseline of benchmarks/replicas.py)")
    p.add_argument("-n", "--n-predict", "--predict", type=int,
                   help="max_tokens of requests that give none (env PYLLM_DEFAULT_MAX_TOKENS; default n_ctx / "
                        "n_parallel - prompt)")
    p.add_argument("--temp", "--temperature", type=float,
                   help="temperature of requests that give none (llama-server's --temp; default 0.8)")
    p.add_argument("--special-in-messages", action="store_true",
                   help="parse control tokens written in message text (<end_of_turn> ...), as llama-server does "
                        "(env PYLLM_SPECIAL_IN_MESSAGES=1); default: message text is plain text, so no message "
                        "can close its turn or forge another")
    p.add_argument("--metrics", dest="metrics", action="store_const", const=True, default=None,
                   help="serve /metrics (the default; pyllm's and llama-server's llamacpp: names)")
    p.add_argument("--no-metrics", dest="metrics", action="store_const", const=False,
                   help="answer /metrics with 501, as llama-server does without --metrics")
    p.add_argument("--slots", dest="slots", action="store_const", const=True, default=None,
                   help="serve GET /slots, each slot's state (the default, as llama-server's)")
    p.add_argument("--no-slots", dest="slots", action="store_const", const=False, help="answer /slots with 501")
    p.add_argument("--cors-origins", metavar="ORIGINS",
                   help="origins a browser may call this server from: comma-separated, '*' (any; the Origin is "
                        "echoed), or 'localhost' (any origin on this machine), as llama-server's (default: none, "
                        "no CORS headers are sent)")
    p.add_argument("--jinja", dest="jinja", action="store_const", const=True, default=None,
                   help="render the model's chat template with Jinja (the default)")
    p.add_argument("--no-jinja", dest="jinja", action="store_const", const=False,
                   help="render the model's chat template with llama.cpp's built-in formats (llama_chat_apply_template "
                        "detects the format from the template), as llama-server --no-jinja")
    p.add_argument("--reasoning-format", choices=("auto", "deepseek", "none"),
                   help="where a reply's <think> block goes: deepseek/auto (the default) reasoning_content, none: "
                        "left in content (a request's reasoning_format overrides it)")
    p.add_argument("-rea", "--reasoning", choices=("on", "off", "auto"),
                   help="thinking by default: on/off pass enable_thinking true/false to the chat template, auto "
                        "(the default) leaves it to the request (enable_thinking true unless it turns it off)")
    p.add_argument("--verbose", dest="verbose_responses", action="store_true",
                   help="every completion response carries '__verbose' (the rendered prompt and the generation "
                        "settings), as llama-server --verbose; a request asks for it with \"verbose\": true")
    p.add_argument("--any-model", action="store_true",
                   help="answer requests whatever model they name, as llama-server does (default: a name that is "
                        "neither the served model nor an alias is a 404, as OpenAI answers it)")
    p.add_argument("--offline", action="store_true",
                   help="accepted for llama-server's scripts: pyllm downloads nothing (a model is a local file)")
    p.set_defaults(func=cmd_serve)


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion to stdout")
    p.add_argument("prompt", help="the prompt text")
    _add_model_args(p)
    _add_sampling_args(p, n_predict=128, n_help="tokens to generate (-1 = until end or full context)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="format the prompt with the chat template")
    p.set_defaults(func=cmd_generate)
    _add_chat_parser(sub)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="llama-bench's tests through pyllm's engine (KV type matrix); "
                                     "--batched: llama-batched-bench's through the batched engine",
                       description=KV_LISTS_HELP)
    _add_model_args(p, LIST_FIELDS + ("n_ctx",) + SPLIT_FIELDS, kv_lists=True,
                    help_defaults={"kv_cache_type_k": "f16", "n_ctx": "--batched only; 0: the training context"})
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], help="prompt-processing test sizes (default 512)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], help="generation test sizes (default 128)")
    p.add_argument("-d", "--n-depth", type=_int_list, default=[0], help="KV cache depth before each test (default 0)")
    p.add_argument("-fa", "--flash-attn", type=_str_list, help="on, off, auto, comma-separated (default auto) [env FLASH_ATTN]")
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("-o", "--output", choices=("md", "json", "csv"), default="md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("--batched: llama-batched-bench's table (PP, TG, B, N_KV, T_PP, S_PP, T_TG, S_TG, T, S)")
    g.add_argument("--batched", action="store_true",
                   help="many sequences at once through the batched engine, as llama-batched-bench")
    g.add_argument("-npp", dest="n_pp", type=_int_list, help="prompt tokens per sequence (default 128,512)")
    g.add_argument("-ntg", dest="n_tg", type=_int_list, help="generated tokens per sequence (default 128)")
    g.add_argument("-npl", dest="n_pl", type=_int_list, help="sequences at once (default 1,2,4,8,16,32)")
    g.add_argument("-pps", dest="shared_prompt", action="store_true",
                   help="one prompt shared by all sequences (decoded once, its cells copied)")
    g.add_argument("-kvu", "--kv-unified", dest="kv_unified", action="store_true",
                   help="one KV pool shared by all sequences (default: n_ctx / max(-npl) each, as llama-batched-bench)")
    p.set_defaults(func=cmd_bench, _defaults={"n_ctx": 0})


def cmd_rpc_server(args: argparse.Namespace) -> int:
    from pyllm import rpc

    return rpc.serve(args.host, args.port, threads=args.threads, cache=args.cache, allow_remote=args.allow_remote)


def _add_rpc_server_parser(sub) -> None:
    p = sub.add_parser(
        "rpc-server", help="serve this machine's devices to other pyllm/llama.cpp processes (llama.cpp's rpc-server)",
        description="llama.cpp's RPC server: clients (--rpc HOST:PORT) place layers on this machine's devices (its "
                    "GPUs, else its CPU). It has NO authentication: it binds 127.0.0.1 unless --allow-remote; reach "
                    "it over an SSH/WireGuard tunnel or a private network. One client at a time.")
    p.add_argument("--host", default="127.0.0.1", help="IPv4 address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50052, help="TCP port (default 50052)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for the CPU device (default: half the CPUs)")
    p.add_argument("-c", "--cache", action="store_true",
                   help="cache tensors sent to this server on disk ($LLAMA_CACHE/rpc, else ~/.cache/llama.cpp/rpc)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host (unauthenticated: private networks only)")
    p.set_defaults(func=cmd_rpc_server)


def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="how much context fits in a memory budget, per KV type pair (metadata only)",
                       description=KV_LISTS_HELP)
    _add_model_args(p, LIST_FIELDS + ("n_ctx", "flash_attn", "n_parallel") + SPLIT_FIELDS, kv_lists=True,
                    help_defaults={"kv_cache_type_k": "f16,q8_0,q4_0", "n_ctx": "0: the training context",
                                   "n_parallel": "1; as serve, N sequences share the -c context; N > 1 adds how "
                                                 "many sequences of -c / N fit at once and how long each of N can be"})
    p.add_argument("-no-kvu", "--no-kv-unified", action="store_true",
                   help="with -np: n_ctx / n_parallel cells per sequence (llama.cpp's split KV) instead of one pool")
    p.add_argument("--memory", help="budget, e.g. 96GiB, or 'gpu' for the visible GPU's free memory "
                                    "(default: the GPU's free memory, else system RAM)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE.png", help="draw memory against context length (needs matplotlib)")
    p.set_defaults(func=cmd_plan, _defaults={"n_ctx": 0})


def _add_kv_eval_parser(sub) -> None:
    p = sub.add_parser("kv-eval", help="quality of quantized KV caches: perplexity, KL divergence and top-1 vs f16",
                       description=KV_LISTS_HELP)
    _add_model_args(p, LIST_FIELDS + ("flash_attn",), kv_lists=True, help_defaults={"kv_cache_type_k": "q8_0,q4_0"})
    p.add_argument("-f", "--file", help="UTF-8 text to evaluate (default: Python's pydoc topics, shipped with Python)")
    p.add_argument("-c", "--ctx-size", type=int, default=512,
                   help="tokens per chunk, as llama-perplexity -c (default 512; not MAX_CONTEXT_LENGTH)")
    p.add_argument("--chunks", type=int, default=10, help="chunks to evaluate (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_kv_eval)


KV_LISTS_HELP = ("-ctk/-ctv/--kv-cache-type take comma-separated lists: without V types each K type runs with "
                 "itself (K = V); with -ctv, every K x V pair runs. Flags left out come from the environment "
                 "(the variable in brackets), then the defaults.")


def build_parser() -> argparse.ArgumentParser:
    from pyllm.version import VERSION

    parser = argparse.ArgumentParser(prog="pyllm", description="llama.cpp from Python, with KV-cache quantization")
    parser.add_argument("--version", action="version", version=f"pyllm {VERSION}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: pyllm INFO logs, -vv: llama.cpp's too")
    _add_env_file_arg(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="build identity: version, llama.cpp pin, backends, KV types")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--chat-templates", action="store_true", help="list the chat template names")
    p.set_defaults(func=cmd_info)
    _add_generate_parser(sub)
    _add_bench_parser(sub)
    _add_plan_parser(sub)
    _add_kv_eval_parser(sub)
    _add_serve_parser(sub)
    _add_rpc_server_parser(sub)
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
