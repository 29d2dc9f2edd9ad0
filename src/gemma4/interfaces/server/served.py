"""The model behind the server: loaded in the background (so /health can say "loading"), then
served by one scheduler, with as many parallel slots as the memory plan allows."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ...errors import Gemma4Error
from ...planner import serving_kv_bytes
from ...runtime.constrained import Grammars, InvalidGrammar
from ...runtime.engine import Model
from ...runtime.generate import MAX_MARKS
from ...runtime.scheduler import Job, QueueFull, Scheduler
from .protocol import APIError

DEFAULT_MAX_PARALLEL = 4  # beyond this a 2-core CPU gains little more throughput per step


class ServedModel:
    def __init__(self, name: str):
        self.name = name
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self.grammars: Grammars | None = None
        self.grammar_error: str | None = None  # why constrained output is unavailable, if it is
        self.plan: dict[str, Any] = {}
        self.modalities = {"vision": False, "audio": False}  # what requests may carry besides text

    def load(self, loader: Callable[[], Model], parallel: int | None, max_queue: int) -> None:
        """Load the model, size the slots from the memory plan, start the engine thread."""
        model = loader()
        parallel = parallel or self._parallel_that_fits(model)
        self.plan = self._kv_plan(model, parallel)
        if model.tokenizer is not None:
            try:
                self.grammars = Grammars(model.tokenizer, model.config.vocab_size, sorted(model.chat_stop_ids))
            except InvalidGrammar as e:
                self.grammar_error = str(e)
        self.scheduler = Scheduler(model.lm, model.context, parallel, model.prefill_chunk, max_queue)
        self.scheduler.start()
        self.modalities = {"vision": "image" in model.encoder_kinds, "audio": "audio" in model.encoder_kinds}
        self.model = model

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()

    @property
    def ready(self) -> Model:
        if self.model is None:
            raise APIError(503, "the model is still loading: try again shortly (GET /health says when it is ready)", "server_error", code="loading")
        return self.model

    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)  # type: ignore[union-attr]
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}", "server_error", code="queue_full") from None
        except Gemma4Error as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None

    def grammars_or_error(self) -> Grammars:
        if self.grammars is None:
            raise APIError(400, self.grammar_error or "this model has no tokenizer: constrained output needs one")
        return self.grammars

    # --- memory -------------------------------------------------------------------------
    @staticmethod
    def _kv_plan(model: Model, parallel: int) -> dict[str, Any]:
        """K/V bytes the slots may ever hold: each a full context, plus ring snapshots at its marks."""
        kv = serving_kv_bytes(model.lm.plan, model.context, parallel, model.kv_dtype, MAX_MARKS)
        return {"parallel": parallel, "context": model.context, "kv_bytes": sum(kv.values())}

    def _parallel_that_fits(self, model: Model) -> int:
        one = self._kv_plan(model, 1)["kv_bytes"]
        available = _available_memory()
        fits = int(available * 0.8 // one) if one else DEFAULT_MAX_PARALLEL
        if fits < 1:
            print(f"gemma4 serve: warning: one full {model.context}-token context needs {one / 1e9:.2f} GB of K/V but "
                  f"{available / 1e9:.2f} GB is free; serving one sequence (lower --context to be safe)", file=sys.stderr)
        return max(1, min(DEFAULT_MAX_PARALLEL, fits))


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); a generous guess where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
