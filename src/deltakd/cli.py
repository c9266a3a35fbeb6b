"""The ``deltakd`` command line: parse, call :mod:`deltakd.api`, print."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from . import console as run_console
from .errors import DeltakdError
from .report.tables import print_results

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="deltakd: parameter-efficient fine-tuning, distillation and transfer from YAML recipes.")
console = Console()
err_console = Console(stderr=True)


def _api():
    """:mod:`deltakd.api`, imported when a command runs: it pulls in torch and transformers, and
    ``deltakd --help`` (or a bad option) should answer at once."""
    from . import api  # lazy: see the docstring

    return api


def _validation():
    """:mod:`deltakd.validation`: a recipe checked (kind, schema, files) before the api's heavy imports."""
    from . import validation  # lazy: pydantic models; `deltakd --help` does without them

    return validation


def _dry_run(recipes) -> None:
    """``--dry-run``: the resolved recipe(s) as YAML on stdout, nothing trained or written."""
    sys.stdout.write(_validation().resolved_yaml(recipes))


def _end_lines(run_dir: str | Path) -> None:
    """Where a run's files went (unwrapped: a path is never broken across lines), and how to view its curves."""
    run = Path(run_dir)
    kept = [name for name in ("model/", "results.json", "metrics.jsonl", "recipe.yaml")
            if (run / name.rstrip("/")).exists()]
    console.print(f"run folder: {run}" + (f"  ({', '.join(kept)})" if kept else ""),
                  markup=False, highlight=False, soft_wrap=True)
    if (run / "tensorboard").is_dir():
        console.print(f"curves: tensorboard --logdir {run / 'tensorboard'}", markup=False, highlight=False,
                      soft_wrap=True)


def _table(title: str) -> Table:
    """A table titled in plain text (``[test]`` is not markup) and at least as wide as its title: a
    title longer than its columns would be wrapped, breaking a name or path across lines."""
    return Table(title=Text(title), min_width=len(title) + 2)


def _version(value: bool) -> None:
    if value:
        console.print(f"deltakd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the libraries' own output too (load "
                                       "reports, warnings, every progress bar, raw Trainer logs).")) -> None:
    """Run experiments from YAML recipes."""
    run_console.configure(verbose)


