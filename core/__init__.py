"""ra's engine: settings, errors, documents, model, prompt, store + manifest, index, attention,
layer (the decode-time composition), long contexts, generation, engine. README "Architecture"
walks a token's K/V through them in order.

Nothing here imports the CLI; importing `core` itself imports neither torch nor transformers.
"""
import os
from pathlib import Path


def data_home() -> Path:
    """$RA_HOME, else the platform's user cache directory for ra."""
    if os.environ.get("RA_HOME"):
        return Path(os.environ["RA_HOME"]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ra"))
