"""Neptune: one Neptune run per deltakd run through the ``neptune`` client (imported when a run starts).

transformers 5 still ships a ``NeptuneCallback`` but deprecates it (and it reaches into the
client's internals); this is the small part deltakd needs: ``neptune.init_run`` with the
recipe's ``track_options.neptune`` (project, tags, name; the run's name defaults to
``<name>/<stamp>``), the flattened recipe under ``parameters``, every logged number under
``metrics/<key>`` by step, the final metrics under ``final/<key>``, the run's files under
``artifacts/<file name>``. The API token comes from ``NEPTUNE_API_TOKEN`` as the client reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from transformers import TrainerCallback

from .common import numbers


class NeptuneRun(TrainerCallback):
    def __init__(self, options: Any, run_name: str, params: dict[str, Any]) -> None:
        self.project = getattr(options, "project", None)
        self.tags = list(getattr(options, "tags", None) or [])
        self.name = getattr(options, "name", None) or run_name
        self.params = params
        self.run: Any = None

    def _start(self) -> None:
        import neptune

        kwargs: dict[str, Any] = {"name": self.name, "tags": self.tags}
        if self.project:  # else the client reads NEPTUNE_PROJECT
            kwargs["project"] = self.project
        self.run = neptune.init_run(**kwargs)
        self.run["parameters"] = self.params

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.run is None:
            self._start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.run is None:
            self._start()
        for k, v in numbers(logs).items():
            self.run[f"metrics/{k}"].append(v, step=state.global_step)

    def finish(self, final: dict[str, float], files: Iterable[Path]) -> None:
        if self.run is None:
            return
        for k, v in final.items():
            self.run[f"final/{k}"] = v
        for f in files:
            if Path(f).is_file():
                self.run[f"artifacts/{Path(f).name}"].upload(str(f))
        self.run.stop()
        self.run = None
