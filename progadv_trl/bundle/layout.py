"""What a bundle is made of: folder and file names, the manifest format, texts stored in every manifest, the error.

Torch-free, imports nothing from the rest of the package: every other bundle module starts here.
"""

from __future__ import annotations

import re

MANIFEST_NAME = "manifest.json"
README_NAME = "README.md"
POLICY_DIR = "policy"
REFERENCE_DIR = "reference"
TOKENIZER_DIR = "tokenizer"
# The folder each manifest section lives in when the section does not name one.
DEFAULT_DIRS = {"policy": POLICY_DIR, "reference": REFERENCE_DIR, "tokenizer": TOKENIZER_DIR}
FORMAT_VERSION = 1

# torch.save / pickle formats: loading one can run arbitrary code, so a bundle never holds them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Files of a reference recorded by identity that decide what gets loaded (hashed at export, checked at load).
IDENTITY_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")
# The temporary (".NAME.tmp-xxxx") and swapped-out (".NAME.old-xxxx") folders of an export in progress.
TMP_RE = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]+$")

KNOWN_KEYS = frozenset(
    {
        "format_version",
        "created_at",
        "library_versions",
        "policy",
        "reference",
        "tokenizer",
        "scoring",
        "training",
        "max_length",
        "truncation",
        "heldout_metrics",
        "calibration",
        "provenance",
    }
)

ACTION_SPANS = (
    "one step per assistant turn: the tokens the model generated for that turn (content, tool calls, end-of-turn "
    "token), located by rendering the whole conversation once with the bundled tokenizer's chat template"
)
TRUNCATION = {
    "policy": "keep_start_and_recent",
    "description": (
        "trajectories longer than max_length keep their start (system prompt and task, at most half the budget) and "
        "the most recent context; a step that lost some tokens is scored on the rest and marked truncated, a step "
        "that lost all of them gets no advantage (NaN), never 0"
    ),
}


class BundleError(ValueError):
    """A bundle cannot be written or trusted. The message says what is wrong and what to do."""
