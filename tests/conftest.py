import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# Two cores on CI: keep intra-op threads from oversubscribing when pytest-xdist runs.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
