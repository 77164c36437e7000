#!/usr/bin/env bash
# launch_tpu.sh: create / set up / train / monitor / delete a TPU VM or queued resource running
# `cslm-jax train` on every worker.
#
# Not built yet: the multi-host launcher is tracked by its own issue ("Run it on a TPU pod").
# Until then this script refuses to pretend; see README.md for what runs today.
set -euo pipefail
cat >&2 <<'MSG'
launch_tpu.sh: not implemented yet.
The TPU pod launcher (create/setup/train/status/logs/stop/delete, --dry-run, --spot) arrives with
the "Run it on a TPU pod" issue. Today cslm_jax provides the model, the sharding rules and the
Hugging Face import/export (see README.md).
MSG
exit 2
