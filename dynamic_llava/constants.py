"""Token ids and strings shared by prompts, labels and checkpoints (LLaVA conventions); the bundled assets; names
that command lines offer before torch is loaded."""

from pathlib import Path

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

# The bundled demo model and sample images (`dynamic-llava demo export` writes them; `ask` defaults to the model)
ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = ASSETS / "demo_model"
BUNDLED_SAMPLES = ASSETS / "samples"

# Training's image-token decisions (`--image_decision`; model/sparsity_training.py says what each does)
IMAGE_DECISIONS = ("gumbel", "top_k")

# A training sample's key naming the image tokens a dense training shows the LLM (`train --image_token_subsets`)
IMAGE_TOKEN_SUBSET_KEY = "image_token_subset"
