"""Every MLflow tag name this project writes or reads, in one place (runs, registered versions, logged models).

The SQL of the quick paths (tracking/recorded.py, tracking/store.py) takes its tag names from here too; import
it as `from mnist_pipeline.tracking import tag` and write `tag.RESULT_KEY`.
"""

from __future__ import annotations

# What a result is: its key (tracking/result.py), every DVC name it was recorded under, who recorded it.
RESULT_KEY = "result_key"
# A line each: "<baseline commit> <experiment>" or "<commit> workspace". One run per result: an experiment that
# reproduces another's bytes adds its name here.
NAMES = "dvc.names"
# The tracking server login, else the computer's user (MLflow's own mlflow.user is always the computer's, and runs
# made by MlflowClient, as the live run is, have none): tools.gone_runs picks runs by it.
ACCOUNT = "account"
MLFLOW_USER = "mlflow.user"

# Where it came from, in git and DVC.
GIT_COMMIT = "mlflow.source.git.commit"
GIT_DIRTY = "git.dirty"
DVC_EXP_NAME = "dvc.exp_name"
DVC_EXP_BASELINE = "dvc.exp_baseline_rev"
DVC_EXP_GONE = "dvc.exp_gone"  # tools.gone_runs: its DVC experiment exists nowhere any more
NOTE = "mlflow.note.content"  # the run's description in the UI

# The model: the SHA-256 of its file's bytes, and of the code the served model runs (served_package.SERVED_CODE)
# with its model_config: new code or config, new registered version.
MODEL_SHA256 = "model_sha256"
SERVED_CODE_SHA256 = "served_code_sha256"
MODEL_VERSION = "model.version"  # on a run: "<registered model>/<version>"
MODEL_RUN_ID = "model.run_id"  # on a run whose model file an earlier run registered
VAL_ACC = "train.best_val_acc"  # on a registered version: what the champion is chosen by, never test accuracy
FILES_LOST = "files_lost"  # on a registered version whose files are gone from the artifact store
# On a run of a result whose registered model lost its files, once another run records the result: that run's id,
# and the key it no longer carries (tag.RESULT_KEY is taken off: one run per result).
REPLACED_BY, REPLACED_RESULT_KEY = "replaced_by", "replaced_result_key"
LOGGED_MODEL_VERSIONS = "mlflow.modelVersions"  # on a logged model, as MLflow's own registration writes it
EXPERIMENT_KIND = "mlflow.experimentKind"  # on the experiment: model training, for MLflow's UI and search

# Where it trained: results differ in their last bits between devices and world sizes.
TRAIN_DEVICE, TRAIN_WORLD_SIZE, TRAIN_BACKEND = "train.device", "train.world_size", "train.backend"
MACHINE = "machine."  # the prefix of the training machine's tags (machine.provenance)
MACHINE_TRAINED_ON = "machine.trained_on"

# A run that watched a training (tracking/live_run.py): what it last knew of the training, one of TRAINING_STATES,
# and when its helper last answered (HEARTBEAT: "<unix seconds> <host> <pid>"; tracking/heartbeat.py).
TRAINING = "training"
RUNNING, TRAINED, FAILED, KILLED, REPEAT = "running", "trained", "failed", "killed", "repeat"
HEARTBEAT = "heartbeat"
FAILURE = "failure"  # why a training or a run ended early, in one line
REPEAT_OF = "repeat_of"  # the run of the result a repeated training reproduced

# A sweep's trial (tools/sweep.py, docs/sweeps.md): its study and number on each run of it (set through
# result.RUN_TAGS_ENV: the live run and record's), and on a pruned trial's run, that the pruner stopped it.
SWEEP_STUDY, SWEEP_TRIAL, SWEEP_PRUNED = "sweep.study", "sweep.trial", "sweep.pruned"
