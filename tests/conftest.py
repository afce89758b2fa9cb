import os

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download fails at once

import torch  # noqa: E402

torch.set_num_threads(1)  # tests run as 2 xdist workers on 2 cores
