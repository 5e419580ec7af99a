"""Plain ``nn.Module`` models used in the book: an MLP and the Conv4 CNN.

Nothing here knows about meta-learning: MAML and Reptile take any module.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["MLP", "Conv4"]


class MLP(nn.Sequential):
    """A ReLU multilayer perceptron; ``MLP(1, (40, 40), 1)`` is the MAML
    paper's sinusoid regressor. Introduced in ``book/01_learning_to_learn``."""

    def __init__(self, in_features: int, hidden=(40, 40), out_features: int = 1):
        sizes = (in_features, *hidden, out_features)
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)

    def __getitem__(self, idx):
        # nn.Sequential rebuilds slices with type(self)(...), which MLP's
        # signature does not accept: a slice is a plain Sequential of the layers.
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


class Conv4(nn.Module):
    """The 4-block CNN of few-shot learning (Vinyals et al., 2016) that MAML
    uses.

    Each block is conv 3x3 (``hidden`` channels) -> BatchNorm -> ReLU -> 2x2
    max-pool; a linear layer maps the flattened features to ``num_classes``.
    (The MAML paper pools like this on miniImageNet; for Omniglot it uses
    stride-2 convolutions in place of the pooling. mlbook pools on both.)
    For 28x28 inputs the features are ``hidden`` x 1 x 1.

    BatchNorm keeps **no running statistics** (``track_running_stats=False``):
    it always normalises with the statistics of the batch it is given. So the
    module holds no buffer that adaptation would update, a batch of tasks can
    run through it at once with each task normalised by its own statistics
    (mlbook's grouped convolutions), and test-time evaluation is
    *transductive*: the query images of a task are normalised
    together, as in the MAML paper's evaluation. Introduced in
    ``book/07_few_shot_images``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        hidden: int = 64,
        image_size: int = 28,
    ):
        super().__init__()
        blocks, channels, size = [], in_channels, image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, size = hidden, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 poolings")
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(hidden * size * size, num_classes)

    def forward(self, x):  # x: [N, C, H, W]
        return self.head(self.features(x).flatten(1))
