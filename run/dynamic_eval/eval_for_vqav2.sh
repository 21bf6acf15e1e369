#!/bin/bash
# The Dynamic-LLaVA README's path for this command: runs scripts/eval/vqav2.sh, same environment variables.
exec bash "$(dirname "$0")/../../scripts/eval/vqav2.sh" "$@"
