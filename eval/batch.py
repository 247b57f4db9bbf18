"""``python -m eval batch``: many checkpoints x protocols -> one results file and table, resumable.

::

    python -m eval batch --checkpoints runs/ released/*.pth extra.txt --protocols knn,linear \\
        --results results.jsonl --train DATA --test DATA [protocol options ...] \\
        [--table-md results.md] [--table-csv results.csv] [--dry-run]

**Checkpoints.** Each ``--checkpoints`` argument (several may be given, in order) is

* a text file (``.txt``/``.lst``): one path per line, blank lines and ``#`` comments skipped,
  each line taken as given (relative to the current directory, as ``slurm/submit.py --each``);
* a glob pattern (``runs/*/export``): every match, sorted, each one checkpoint;
* a directory that ``--backbone`` accepts itself (an export, a training run, a
  ``checkpoints/step-N`` directory): that one checkpoint;
* any other directory: each immediate child, sorted by name, that ``--backbone`` accepts:
  export / run / step directories, and files named ``*.pth``, ``*.pt``, ``*.pth.tar``,
  ``*.safetensors``; other children are skipped (logged);
* a checkpoint file.

Checkpoints naming the same weights location twice are evaluated once. An empty expansion is an
error (exit status 2).

**Protocol options.** Every option after the batch's own is passed to each protocol that knows
it (``--epochs`` only to ``linear``, ``--k`` only to ``knn``); an option no chosen protocol knows
is an error. ``--PROTOCOL.OPTION`` goes to that protocol alone, as ``--OPTION``: detection's
COCO data beside the classification data, e.g. ``--protocols knn,detect --train CIFAR/train
--test CIFAR/test --detect.train raccoon/train.json --detect.test raccoon/val.json``. Each pair runs in-process as ``python -m eval PROTOCOL --backbone CKPT --results
RESULTS [--arch NAME] OPTIONS`` would (:func:`eval.__main__.main`), so options mean the same.

**Resuming.** A pair is skipped when the results file already holds a record (``init``
"trained") with the checkpoint's weights sha256, the protocol's record name (``knn-k20-t0.07``
and ``knn-k200-t0.1`` for ``knn``: every record it writes) and the test dataset's name: a killed
batch, run again, evaluates only what is missing. Other settings (``--max-train``, probe hyper-parameters) are not compared: use another
results file for another setting.

**Table.** At the end (also when everything was skipped) the records of the results file that
belong to this batch (same sha256, protocol and dataset; the newest per checkpoint, protocol,
dataset and init) are printed as a markdown table and written to ``--table-md`` / ``--table-csv``
(default: the results file with ``.md`` / ``.csv`` suffixes).

Under Slurm, ``python slurm/submit.py ... -- eval batch ...`` submits one array task per missing
pair (:func:`missing_commands`); rerun ``eval batch`` afterwards to render the table.
"""

from __future__ import annotations

import argparse
import glob
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.errors import EvalInputError
from eval.knn import pair_settings
from eval.knn import protocol_name as knn_protocol_name
from eval.load import checkpoint_path, resolve_source, weights_sha256
from eval.results import dataset_name, read_results
from eval.tables import batch_records, write_tables

log = logging.getLogger("eval.batch")

LIST_SUFFIXES = (".txt", ".lst")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".safetensors")
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Pair:
    """One evaluation of the batch: ``argv`` is that of ``python -m eval``."""

    checkpoint: str
    protocol: str  # the subcommand: knn, linear, ...
    record_protocols: tuple[str, ...]  # its records' "protocol": knn-k20-t0.07, linear, ...
    sha256: str
    dataset: str
    argv: list[str]
    done: bool

    @property
    def keys(self) -> list[tuple[str, str, str]]:
        """``(sha256, protocol, dataset)`` of each record the pair writes."""
        return [(self.sha256, name, self.dataset) for name in self.record_protocols]


