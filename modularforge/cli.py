"""Command line: one subcommand per pipeline stage, plus `run` (all stages, skipping finished ones),
`generate`, `export` and `config`, all from one table (`COMMANDS`: subcommand -> function, help, flags). Only
this module turns exceptions into a message and an exit code.

`run` starts every stage as a child process: memory is returned between stages, and each stage's
peak RSS in the manifest is that stage's own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modularforge.config import Config, describe_keys, load_config, preset_names, preset_path
from modularforge.errors import ModularForgeError, os_error
from modularforge.runs import STAGES, Run

log = logging.getLogger("modularforge")

EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141  # 128 + SIGINT / SIGPIPE, as shells report them


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", type=Path, help="YAML config file")
    g.add_argument("--preset", help=f"shipped preset: {', '.join(preset_names())} (default: demo)")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable); `modularforge config --keys` lists them")
    g.add_argument("--run-dir", type=Path, help="run directory (default: <run.root>/<run.name>)")
    g.add_argument("--smoke-test", action="store_true", help="use the tiny `smoke` preset (`smoke-base` with --base)")
    g.add_argument("--base", metavar="PATH", help="start from this pretrained model: a Hugging Face folder, a .gguf "
                   "file or a hub id (model.base); its shape and tokenizer replace the preset's")


def resolve(args: argparse.Namespace) -> Run:
    """Config from --smoke-test / --config / --preset / the run directory's saved config / the demo preset."""
    chosen = [x for x in (args.smoke_test and "smoke", args.config, args.preset) if x]
    if len(chosen) > 1:
        raise ModularForgeError("give only one of --smoke-test, --config and --preset")
    if args.base:
        local = Path(args.base).expanduser()
        args.set.append(f"model.base={json.dumps(str(local.resolve()) if local.exists() else args.base)}")
    saved = args.run_dir / "config.yaml" if args.run_dir else None
    if args.smoke_test:
        path = preset_path("smoke-base" if args.base else "smoke")
    elif args.config:
        path = args.config
    elif args.preset:
        path = preset_path(args.preset)
    elif saved is not None and saved.exists():
        path = saved
    else:
        path = preset_path("demo")
    cfg: Config = load_config(path, args.set)
    return Run(cfg, args.run_dir)


def _apply_runtime(run: Run) -> None:
    """Process-wide runtime settings of the run: torch threads and the allocator's mmap threshold."""
    if run.cfg.run.threads:
        import torch

        torch.set_num_threads(run.cfg.run.threads)
    if run.cfg.run.malloc_mmap_threshold_kb:
        set_mmap_threshold(run.cfg.run.malloc_mmap_threshold_kb << 10)


def set_mmap_threshold(nbytes: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD): also turns off glibc's dynamic threshold, which otherwise climbs to 32 MB and
    leaves freed activations in a fragmented heap. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        log.warning("run.malloc_mmap_threshold_kb needs glibc; ignored")
        return False


def _dataset_override(args) -> None:
    if getattr(args, "dataset", None):
        args.set.append(f"data.dataset={args.dataset}")


NEVER = "never"  # a flag's word for a config key's null, where null means "never" (sequence_revise_every)


def _int_or_never(text: str) -> int | str:
    if text.strip().lower() in (NEVER, "null"):
        return NEVER
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or '{NEVER}', got {text!r}") from None


def _flags_to_overrides(args, flags: dict[str, str]) -> None:
    """Turn command-line flags into `--set` overrides, so they are range-checked like every config value and mean
    what the config key means."""
    for attr, key in flags.items():
        value = getattr(args, attr)
        if value is not None:
            args.set.append(f"{key}={'null' if value == NEVER else json.dumps(value)}")


def cmd_prepare(args) -> None:
    from modularforge.prepare import prepare

    _dataset_override(args)
    prepare(resolve(args))


