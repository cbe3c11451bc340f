"""Run under torchrun by test_ddp.py: train on synthetic data, then save this rank's weights."""

import sys

import torch
from safetensors.torch import save_file

from bdserve.training.data import ImageSet
from bdserve.training.models import create_model
from bdserve.training.poison import default_attack
from bdserve.training.trainer import SCHEDULES, distributed_context, train

out_dir = sys.argv[1]
g = torch.Generator().manual_seed(0)
data = ImageSet(torch.randint(0, 256, (256, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (256,), generator=g), [str(i) for i in range(10)])
model = create_model("tiny")
result = train(model, data, default_attack("badnets", 4), SCHEDULES["tiny"].with_epochs(2),
               device=torch.device("cpu"), seed=0, precision="fp32")
rank, world = distributed_context(torch.device("cpu"))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/rank{rank}.safetensors",
          metadata={"world": str(world)})
