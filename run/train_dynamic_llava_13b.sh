#!/bin/bash
# The Dynamic-LLaVA README's path for this command: runs scripts/train_dynamic_llava_13b.sh, same environment variables.
exec bash "$(dirname "$0")/../scripts/train_dynamic_llava_13b.sh" "$@"