def _stage_command(module: str, function: str) -> Callable[[argparse.Namespace], None]:
    """A command that runs one stage function `function(run)` of `module` (imported when it runs)."""

    def command(args: argparse.Namespace) -> None:
        run = resolve(args)
        _apply_runtime(run)
        getattr(importlib.import_module(module), function)(run)

    return command


def cmd_train_experts(args) -> None:
    from modularforge.train.experts import train_experts

    if args.executor:
        args.set.append(f"experts.executor={args.executor}")
    if args.ray_address:
        args.set.append(f"experts.ray_address={args.ray_address}")
    run = resolve(args)
    _apply_runtime(run)
    train_experts(run)


def cmd_evaluate(args) -> None:
    _flags_to_overrides(args, {"window": "evaluate.window", "stride": "evaluate.stride",
                               "expert_cache": "evaluate.expert_cache"})
    run = resolve(args)
    _apply_runtime(run)
    if args.data:
        from modularforge.evaluate import evaluate_file

        e = run.cfg.evaluate
        from modularforge.device import resolve_device
        from modularforge.evaluate import FileScoring

        if args.max_tokens is not None and args.max_tokens < 2:
            raise ModularForgeError(f"--max-tokens must be at least 2 (scoring needs two tokens), got {args.max_tokens}")
        if args.expert is not None and args.routing == "sequence":
            raise ModularForgeError("--expert sends every token to one expert; it does not go with --routing sequence")
        how = FileScoring(e.window, e.stride, args.routing, e.prefix_len, e.sequence_revise_every, args.precision,
                          max_tokens=args.max_tokens)
        result = evaluate_file(args.model or run.model_dir, args.data, how, text_field=run.cfg.data.text_field,
                               expert_cache=e.expert_cache, device=resolve_device(run.cfg), expert=args.expert)
        print(json.dumps(result, indent=2))
        return
    from modularforge.evaluate import evaluate

    if args.model:
        raise ModularForgeError("--model applies to `evaluate --data FILE`; the full report evaluates the run")
    if args.window is not None or args.stride is not None or args.expert is not None or args.max_tokens is not None:
        raise ModularForgeError("--window, --stride, --expert and --max-tokens apply to `evaluate --data FILE`; the "
                                "report scores the run's validation text")
    evaluate(run)


GENERATE_FLAGS = {
    "temperature": "generate.temperature", "top_k": "generate.top_k", "top_p": "generate.top_p",
    "max_new_tokens": "generate.max_new_tokens", "min_new_tokens": "generate.min_new_tokens", "seed": "generate.seed",
    "context_window": "generate.context_window", "routing": "generate.routing", "revise_every":
    "generate.sequence_revise_every", "expert_cache": "generate.expert_cache", "dtype": "generate.dtype",
}


def cmd_generate(args) -> None:
    from modularforge.data.tokenizer import eos_id, load_tokenizer
    from modularforge.generate import stream_to_stdout
    from modularforge.inference import AssembledFolder, open_model
    from modularforge.sampling import Sampling, generate_text

    _flags_to_overrides(args, GENERATE_FLAGS)
    run = resolve(args)
    _apply_runtime(run)
    g = run.cfg.generate
    model_dir = args.model or run.model_dir
    from modularforge.device import resolve_device

    folder = AssembledFolder(model_dir)
    tokenizer = load_tokenizer(model_dir, folder.vocab_size)
    model = open_model(folder, expert_cache=g.expert_cache, decode_dtype=g.dtype, device=resolve_device(run.cfg))
    shown = False

    def show(piece: str) -> None:  # the prompt appears with the first new text, after every check has passed
        nonlocal shown
        if not shown:
            sys.stdout.write(args.prompt)
            shown = True
        stream_to_stdout(piece)

    generate_text(model, tokenizer, args.prompt, Sampling.from_config(g), routing=g.routing, on_text=show,
                  eos=eos_id(tokenizer, model_dir))
    if not shown:
        sys.stdout.write(args.prompt)
    sys.stdout.write("\n")


