import torch

# Ranks are forked from this process: keep its thread pool at one so forks stay safe and cores are shared fairly.
torch.set_num_threads(1)
