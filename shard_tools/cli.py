"""``shard-tools``: build, merge, verify and describe WebDataset shards of music datasets.

    shard-tools build <dataset> --root SRC --out URL [options]   # dataset: mtat msd musicnet nsynth folder
    shard-tools plan <dataset> --root SRC --out PLAN [options]   # list the corpus once, for --slice jobs
    shard-tools build --plan PLAN --out URL --slice i/K          # one slice, reading only its share
    shard-tools merge URL [URL ...]        # join the partial manifests of --slice builds
    shard-tools verify URL                 # re-read every shard, check sha256/counts, decode every sample
    shard-tools info URL                   # splits, counts, hours, label vocabularies
    shard-tools demo --out DIR             # render a real-instrument demo set and shard it

Recipes are modules ``shard_tools/<dataset>.py`` with ``add_arguments(parser)`` and
``prepare(root, args) -> Recipe``, listed in :data:`RECIPES`; only the one named on the command
line is imported.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import signal
import sys
from contextlib import contextmanager

from pipeline.errors import UserError

# dataset name -> recipe module: the only modules `build <dataset>` imports
RECIPES = {"mtat": "shard_tools.mtat", "msd": "shard_tools.msd", "musicnet": "shard_tools.musicnet",
           "nsynth": "shard_tools.nsynth", "folder": "shard_tools.folder"}
DATASETS = tuple(RECIPES)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"256MB"`` -> 256_000_000, ``"1GiB"`` -> 2**30, ``"4096"`` -> 4096."""
    m = _SIZE.match(text)
    if not m or m.group(2) is not None and m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--shard-size: {text!r} is not a size like 256MB, 1GiB or 100000")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"--shard-size must be positive, got {text!r}")
    return n


def parse_slice(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--slice: {text!r} must be i/K with 0 <= i < K, e.g. 0/8 ... 7/8")
    return int(m.group(1)), int(m.group(2))


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not an integer") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be positive, got {v}")
        return v
    return parse


def _load_recipe(name: str):
    """The recipe module of a dataset named on the command line (only that one is imported)."""
    if name not in RECIPES:
        hint = ("; `demo` is its own command: shard-tools demo --out DIR" if name == "demo" else "")
        raise UserError(f"build {name}: not a dataset recipe; choose one of "
                        f"{', '.join(RECIPES)}{hint}")
    return importlib.import_module(RECIPES[name])


def add_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, metavar="SRC",
                        help="folder holding the dataset in its original layout: a local path or any fsspec URL "
                             "(s3://bucket/mtat, gs://...)")


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every build shares (the dataset's --root and own options come from its recipe)."""
    parser.add_argument("--out", required=True, metavar="URL", help="output folder: local path or fsspec URL (s3://, gs://, file://)")
    parser.add_argument("--codec", choices=("flac", "wav"), default="flac", help="audio codec in the shards (default: flac)")
    parser.add_argument("--shard-size", type=parse_size, default=256_000_000, metavar="SIZE",
                        help="close a shard once it reaches this size, e.g. 256MB, 1GiB (default: 256MB)")
    parser.add_argument("--sample-rate", type=_positive_int("--sample-rate"), default=None, metavar="HZ",
                        help="resample every sample to this rate (default: keep the source rate)")
    parser.add_argument("--mono", action="store_true", help="average channels to mono")
    parser.add_argument("--workers", type=_positive_int("--workers"), default=max(1, min(8, os.cpu_count() or 1)), metavar="N",
                        help="processes that decode, resample and encode (default: CPU cores, at most 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle that mixes sources across shards (default: 0)")
    parser.add_argument("--slice", type=parse_slice, default=(0, 1), metavar="i/K",
                        help="build only slice i of K (0-based) with its own shards and a partial manifest; "
                             "join the K slices with `shard-tools merge OUT`")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take over the output folder's build lock even though its holder (named in the "
                             "error) may still run; only when you know that build is dead")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


# the options of add_root_argument/add_build_arguments; the rest of a build's arguments are the recipe's own
_COMMON = {"root", "out", "codec", "shard_size", "sample_rate", "mono", "workers", "seed", "slice", "quiet",
           "force_unlock", "plan"}


