"""One process of a data-parallel run, launched by tests/test_distributed.py with mlx.launch.

Trains with the same Trainer the CLI uses and writes this process's own final
weights and masks to <out>/rank<r>.safetensors, so the test can compare ranks.

    mlx.launch --backend ring -n 2 --python PYTHON tests/distributed_worker.py MODEL OUT
"""

import sys

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load

from drlora_mlx.config.settings import DRLoRAConfig, TrainingArgs
from drlora_mlx.data.loading import bundled_data_dir, load_datasets
from drlora_mlx.lora.attach import attach
from drlora_mlx.training.trainer import Trainer


def main(model_path: str, out: str) -> None:
    world = mx.distributed.init()
    model, tokenizer = load(model_path)
    drlora = attach(model, DRLoRAConfig(r_init=2, r_target=4, r_max=8), seed=0)
    train, _, _ = load_datasets(bundled_data_dir(), tokenizer, mask_prompt=True)
    args = TrainingArgs(iters=24, batch_size=4, learning_rate=5e-3, grad_accumulation_steps=2,
                        steps_per_report=1000, steps_per_eval=1000)
    result = Trainer(model, drlora, args, world=world).run(train)
    weights = dict(tree_flatten(model.trainable_parameters()))
    weights.update({f"{p}.rank_mask": m.active_mask() for p, m in drlora.expert_modules()})
    weights["routing.frequency"] = drlora.routing.frequency
    weights["events"] = mx.array(len(result.events))
    mx.save_safetensors(f"{out}/rank{world.rank()}.safetensors", weights)


if __name__ == "__main__":
    main(*sys.argv[1:3])
