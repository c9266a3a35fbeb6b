"""Push a finished run's ``model/`` (with its card) to a Hugging Face Hub model repository, through
``huggingface_hub`` (``create_repo`` + ``upload_folder``; the token from ``HF_TOKEN`` or ``hf auth login``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..errors import DeltakdError
from ..runs import RunDir
from .card import write_card


@dataclass
class Pushed:
    repo_id: str
    url: str
    folder: Path
    files: list[str]  # relative paths uploaded


def finished_run(path: str | Path, what: str = "push") -> RunDir:
    """The run at ``path``: a deltakd run directory that finished (results.json) with a model/."""
    run = RunDir(Path(path))
    if not run.recipe_file.is_file():
        raise DeltakdError(f"{what}: '{path}' is not a deltakd run directory (no recipe.yaml)")
    if not run.finished:
        raise DeltakdError(f"{what}: run '{path}' has not finished (no results.json); "
                           "finish it with deltakd train RECIPE --resume first")
    if not run.model_dir.is_dir():
        raise DeltakdError(f"{what}: run '{path}' has no model/")
    return run


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
             api: HfApi | None = None) -> Pushed:
    """Render the run's card for ``repo_id``, create the repository (kept if it exists) and upload ``model/``."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise DeltakdError(f"push: repository id '{repo_id}': {str(e).splitlines()[0]}") from None
    run = finished_run(run_dir)
    results = run.read_results()
    if results.get("diverged"):
        raise DeltakdError(f"push: run '{run_dir}' diverged ({results['diverged'].get('message', '')}); not pushed")
    write_card(run, results, repo_id)
    files = sorted(str(p.relative_to(run.model_dir)) for p in run.model_dir.rglob("*") if p.is_file())
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=run.model_dir, repo_type="model",
                          commit_message=f"deltakd: {results.name} ({run.path.name})")
    except Exception as e:  # network, auth, offline mode: the user needs the message, not a trace
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeltakdError(f"push to '{repo_id}' failed: {msg}") from None
    return Pushed(repo_id, str(url), run.model_dir, files)
