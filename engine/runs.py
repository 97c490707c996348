"""Run creation in the library, not the CLI: the judging embedder, the
method it implies, and a run's store opened or created under the content
contract. The CLI, `make bench` and tests use these."""

from __future__ import annotations

from pathlib import Path

from treesynth.engine.config import TaskConfig, diff_keys
from treesynth.store import Run, Store


def load_embedder():
    """The independent sentence embedder that judges samples and criteria."""
    from treesynth.models.minilm import load_minilm

    return load_minilm()


def method_of(embedder) -> dict:
    from treesynth.engine.contract import method

    return method(embedder.fingerprint)


def open_run_store(path: Path, config: TaskConfig, fingerprint: dict, method: dict) -> tuple[Store, bool]:
    """Continue an existing store with the same content config, model and
    method, or create one. Either way the store comes back locked for this process."""
    from treesynth.engine.contract import changed_parts, method_hash

    wanted = {"config": config.model_dump(mode="json"), "model": fingerprint}
    if path.exists():

        def refuse(run: Run) -> str | None:
            if run.method is None or run.method_hash != method_hash(method):
                version = run.treesynth_version or "an earlier version"
                return (
                    f"{path} was made by treesynth {version} with a different method "
                    f"(changed: {', '.join(changed_parts(run.method, method)[:6])}); continuing would mix two methods in "
                    f"one dataset. Finish it with treesynth {version}, or start a new --store"
                )
            differing = diff_keys(run.config, wanted["config"]) + [
                f"model.{k}" for k in diff_keys(run.model, wanted["model"])
            ]
            if not differing:
                return None
            return (
                f"{path} was made with different settings ({', '.join(differing)}); "
                "use the same settings to continue, a new --store, or --restart to start over"
            )

        return Store.open_writer(path, refuse=refuse), True
    import datetime

    from treesynth import __version__

    db = Store.create(
        path,
        Run(
            config=wanted["config"],
            config_hash=config.content_hash(),
            model=fingerprint,
            seed=config.seed,
            treesynth_version=__version__,
            method=method,
            method_hash=method_hash(method),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ),
    )
    return db, False