def cmd_run(args) -> None:
    _dataset_override(args)
    run = resolve(args)
    run.check_base()  # a changed base is refused here, before the first child starts
    with run.lock():  # held across every stage; the children share it (`Run.child_lock`)
        run.save_config()
        log.info("run directory: %s", run.dir)
        run_stages(run, args, STAGES)
    report = run.reports_dir / "report.md"
    log.info("done: model in %s, report in %s", run.model_dir, report)
    _print_samples(run)


def run_stages(run: Run, args, stages: list[str]) -> None:
    """Run each unfinished stage of `stages` as a child process, under the lock this process holds."""
    env, lock_fds = run.child_lock()
    flags = [*(["-v"] if args.verbose else []), *(["--debug"] if args.debug else [])]
    for stage in stages:
        if run.is_done(stage):
            log.info("%s: already done, skipping", stage)
            continue
        command = [sys.executable, "-m", "modularforge", *flags, stage, "--run-dir", str(run.dir)]
        log.info("%s: starting", stage)
        code = subprocess.call(command, env=env, pass_fds=lock_fds)
        if code:
            raise StageFailed(stage, code)


AFTER_EXPERTS = STAGES[STAGES.index("train-experts"):]


def _grow(args, change: Callable[[Run], None]) -> None:
    """Change the run's expert set under its lock, then train what is new, re-assemble, recalibrate and rewrite the
    report. The change (reading new text, or checking and copying an expert) runs in a child process like each
    stage, so every step's peak RSS is its own. What changed and what each step cost go to the log and to the
    manifest's `changes`."""
    run = resolve(args)
    if args.run_dir is None:
        raise ModularForgeError(f"{args.command} changes an existing run: give --run-dir RUN")
    if not run.marker_path.is_file():
        raise ModularForgeError(f"{run.dir} is not a ModularForge run directory; give --run-dir RUN of a finished run")
    run.check_base()
    _apply_runtime(run)
    if args.change_only:  # the child: the parent holds the lock and runs the stages
        with run.lock():
            change(run)
        return
    with run.lock():
        run.save_config()
        before = [s.name for s in run.experts()]
        env, lock_fds = run.child_lock()
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "modularforge", *args.argv, "--change-only"], env=env,
                               pass_fds=lock_fds)
        if code:
            raise ChildFailed(code)  # the child printed its one-line error
        steps = {args.command: {"wall_seconds": round(time.perf_counter() - started, 2),
                                "peak_rss_mb": round(peak_rss_of_children(), 1)}}
        run_stages(run, args, AFTER_EXPERTS)
        after = [s.name for s in run.experts()]
        stages = run.manifest()["stages"]
        steps |= {s: {k: stages[s][k] for k in ("wall_seconds", "peak_rss_mb")}
                  for s in AFTER_EXPERTS if "wall_seconds" in stages.get(s, {})}
        entry = {"command": args.command, "added": [n for n in after if n not in before],
                 "removed": [n for n in before if n not in after], "experts": after, "finished_at": time.time(),
                 "wall_seconds": round(time.perf_counter() - started, 2), "steps": steps}
        run.record_change(entry)
    what = "; ".join(f"{k} {', '.join(entry[k])}" for k in ("added", "removed") if entry[k]) or "no change"
    log.info("%s done in %.0f s (%s): %s", args.command, entry["wall_seconds"], what, ", ".join(
        f"{step} {cost['wall_seconds']:.0f} s, peak RSS {cost['peak_rss_mb']:.0f} MB" for step, cost in steps.items()))
    log.info("the model (%d experts: %s) is in %s, the report in %s", len(after), ", ".join(after), run.model_dir,
             run.reports_dir / "report.md")


def peak_rss_of_children() -> float:
    """The largest peak RSS (MB) of the child processes waited for so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


class ChildFailed(ModularForgeError):
    """A child process failed and has said why: exit with its code, adding nothing."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"exit code {code}")


