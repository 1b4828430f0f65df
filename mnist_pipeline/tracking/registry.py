"""The model registry: versions tied to a model file and its served code, and the champion alias."""

from __future__ import annotations

from pathlib import PurePosixPath

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mnist_pipeline.tracking import tag

# The registry alias `mlflow models serve -m models:/mnist-cnn@champion` serves; chosen by tag.VAL_ACC.
CHAMPION = "champion"


def ensure_registered_model(client: mlflow.MlflowClient, name: str) -> None:
    """Create the registered model `name` unless it exists: looked up first, since creating a name that exists
    fails in the database, which logs it as a constraint error (PostgreSQL on a team server)."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name)
        except MlflowException as race:  # another process created it since the lookup
            if race.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise


def find_model_version(name: str, model_sha256: str, code_sha256: str) -> ModelVersion | None:
    """The registered version of exactly this model file, served code and config, if an earlier result registered it."""
    versions = mlflow.MlflowClient().search_model_versions(
        filter_string=(f"name = '{name}' and tags.{tag.MODEL_SHA256} = '{model_sha256}' "
                       f"and tags.{tag.SERVED_CODE_SHA256} = '{code_sha256}'"),
    )
    return min((v for v in versions if tag.FILES_LOST not in v.tags), key=lambda v: int(v.version), default=None)


def files_present(name: str, version: str) -> bool:
    """Whether a registered version's files are in the artifact store: a deleted mlartifacts/ leaves the registry
    pointing at nothing, and `models:/...` fails to load."""
    uri = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    return any(PurePosixPath(a.path).name == "MLmodel" for a in mlflow.artifacts.list_artifacts(artifact_uri=uri))


def retire_lost_version(name: str, version: str, replacement: str) -> None:
    """Mark a version whose files are gone, and take it out of the champion's choice: never served again."""
    client = mlflow.MlflowClient()
    note = f"its files are gone from the artifact store; version {replacement} holds the same model"
    client.set_model_version_tag(name, version, tag.FILES_LOST, note)
    client.delete_model_version_tag(name, version, tag.VAL_ACC)


def version_tags(run_tags: dict[str, str]) -> dict[str, str]:
    """The tags that tie a registered model version to its model file, DVC experiment and git commit."""
    keys = (tag.MODEL_SHA256, tag.SERVED_CODE_SHA256, tag.DVC_EXP_NAME, tag.DVC_EXP_BASELINE, tag.GIT_COMMIT)
    return {key.removeprefix("mlflow.source."): run_tags[key] for key in keys if key in run_tags}


def crown_champion(name: str, passes: int = 10) -> ModelVersion | None:
    """Point the alias `champion` at the version with the best validation accuracy (never test accuracy).

    Among equals the latest version wins: the same weights logged again with newer serving code (served_package's
    SERVED_CODE) replace the older. Safe for machines recording at once, on one store or a shared server,
    without a lock: after moving the alias, read every version again and move it again if a better one has
    appeared. Each recorder crowns after registering its version, so the last to move the alias has read
    every version registered before that move, and no stale champion stays. Returns the version the alias
    last moved to, or None when it stayed.
    """
    client = mlflow.MlflowClient()
    moved = None
    for _ in range(passes):
        versions = client.search_model_versions(filter_string=f"name = '{name}'")
        scored = sorted((v for v in versions if tag.VAL_ACC in v.tags),
                        key=lambda v: (float(v.tags[tag.VAL_ACC]), int(v.version)), reverse=True)
        # The best whose files are still there: a deleted artifact folder leaves versions that cannot load.
        best = next((v for v in scored if files_present(name, v.version)), None)
        # The registered model's aliases: search_model_versions leaves each version's own list empty.
        current = client.get_registered_model(name).aliases.get(CHAMPION)
        if best is None or (current is not None and str(current) == str(best.version)):
            return moved
        client.set_registered_model_alias(name, CHAMPION, best.version)
        moved = best
    return moved