@app.command()
def train(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
          overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.lr=3e-5"),
          resume: bool = typer.Option(False, "--resume", help="Continue the newest unfinished run of this recipe."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe (YAML) and exit.")):
    """Train a recipe; results go to runs/<name>/<timestamp>/."""
    checked = _validation().check_run(recipe, overrides or [])  # a bad recipe: one line, before torch loads
    if dry_run:
        return _dry_run(checked)
    api = _api()

    results = api.train(recipe, overrides or [], resume=resume)
    if results:
        print_results(results, console)
        _end_lines(results["run_dir"])


@app.command()
def pipeline(recipes: List[Path] = typer.Argument(..., help="Multistage stage recipes, in order."),
             sets: Optional[List[str]] = typer.Option(None, "--set", help="Dotted override for every stage, "
                                                      "e.g. --set train.epochs=2 (repeatable)."),
             init_from: Optional[str] = typer.Option(None, "--init-from", help="Checkpoint to start from: a run or "
                                                     "model folder (or stage name) the first stage starts from."),
             test: bool = typer.Option(True, "--test/--no-test", help="Evaluate each stage after training."),
             log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Where runs go (every recipe's "
                                                    "output_dir); init_from stage names resolve there too."),
             force: bool = typer.Option(False, "--force", help="Train every stage again, finished or not."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved stage recipes (YAML) and exit.")):
    """Run multistage stages in order (init_from chains them); finished stages are skipped on a rerun."""
    checked = _validation().check_pipeline(recipes, sets or [], init_from=init_from, output_dir=log_dir)
    if dry_run:
        return _dry_run(checked)
    api = _api()

    outcomes = api.pipeline(recipes, sets or [], init_from=init_from, test=test, log_dir=log_dir, force=force)
    table = _table("multistage pipeline")
    for col in ("stage", "status", "params", "sts spearman x100", "translation acc", "sent/s", "run"):
        table.add_column(col, justify="left" if col in ("stage", "status", "run") else "right")
    for o in outcomes:
        r = o.results
        test_m, held = r.get("metrics", {}).get("test", {}), r.get("metrics", {}).get("heldout", {})
        sts = test_m.get("avg/sts_spearman", next((v for k, v in test_m.items() if k.startswith("sts/")), None))
        acc = held.get("avg/acc", next((v for k, v in held.items() if k.endswith("/acc")), None))
        table.add_row(o.name, o.status, f"{r.get('params', {}).get('total', 0):,}",
                      "" if sts is None else f"{100 * sts:.2f}", "" if acc is None else f"{acc:.3f}",
                      f"{r['speed_sent_per_s']:.1f}" if "speed_sent_per_s" in r else "", str(o.run_dir))
    console.print(table)


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="A finished run directory."),
          split: str = typer.Option("test", "--split", help="valid or test (or train)."),
          batch_size: Optional[int] = typer.Option(None, "--batch-size")):
    """Evaluate a run's saved model on a split of its task."""
    api = _api()

    metrics = api.evaluate(run_dir, split, batch_size)
    console.print(f"run folder: {run_dir}", markup=False, highlight=False, soft_wrap=True)
    table = _table(f"{Path(run_dir).parent.name}/{Path(run_dir).name} [{split}]")
    for k in metrics:
        table.add_column(k, justify="right")
    table.add_row(*[f"{v:.4f}" for v in metrics.values()])
    console.print(table)


@app.command()
def generate(run_dir: Path = typer.Argument(..., help="A finished causal-LM run directory."),
             prompt: str = typer.Option("", "--prompt", help="Text to continue."),
             max_new_tokens: int = typer.Option(50, "--max-new-tokens", min=1),
             greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding instead of sampling."),
             temperature: float = typer.Option(1.0, "--temperature", min=1e-4),
             top_k: int = typer.Option(50, "--top-k", min=0),
             top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
             num: int = typer.Option(1, "--num", min=1, help="How many continuations."),
             seed: int = typer.Option(0, "--seed")):
    """Generate text with a causal-LM run."""
    api = _api()

    outs = api.generate(run_dir, prompt, max_new_tokens, greedy, temperature, top_k or None, top_p, seed, num)
    for i, text in enumerate(outs):
        console.print(f"[bold]{i + 1}.[/bold] {prompt}[cyan]{text}[/cyan]", highlight=False)


@app.command("dialogue-eval")
def dialogue_eval(run_dir: Path = typer.Argument(..., help="A finished DailyDialog causal-LM run (dialogue or lm)."),
                  classifier: Path = typer.Option(..., "--classifier", help="A finished act-classifier run."),
                  split: str = typer.Option("test", "--split", help="valid or test (or train)."),
                  max_contexts: Optional[int] = typer.Option(None, "--max-contexts", min=1,
                                                             help="A seeded sample of this many contexts."),
                  acts: str = typer.Option("reference", "--acts", help="reference: ask for the reference's act; "
                                           "all: ask for each of the four acts."),
                  greedy: bool = typer.Option(True, "--greedy/--sample", help="Greedy decoding or sampling."),
                  max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
                  temperature: float = typer.Option(1.0, "--temperature", min=1e-4),
                  top_k: int = typer.Option(50, "--top-k", min=0),
                  top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
                  seed: int = typer.Option(0, "--seed"),
                  batch_size: int = typer.Option(32, "--batch-size", min=1),
                  sensitivity: int = typer.Option(100, "--sensitivity-contexts", min=0,
                                                  help="Contexts scored for act sensitivity (NLL of the reference "
                                                       "under each act); 0 skips it."),
                  template_from: Optional[Path] = typer.Option(
                      None, "--template-from", help="Ask in this dialogue run's example format (act position, act "
                                                    "tokens, contexts), e.g. an untuned LM as the tuned runs are.")):
    """Generate a response per context for a requested act, classify it, report control accuracy and BLEU."""
    api = _api()

    res = api.dialogue_eval(run_dir, classifier, split, max_contexts, acts, greedy, max_new_tokens, temperature,
                            top_k or None, top_p, seed, batch_size, sensitivity, template_from=template_from)
    m = res["metrics"]
    table = _table(f"{res['name']} [{split}, {res['generations']} generations]")
    keys = ["control_accuracy", "bleu", "distinct_1", "distinct_2", "empty_rate", "classifier_accuracy_on_references"]
    for k in ("control acc", "BLEU", "distinct-1", "distinct-2", "empty", "ceiling (refs)"):
        table.add_column(k, justify="right")
    table.add_row(*[f"{m[k]:.4f}" for k in keys])
    console.print(table)
    if "act_nll_gap" in m:
        signal = res.get("control", "act")  # act or emotion
        console.print(f"{signal} sensitivity: reference NLL {m['act_nll_gap']:+.4f} nats/token lower under its own "
                      f"{signal} than under the others; own {signal} lowest for {m['act_recovered']:.1%}",
                      highlight=False)
    console.print(f"wrote {res['run_dir']}/dialogue_eval_{split}.json", markup=False, highlight=False)


@app.command()
def recipes(root: Path = typer.Argument(Path("recipes"), help="Folder of recipes.")):
    """List recipes with a one-line description each."""
    api = _api()

    table = Table(show_header=True)
    table.add_column("recipe")
    table.add_column("description")
    for path, desc in api.list_recipes(root):
        table.add_row(path, desc)
    console.print(table)


@app.command()
def sweep(recipe: Path = typer.Argument(..., help="Recipe YAML file with a sweep: grid."),
          overrides: Optional[List[str]] = typer.Argument(
              None, help="Dotted overrides, e.g. train.epochs=2; sweep.train.lr=[1e-5,2e-5] sets a grid key."),
          backend: str = typer.Option("local", "--backend", help="local (in-process, one trial after another) or ray."),
          ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (ray only)."),
          cpus_per_trial: float = typer.Option(1.0, "--cpus-per-trial", min=0, help="Ray resources per trial."),
          gpus_per_trial: float = typer.Option(0.0, "--gpus-per-trial", min=0, help="Ray resources per trial."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe with its grid (YAML) "
                                       "and exit.")):
    """Run the recipe's sweep: grid, one run per setting; rerun to resume. Output: runs/<name>-sweep/."""
    checked = _validation().check_sweep(recipe, overrides or [])
    if dry_run:
        return _dry_run(checked)
    api = _api()
    from .report.sweep_stats import best_lines, summary_table  # lazy: plotting stack, as _api

    result = api.sweep(recipe, overrides or [], backend=backend, ray_address=ray_address,
                       cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    headers, rows = summary_table(result.summary)
    table = _table(f"sweep {result.summary.name}: mean ± std over seeds")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < len(result.summary.keys) else "right")
    for row in rows:
        table.add_row(*[Text(c.replace("**", "")) for c in row])  # values like [query, value] are not markup
    console.print(table)
    for line in best_lines(result.summary):
        console.print(line, markup=False, highlight=False)
    skipped = sum(t.status == "skipped" for t in result.trials)
    console.print(f"{len(result.trials) - skipped} trial(s) run, {skipped} finished before; "
                  f"summary: {result.files.get('markdown', result.sweep_dir)}", markup=False, highlight=False)


@app.command()
def report(paths: List[Path] = typer.Argument(..., help="Run dirs, run-name folders (runs/<name>) or sweep dirs."),
           out: Path = typer.Option(Path("report"), "--out", help="Folder for report.md, report.html and PNGs.")):
    """Compare runs and sweeps in one markdown and one self-contained HTML page."""
    api = _api()

    files = api.report(paths, out)
    console.print(f"wrote {files['markdown']} and {files['html']}", markup=False, highlight=False)


@app.command()
def transfer(recipe: Path = typer.Argument(..., help="Transfer recipe YAML file (top-level transfer: section)."),
             overrides: Optional[List[str]] = typer.Argument(
                 None, help="Dotted overrides, e.g. transfer.target.seeds=[1] transfer.estimate.temperature=0.5"),
             dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe (YAML) and exit.")):
    """Train source modules (reused when finished), estimate similarities, fuse, tune k-shot targets; rerun to resume."""
    checked = _validation().check_transfer(recipe, overrides or [])
    if dry_run:
        return _dry_run(checked)
    api = _api()
    from .transfer.report import results_rows  # lazy: as _api

    result = api.transfer(recipe, overrides or [])
    headers, rows, _ = results_rows(result, list(dict.fromkeys(r.target for r in result.runs)))
    table = _table(f"transfer {result.out_dir.name}: target metric x100, mean ± std over seeds")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[Text(c.replace("**", "")) for c in row])
    console.print(table)
    ran = sum(r.status == "ran" for r in result.runs)
    console.print(f"{ran} target run(s) trained, {len(result.runs) - ran} reused; results: {result.files['markdown']}, "
                  f"weights heatmap: {result.files['heatmap']}", markup=False, highlight=False)


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="A finished classification / regression run (or its model/)."),
            texts: List[str] = typer.Argument(..., help="Texts to classify."),
            batch_size: int = typer.Option(32, "--batch-size", min=1)):
    """Classify texts with a run's model: the label by name and its probability."""
    api = _api()

    preds = api.predict(run_dir, texts, batch_size)
    table = Table(title=str(run_dir))
    regression = bool(preds) and "label" not in preds[0]
    for col in ("text", *(() if regression else ("label",)), "score"):
        table.add_column(col, justify="right" if col == "score" else "left")
    for text, p in zip(texts, preds):
        table.add_row(Text(text), *(() if regression else (Text(p["label"]),)), f"{p['score']:.4f}")
    console.print(table)


@app.command()
def push(run_dir: Path = typer.Argument(..., help="A finished run directory."),
         repo: str = typer.Option(..., "--repo", help="Hub model repository, owner/name (created if missing)."),
         private: bool = typer.Option(False, "--private", help="Create the repository private.")):
    """Upload a run's model/ with its model card to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""
    api = _api()

    pushed = api.push(run_dir, repo, private=private)
    console.print(f"pushed {len(pushed.files)} files of {pushed.folder} to {pushed.url}", markup=False,
                  highlight=False)


def main() -> None:
    """Console entry point: user errors print one line and exit 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except DeltakdError as e:
        err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")  # after --verbose
        hint = ("rerun the same deltakd sweep command: finished trials are skipped, the interrupted one resumes"
                if command == "sweep" else
                "rerun the same deltakd transfer command: finished modules and target runs are reused"
                if command == "transfer" else "resume with: deltakd train RECIPE --resume")
        err_console.print(f"interrupted; {hint}", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