def cmd_add_expert(args) -> None:
    from modularforge.grow import add_experts

    _grow(args, lambda run: add_experts(run, args.data or [], args.dataset, args.name, args.tokens, args.clusters,
                                        args.replay))


def cmd_import_expert(args) -> None:
    from modularforge.grow import import_expert

    _grow(args, lambda run: import_expert(run, args.folder, args.name))


def cmd_remove_expert(args) -> None:
    from modularforge.grow import remove_expert

    _grow(args, lambda run: remove_expert(run, args.name))


class StageFailed(ModularForgeError):
    def __init__(self, stage: str, code: int):
        self.code = code
        super().__init__(f"stage {stage} failed (exit code {code}); fix the cause and rerun to resume")


def _print_samples(run: Run) -> None:
    from modularforge.files import read_json
    from modularforge.schemas import Report

    path = run.reports_dir / "report.json"
    if not path.exists():
        return
    report = read_json(path, Report)
    print("\nperplexity on held-out text: assembled MoE %.2f, dense anchor %.2f" % (
        report["headline"]["token"]["perplexity"], report["headline"]["anchor"]["perplexity"]))
    for s in report["samples"]:
        print(f"\n[{s['routing']} routing] {s['prompt']}{s['text']}")


def cmd_export(args) -> None:
    from modularforge.export import export

    run = resolve(args)
    if args.model:
        print(export(args.model, args.format, args.out, args.dtype))
        return
    with run.lock():  # the run's model must not be replaced while it is read
        print(export(run.model_dir, args.format, args.out, args.dtype))


def cmd_config(args) -> None:
    if args.keys:
        for key, default, doc in describe_keys():
            print(f"{key} = {default}\n    {doc}")
        return
    print(resolve(args).cfg.to_yaml(), end="")


def _dataset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="Hugging Face dataset name or alias, e.g. wikitext-103 (data.dataset)")


def _train_experts_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], help="where experts train (experts.executor)")
    p.add_argument("--ray-address", help="Ray cluster address (experts.ray_address)")


