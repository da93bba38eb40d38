"""Loading base models: local paths or Hugging Face ids, through mlx-lm.

Hub downloads go through huggingface-hub (mlx-lm's own loader), so
``HF_HUB_OFFLINE=1`` and the Hub cache work as usual. Failures become one-line
``ModelError`` messages that say what to do.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


class ModelError(InputError):
    """A model that cannot be loaded; the message says why and what to do."""


def load_base(model: str, trust_remote_code: bool = False):
    """(model, tokenizer) from a local folder or a Hugging Face id, via mlx_lm.load
    (``trust_remote_code`` as mlx_lm.lora passes it, to the tokenizer and the model)."""
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from mlx_lm import load

    path = Path(model).expanduser()
    if not path.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise ModelError(f"model {model!r} does not exist: give a local model folder or a Hugging Face id (org/name)")
    elif not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json: give a model folder in the Hugging Face / mlx-lm layout")
    else:
        _check_weights(path)
    try:
        return load(str(path) if path.exists() else model, tokenizer_config={"trust_remote_code": trust_remote_code},
                    trust_remote_code=trust_remote_code)
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it first or unset HF_HUB_OFFLINE"
        ) from None
    except (RepositoryNotFoundError, HFValidationError):
        raise ModelError(f"model {model!r} is neither a local folder nor a Hugging Face repository") from None
    except Exception as e:  # a broken or unsupported checkpoint: say so in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"model {model!r} could not be loaded: {first}") from None


def _check_weights(path: Path) -> None:
    """A folder whose weight files are not all there (an interrupted download) is refused, naming one."""
    import json

    index = path / "model.safetensors.index.json"
    expected = set()
    if index.exists():
        try:
            expected = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            raise ModelError(f"{index} is not a valid weight index; if a download was interrupted, download it "
                             "again") from None
    missing = sorted(f for f in expected if not (path / f).exists())
    if not expected and not list(path.glob("*.safetensors")):
        missing = ["any *.safetensors weights"]
    if missing:
        raise ModelError(f"{path} lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                         + "; if a download was interrupted, download it again")


def model_dir(model: str) -> Path:
    """The local folder of a model ``load_base`` has loaded (a path, or the Hub cache's snapshot)."""
    from mlx_lm.utils import hf_repo_to_path

    path = Path(model).expanduser()
    return path if path.exists() else hf_repo_to_path(model)
