"""The model and the method: CIFAR ResNets, the paper's operations as pure functions, the variant registry."""