def _evaluate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="evaluate on this UTF-8 text file instead")
    p.add_argument("--model", type=Path, help="assembled model folder (default: the run's model/)")
    p.add_argument("--window", type=int, help="window length in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, help="window stride (default: evaluate.stride or the window)")
    p.add_argument("--routing", choices=["token", "sequence"], default="token", help="routing mode for --data")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32", help="compute precision")
    p.add_argument("--expert-cache", type=int, help="keep at most N expert FFNs in memory (LRU) (evaluate.expert_cache)")
    p.add_argument("--expert", help="with --data: send every token to this expert (its name, or its position), as "
                   "oracle routing does when the text's expert is known")
    p.add_argument("--max-tokens", type=int, help="with --data: score the first N tokens of the file only")


def _generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", type=Path, help="assembled model folder (default: the run's model/)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--min-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--context-window", type=int, help="sliding context window in tokens")
    p.add_argument("--routing", choices=["token", "sequence"], help="per-token routing or one expert per sequence")
    p.add_argument("--revise-every", type=_int_or_never, metavar="N|never",
                   help="sequence routing: re-choose the expert every N new tokens, or never "
                   "(generate.sequence_revise_every; never = null)")
    p.add_argument("--expert-cache", type=int, help="keep at most N expert FFNs in memory (LRU)")
    p.add_argument("--dtype", choices=["float32", "float16"], help="weight precision for generation")


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16")
    p.add_argument("--out", type=Path, help="output file (default: <run>/model.<dtype>.gguf)")
    p.add_argument("--model", type=Path, help="assembled model folder (default: the run's model/)")


def _change_only_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--change-only", action="store_true", help=argparse.SUPPRESS)  # the child that changes the set


def _add_expert_flags(p: argparse.ArgumentParser) -> None:
    _change_only_flag(p)
    p.add_argument("--data", action="append", metavar="PATH",
                   help="the new text: .txt/.jsonl/.jsonl.gz/.parquet files, folders or globs, as `prepare` reads "
                   "them (repeatable)")
    p.add_argument("--dataset", help="or a Hugging Face dataset name (needs network or a cache)")
    p.add_argument("--name", help="the new expert's name (default: expert_XX, the next free number); with "
                   "--clusters K, the experts are NAME_0 ... NAME_{K-1}")
    p.add_argument("--tokens", type=int, help="training tokens of each new expert (default: the run's tokens per expert)")
    p.add_argument("--clusters", type=int, default=1, help="split the new text into K experts, as prepare clusters")
    p.add_argument("--replay", type=float, help="share of each training batch drawn from the trunk's training text "
                   "(e.g. 0.25), so the expert stays usable on the old text token routing also sends it")


def _import_expert_flags(p: argparse.ArgumentParser) -> None:
    _change_only_flag(p)
    p.add_argument("folder", type=Path, help="the expert's folder (experts/<name>/ of a run with the same trunk)")
    p.add_argument("--name", help="its name here (default: the name it had)")


def _remove_expert_flags(p: argparse.ArgumentParser) -> None:
    _change_only_flag(p)
    p.add_argument("name", help="the expert to remove (its files stay in experts/<name>/)")


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")


@dataclass(frozen=True)
class Command:
    func: Callable[[argparse.Namespace], None]
    help: str
    flags: Callable[[argparse.ArgumentParser], None] | None = None  # its own flags, beside the configuration's


# subcommand -> command, in the order `-h` lists them (the pipeline's, then the tools)
COMMANDS: dict[str, Command] = {
    "prepare": Command(cmd_prepare, "load text, train the BPE tokenizer, write token shards and partitions",
                       _dataset_flag),
    "train-shared": Command(_stage_command("modularforge.train.shared", "train_shared"),
                            "train embeddings, attention, norms, LM head and the anchor FFN"),
    "train-experts": Command(cmd_train_experts, "train one expert FFN per partition beside the frozen shared part",
                             _train_experts_flags),
    "assemble": Command(_stage_command("modularforge.assemble", "assemble"),
                        "stream shared part and experts into a Mixtral folder; routers without training"),
    "calibrate": Command(_stage_command("modularforge.calibrate", "calibrate"),
                         "router temperature and norm gains of the assembled model, without training"),
    "evaluate": Command(cmd_evaluate, "write reports/ for the run, or score a text file with --data", _evaluate_flags),
    "generate": Command(cmd_generate, "generate text, streamed to stdout", _generate_flags),
    "run": Command(cmd_run, "run every stage in order, skipping the ones already finished", _dataset_flag),
    "add-expert": Command(cmd_add_expert, "train a new expert on new text beside the frozen trunk and re-assemble; "
                          "no other expert is retrained", _add_expert_flags),
    "import-expert": Command(cmd_import_expert, "add an expert trained elsewhere from the same trunk and re-assemble",
                             _import_expert_flags),
    "remove-expert": Command(cmd_remove_expert, "take an expert out of the model and re-assemble", _remove_expert_flags),
    "export": Command(cmd_export, "export the assembled model (gguf for llama.cpp)", _export_flags),
    "config": Command(cmd_config, "print the resolved config, or every key with --keys", _config_flags),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modularforge",
        description="Train a Mixture-of-Experts language model one expert at a time, under a memory bound, "
        "and assemble it into a standard Mixtral checkpoint without retraining.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        _add_config_args(p)
        if command.flags is not None:
            command.flags(p)
        p.set_defaults(func=command.func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[%(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except ChildFailed as e:
        return e.code
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code if e.code == EXIT_INTERRUPTED else EXIT_ERROR
    except ModularForgeError as e:
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)  # one line, whatever a library said
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout piped to `head` and closed: stop quietly, as a program killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:  # the environment, not a bug: full disk, permissions, a folder where a file belongs
        print(f"error: {os_error(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug, not a user mistake: one line unless --debug
        if args.debug:
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