@contextmanager
def remote_errors(flag: str, url: str):
    """Turn an object store that cannot be reached (or refuses us) into one line naming the URL."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not a remote failure
        if "://" not in url or url.startswith("file://") or not _is_remote_failure(exc):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{flag} {url}: the object store did not answer or refused ({type(exc).__name__}: {text}); "
                        f"check the endpoint (AWS_ENDPOINT_URL / --endpoint settings), the network and the "
                        f"credentials, then run the same command again") from exc


def _is_remote_failure(exc: BaseException) -> bool:
    from pipeline.fsio import is_transient

    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False  # a real answer from the store; the caller's message says what was expected
    return (is_transient(exc) or isinstance(exc, OSError)
            or bool(names & {"BotoCoreError", "ClientError", "NoCredentialsError", "EndpointConnectionError",
                             "ClientConnectorError", "ServerTimeoutError", "HttpError", "RefreshError"}))


@contextmanager
def stop_on_signals():
    """SIGTERM (a scheduler's stop, ``kill``) and Ctrl-C stop a build after the file in hand: the
    handler only sets ``workers.STOP``, and the build raises KeyboardInterrupt at its next stop
    point, removes its temp files and releases its lock. A second signal stops at once. (kill -9
    cannot be caught; the next build cleans up after it.)"""
    from shard_tools.workers import STOP

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        print(f"\n[shard-tools] {signal.Signals(signum).name}: stopping after the file in hand "
              f"(again to stop at once)", file=sys.stderr, flush=True)

    STOP.clear()
    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread (an embedding program): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _recipe_parser(name: str, prog: str):
    """The recipe module of ``name`` and a parser with ``--root`` and the recipe's own options."""
    module = _load_recipe(name)
    # the recipe's docstring describes the on-disk layout it expects: worth showing in --help
    parser = argparse.ArgumentParser(prog=f"{prog} {name}", description=(module.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_root_argument(parser)
    return module, parser


def _prepare(module, name: str, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Run the recipe on ``--root`` (local or URL): the Recipe, or a UserError naming what is wrong."""
    root = args.root if "://" in args.root else os.path.expanduser(args.root)
    if "://" not in root and not os.path.isdir(root):
        parser.error(f"--root {args.root}: folder not found; give the folder that holds the {name} dataset")
    try:
        with remote_errors("--root", root):
            return module.prepare(root, args)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{parser.prog.split(' ', 1)[1]}: {exc}") from exc


def cmd_build(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: shard-tools build <dataset> --root SRC --out URL [options]\n"
              "       shard-tools build --plan PLAN --out URL [--slice i/K] [options]\n\n"
              f"datasets: {', '.join(DATASETS)}\n"
              "`shard-tools build <dataset> --help` lists the dataset's own options;\n"
              "`shard-tools build --plan PLAN --help` the options of a build from a plan (see `shard-tools plan`).")
        return 0 if argv else 2
    if argv[0] == "--plan" or argv[0].startswith("--plan="):
        return _build_from_plan(argv)
    name = argv[0]
    module, parser = _recipe_parser(name, "shard-tools build")
    add_build_arguments(parser)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    recipe = _prepare(module, name, args, parser)
    return _run_build(recipe, args, f"build {name}", argv,
                      recipe_options={k: v for k, v in vars(args).items() if k not in _COMMON})


def _build_from_plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shard-tools build --plan",
                                     description="Build (a slice of) a dataset from a plan written by `shard-tools "
                                                 "plan`: no listing of the corpus, only this slice's files are read.")
    parser.add_argument("--plan", required=True, metavar="PLAN", help="the plan file (local path or URL)")
    add_build_arguments(parser)
    args = parser.parse_args(argv)
    from shard_tools.plan import read_plan

    try:
        with remote_errors("--plan", args.plan):
            recipe, meta = read_plan(args.plan)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    return _run_build(recipe, args, f"build --plan {args.plan}", argv, recipe_options=meta["recipe_options"])


def _run_build(recipe, args: argparse.Namespace, what: str, argv: list[str], recipe_options: dict) -> int:
    from shard_tools.build import build_dataset

    slice_index, num_slices = args.slice
    try:
        with stop_on_signals(), remote_errors("--out", args.out):
            report = build_dataset(recipe, args.out, codec=args.codec, shard_size=args.shard_size,
                                   sample_rate=args.sample_rate, mono=args.mono, workers=args.workers,
                                   seed=args.seed, slice_index=slice_index, num_slices=num_slices,
                                   progress=not args.quiet, command=shlex.join(["shard-tools", "build", *argv]),
                                   recipe_options=recipe_options, force_unlock=args.force_unlock)
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from exc
    except KeyboardInterrupt:
        print(f"\nshard-tools {what}: interrupted; run the same command again to resume "
              f"(finished shards are kept)", file=sys.stderr)
        return 130
    if report["samples_written"] == 0 and (num_slices == 1 or report["files_in"] > 0):
        print(f"shard-tools {what}: error: no samples written; all {report['files_in']} input files were "
              f"skipped (reasons in the build report under {args.out})", file=sys.stderr)
        return 1
    return 0


def cmd_plan(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: shard-tools plan <dataset> --root SRC --out PLAN [dataset options]\n\n"
              "Runs the dataset's recipe once (lists the corpus, reads its label files) and writes the items to\n"
              "PLAN (JSON; gzipped if it ends in .gz; a local path or URL). Then every slice job runs\n"
              "`shard-tools build --plan PLAN --out URL --slice i/K` and reads only its share of the corpus.\n\n"
              f"datasets: {', '.join(DATASETS)}; `shard-tools plan <dataset> --help` lists its options.")
        return 0 if argv else 2
    name = argv[0]
    module, parser = _recipe_parser(name, "shard-tools plan")
    parser.add_argument("--out", required=True, metavar="PLAN", help="the plan file to write (e.g. s3://bucket/msd.plan.json.gz)")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from shard_tools.plan import write_plan

    recipe = _prepare(module, name, args, parser)
    try:
        with remote_errors("--out", args.out):
            s = write_plan(recipe, args.out, command=shlex.join(["shard-tools", "plan", *argv]),
                           recipe_options={k: v for k, v in vars(args).items() if k not in _COMMON})
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write the plan file ({exc.strerror or exc}); give a file path "
                        f"in a folder that exists and is writable") from exc
    print(f"shard-tools plan: {s['dataset']}: {s['items']} items ("
          + ", ".join(f"{k} {v}" for k, v in s["splits"].items()) + f"), {s['skipped']} files skipped by the recipe"
          f" -> {s['url']} ({s['bytes'] / 1e6:.1f} MB)\n"
          f"  next, one job per slice i = 0 .. K-1:  shard-tools build --plan {s['url']} --out URL --slice i/K\n"
          f"  then, once:                          shard-tools merge URL")
    return 0


def cmd_merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shard-tools merge",
                                     description="Join the partial manifests of `build --slice i/K` runs into one "
                                                 "<split>.manifest.json per split (checks that all K slices are there).")
    parser.add_argument("inputs", nargs="+", help="the shard folder, or partial manifest URLs (<split>.manifest.slice-i-of-K.json)")
    parser.add_argument("--out", default=None, help="folder for the merged manifests (default: that of the first input)")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take over the output folder's build lock even though its holder may still run")
    args = parser.parse_args(argv)
    from shard_tools.manifest import merge
    from shard_tools.report import format_summary

    try:
        with remote_errors("merge", args.out or args.inputs[0]):
            rep = merge(args.inputs, args.out, force_unlock=args.force_unlock)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    if rep.get("files_in") is not None:
        print(format_summary(rep))
    else:
        for split, s in rep["splits"].items():
            print(f"  {split:<12} {s['samples']:>8} samples {s['hours']:>9.3f} h {s['shards']:>5} shards")
    return 0


def cmd_verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shard-tools verify",
                                     description="Re-read every shard: check bytes and sha256 against the manifest, "
                                                 "decode every sample and check counts. Exit 1 on any mismatch.")
    parser.add_argument("url", help="a shard folder (all its manifests) or one <split>.manifest.json URL")
    parser.add_argument("--workers", type=_positive_int("--workers"), default=1, help="shards checked in parallel (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from shard_tools.verify import verify

    try:
        with remote_errors("verify", args.url):
            problems, stats = verify(args.url, workers=args.workers, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    if problems:
        print(f"shard-tools verify: {len(problems)} problem(s) in {args.url}:", file=sys.stderr)
        for p in problems[:50]:
            print(f"  {p}", file=sys.stderr)
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more", file=sys.stderr)
        return 1
    print(f"shard-tools verify: OK  {stats['manifests']} manifest(s), {stats['shards']} shards, "
          f"{stats['samples']} samples, {stats['seconds'] / 3600:.3f} h, every sample decoded")
    return 0


def cmd_info(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shard-tools info",
                                     description="Splits, sample counts, hours, shards and label vocabularies.")
    parser.add_argument("url", help="a shard folder or one <split>.manifest.json URL")
    args = parser.parse_args(argv)
    from shard_tools.manifest import info_text

    try:
        with remote_errors("info", args.url):
            print(info_text(args.url))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    return 0


def cmd_demo(argv: list[str]) -> int:
    from shard_tools import demo

    parser = argparse.ArgumentParser(prog="shard-tools demo", description=(demo.__doc__ or "").strip().split("\n\n")[0])
    demo.add_arguments(parser)
    args = parser.parse_args(argv)
    with stop_on_signals(), remote_errors("--out", args.out):
        return int(demo.run(args) or 0)


COMMANDS = {"build": cmd_build, "plan": cmd_plan, "merge": cmd_merge, "verify": cmd_verify, "info": cmd_info,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """``shard-tools`` entry point: every failure is one line (``--debug`` shows the traceback)."""
    from pipeline.errors import run_cli

    return run_cli(_main, argv, "shard-tools")


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nshard-tools: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