def build_parser() -> argparse.ArgumentParser:
    """The batch's own options; everything else goes to the protocols."""
    p = argparse.ArgumentParser(
        prog="python -m eval batch",
        allow_abbrev=False,
        description="Evaluate many checkpoints with several protocols into one results file; "
        "pairs already in the results file are skipped, then the table is rendered. Options not "
        "listed here go to every protocol that knows them (python -m eval PROTOCOL --help).",
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    # fmt: off
    add("--checkpoints", nargs="+", required=True, metavar="SRC",
        help="directories (their checkpoint children, or themselves when --backbone accepts "
        "them), glob patterns, list files (.txt/.lst, one path per line) or checkpoint paths")
    add("--protocols", required=True, metavar="LIST",
        help="comma-separated eval subcommands, e.g. knn,linear")
    add("--results", default="results.jsonl", metavar="PATH",
        help="JSON-lines results file, read to skip done pairs and appended to (default: "
        "results.jsonl)")
    add("--arch", default=None, metavar="NAME",
        help="architecture for checkpoint files that do not name it (see --backbone --help)")
    add("--table-md", default=None, metavar="PATH",
        help="markdown table of this batch's results (default: RESULTS with suffix .md)")
    add("--table-csv", default=None, metavar="PATH",
        help="CSV of this batch's results (default: RESULTS with suffix .csv)")
    add("--dry-run", action="store_true",
        help="list the (checkpoint, protocol) pairs and which are done; evaluate nothing")
    # fmt: on
    return p


# --- checkpoints -----------------------------------------------------------------------------


def _accepted(path: Path) -> bool:
    """Whether ``--backbone path`` names a checkpoint (a directory child of a batch source)."""
    if path.is_file() and not path.name.endswith(CHECKPOINT_SUFFIXES):
        return False
    try:
        resolve_source(path)
    except EvalInputError as exc:
        log.info("skipping %s: %s", path, exc)
        return False
    return True


def expand_checkpoints(sources: Sequence[str]) -> list[str]:
    """The checkpoints the ``--checkpoints`` arguments name (see the module docstring), in
    order, each weights location once; :class:`EvalInputError` for a missing path or when
    nothing is found."""
    found: list[str] = []
    for src in sources:
        p = Path(src)
        if p.is_file() and p.name.endswith(LIST_SUFFIXES):
            lines = (ln.strip() for ln in p.read_text().splitlines())
            found += [ln for ln in lines if ln and not ln.startswith("#")]
        elif not p.exists() and any(c in src for c in GLOB_CHARS):
            matches = sorted(glob.glob(src))
            if not matches:
                log.warning("%s matches nothing", src)
            found += matches
        elif p.is_dir() and not _accepted(p):
            found += [str(c) for c in sorted(p.iterdir()) if _accepted(c)]
        elif p.exists():
            found.append(src)
        else:
            raise EvalInputError(f"--checkpoints {src}: no such file, directory or glob match")
    unique: dict[Path, str] = {}
    for path in found:
        unique.setdefault(checkpoint_path(path), path)  # raises for what is no checkpoint
    if not unique:
        raise EvalInputError(f"--checkpoints {' '.join(sources)}: no checkpoints found")
    return list(unique.values())


# --- protocol options ------------------------------------------------------------------------


def _protocol_parsers() -> dict[str, argparse.ArgumentParser]:
    from eval.__main__ import build_parser as eval_parser

    sub = next(a for a in eval_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if name != "batch"}


def _option_groups(extra: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["--k", "5", "--mean", "0", "0", "0", "--no-cache"]`` -> ``[("--k", [...]), ...]``:
    each option with the values that follow it."""
    groups: list[tuple[str, list[str]]] = []
    for token in extra:
        if token.startswith("--"):
            groups.append((token.split("=", 1)[0], [token]))
        elif groups:
            groups[-1][1].append(token)
        else:
            raise EvalInputError(f"unexpected argument {token!r} before any protocol option")
    return groups


def protocol_argvs(protocols: Sequence[str], extra: Sequence[str]) -> dict[str, list[str]]:
    """Per protocol, the options of ``extra`` its subcommand knows (``--PROTOCOL.OPTION`` only
    for that protocol, as ``--OPTION``); :class:`EvalInputError` for an unknown protocol,
    ``--backbone``, or an option none of its protocols knows."""
    parsers = _protocol_parsers()
    unknown = [p for p in protocols if p not in parsers]
    if unknown or not protocols:
        raise EvalInputError(
            f"--protocols: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(parsers)}"
        )
    scoped, shared = _split_scoped(_option_groups(extra), protocols)
    argvs: dict[str, list[str]] = {p: [] for p in protocols}
    scoped_options = {(scope, option) for scope, option, _ in scoped}  # these win for scope
    for scope, option, tokens in scoped + shared:
        if option == "--backbone":
            raise EvalInputError("eval batch takes --checkpoints, not --backbone")
        chosen = [scope] if scope else protocols
        takers = [p for p in chosen if option in parsers[p]._option_string_actions]
        if not takers:
            raise EvalInputError(f"{option}: not an option of {', '.join(chosen)}")
        for p in takers:
            if scope or (p, option) not in scoped_options:
                argvs[p] += tokens
    return argvs


def _split_scoped(
    groups: list[tuple[str, list[str]]], protocols: Sequence[str]
) -> tuple[list[tuple[str, str, list[str]]], list[tuple[str, str, list[str]]]]:
    """``(scope, option, tokens)`` of the ``--PROTOCOL.OPTION`` groups, rewritten as
    ``--OPTION``, and of the others (scope ``""``)."""
    scoped, shared = [], []
    for option, tokens in groups:
        scope, dot, bare = option[2:].partition(".")
        if not dot:
            shared.append(("", option, tokens))
            continue
        if scope not in protocols:
            raise EvalInputError(f"{option}: {scope} is not in --protocols")
        rest = tokens[0][len(option) :]  # "" or "=VALUE"
        scoped.append((scope, f"--{bare}", [f"--{bare}{rest}", *tokens[1:]]))
    return scoped, shared


def _parse(protocol: str, argv: list[str]) -> argparse.Namespace:
    """The subcommand's namespace for ``argv`` (errors as :class:`EvalInputError`)."""
    parser = _protocol_parsers()[protocol]
    parser.exit_on_error = False
    try:
        ns, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise EvalInputError(f"eval {protocol}: {exc}") from None
    except SystemExit:  # argparse printed the problem (e.g. a missing --train) above
        raise EvalInputError(f"eval {protocol}: invalid or missing options") from None
    if rest:
        raise EvalInputError(f"eval {protocol}: unrecognised {' '.join(rest)}")
    return ns


def record_protocols(protocol: str, ns: argparse.Namespace) -> tuple[str, ...]:
    """The ``protocol`` fields of the records the subcommand writes (``knn`` -> ``knn-k20-t0.07``,
    ``knn-k200-t0.1``)."""
    if protocol == "knn":
        settings = pair_settings(ns.k, ns.temperature)
        return tuple(knn_protocol_name(k, t) for k, t in settings)
    if protocol == "semisup":
        from eval.semisup import semisup_protocol_name

        return (semisup_protocol_name(ns.fraction, ns.mode),)
    return (protocol,)


# --- planning --------------------------------------------------------------------------------


def done_keys(results: str | Path) -> set[tuple[str, str, str]]:
    """``(sha256, protocol, dataset)`` of every trained-weights record in ``results``."""
    if not Path(results).is_file():
        return set()
    return {
        (r["sha256"], r["protocol"], r["dataset"])
        for r in read_results(results)
        if r.get("config", {}).get("init", "trained") == "trained"
    }


def plan(args: argparse.Namespace, extra: Sequence[str]) -> list[Pair]:
    """Every (checkpoint, protocol) pair of the batch, checkpoint-major, with its argv."""
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    options = protocol_argvs(protocols, extra)
    checkpoints = expand_checkpoints(args.checkpoints)
    done = done_keys(args.results)
    shared = ["--results", str(args.results)] + (["--arch", args.arch] if args.arch else [])
    pairs = []
    for ckpt in checkpoints:
        sha = weights_sha256(ckpt)
        for protocol in protocols:
            argv = [protocol, "--backbone", ckpt, *shared, *options[protocol]]
            ns = _parse(protocol, argv[1:])  # all option errors before any work
            names, dataset = record_protocols(protocol, ns), dataset_name(ns.test)
            done_now = all((sha, name, dataset) in done for name in names)
            pairs.append(Pair(ckpt, protocol, names, sha, dataset, argv, done_now))
    return pairs


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The batch's namespace and the protocol options (everything it does not know)."""
    return build_parser().parse_known_args(list(argv))


def missing_commands(argv: Sequence[str]) -> list[list[str]]:
    """``eval batch`` arguments -> one ``["eval", PROTOCOL, ...]`` per pair not yet in the
    results file (what ``slurm/submit.py`` turns into a job array)."""
    args, extra = parse_args(argv)
    return [["eval", *p.argv] for p in plan(args, extra) if not p.done]


# --- running ---------------------------------------------------------------------------------


def run_pair(argv: list[str]) -> int:
    """Evaluate one pair in-process, exactly as ``python -m eval ARGV``."""
    from eval.__main__ import main as eval_main

    return eval_main(argv)


def run(args: argparse.Namespace, extra: Sequence[str]) -> int:
    pairs = plan(args, extra)
    todo = [p for p in pairs if not p.done]
    log.info(
        "%d checkpoints x %d protocols: %d pairs, %d already in %s",
        len({p.checkpoint for p in pairs}),
        len({p.protocol for p in pairs}),
        len(pairs),
        len(pairs) - len(todo),
        args.results,
    )
    if args.dry_run:
        for p in pairs:
            state = "skip (done)" if p.done else "run"
            print(f"{state:11s} {p.checkpoint} {p.protocol}: python -m eval {shlex.join(p.argv)}")
        return 0
    failed = []
    for i, p in enumerate(pairs, 1):
        if p.done:
            log.info("[%d/%d] skip %s %s: already in %s", i, len(pairs), p.checkpoint,
                     ",".join(p.record_protocols), args.results)  # fmt: skip
            continue
        log.info("[%d/%d] %s %s", i, len(pairs), p.checkpoint, p.protocol)
        if run_pair(p.argv) != 0:
            log.error("eval %s failed for %s (status != 0); continuing", p.protocol, p.checkpoint)
            failed.append(p)
    results = Path(args.results)
    md = Path(args.table_md) if args.table_md else results.with_suffix(".md")
    csv_path = Path(args.table_csv) if args.table_csv else results.with_suffix(".csv")
    from eval.runner import is_main

    if is_main():
        print(write_tables(batch_records(results, pairs), md, csv_path))
        log.info("tables: %s, %s", md, csv_path)
    if failed:
        print(f"error: {len(failed)} of {len(todo)} evaluations failed", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m eval batch ...``; exit status 2 for input errors, 1 if a pair failed."""
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run(args, extra)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
