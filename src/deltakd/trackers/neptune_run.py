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

from .common import StreamCallback


class NeptuneRun(StreamCallback):
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

    @property
    def started(self) -> bool:
        return self.run is not None

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.run[f"metrics/{k}"].append(v, step=step)

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

    def abort(self, interrupted: bool) -> None:
        if self.run is not None:
            self.run["sys/failed"] = not interrupted
            self.run.stop()
            self.run = None
