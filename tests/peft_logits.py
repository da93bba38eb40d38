"""Logits of base models with PEFT adapters, computed by whatever transformers
and PEFT this interpreter has. The tests run it as a script, so that exports
are checked in other versions of transformers and PEFT too:

    python peft_logits.py TOKENS.npy BASE ADAPTER OUT.npy [BASE ADAPTER OUT.npy ...]
    python peft_logits.py --versions      # prints "transformers X peft Y"
"""

import sys

import numpy as np
import peft
import torch
import transformers
from peft import PeftModel


def logits(base: str, adapter: str, tokens: np.ndarray) -> np.ndarray:
    major = int(transformers.__version__.split(".")[0])
    dtype = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    model = transformers.AutoModelForCausalLM.from_pretrained(base, **dtype)
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def main(tokens: str, *jobs: str) -> None:
    if tokens == "--versions":
        print(f"transformers {transformers.__version__} peft {peft.__version__}")
        return
    x = np.load(tokens)
    for base, adapter, out in zip(jobs[0::3], jobs[1::3], jobs[2::3]):
        np.save(out, logits(base, adapter, x))


if __name__ == "__main__":
    main(*sys.argv[1:])
