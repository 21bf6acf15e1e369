#!/bin/bash
# The Dynamic-LLaVA README's path for this command: runs scripts/eval/gqa.sh, same environment variables.
exec bash "$(dirname "$0")/../../scripts/eval/gqa.sh" "$@"
