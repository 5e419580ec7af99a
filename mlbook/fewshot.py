"""N-way, K-shot image classification episodes, and the Omniglot protocol.

An *episode* (a task) picks ``n_way`` classes at random, gives them the labels
0..n_way-1 in a random assignment, and draws ``k_support`` + ``k_query``
distinct images of each: the support set to adapt on, the query set to score.

The Omniglot protocol of the MAML paper (Finn et al., 2017; their
``data_generator.py``), as implemented here:

* **Split.** All 1,623 characters, in the order of
  :func:`mlbook.data.omniglot.load` (background archive then evaluation,
  alphabets and characters sorted by name), are permuted with
  ``numpy.random.RandomState(1).permutation(1623)`` (NumPy keeps this legacy
  generator's stream fixed across versions). The first 1,100 characters of the
  permutation are for meta-training, the next 100 for validation, the last 423
  for testing: 1,200 training characters of which 100 validation, as in the
  paper. (The MAML code shuffles folder names with Python's ``random.seed(1)``
  in file-system order, which no one can reproduce exactly; the sizes and the
  idea are the same.)
* **Rotations.** Each character rotated by 0, 90, 180 and 270 degrees is a
  class of its own: character ``c`` becomes classes ``4c .. 4c+3``, class
  ``4c + r`` holding the 20 drawings rotated by ``r`` x 90 degrees
  counter-clockwise (``torch.rot90``). Training has 4,400 classes, validation
  400, test 1,692. The MAML code rotates test characters too; the Reptile code
  rotates only the training set (pass ``rotations=False`` for that).

Introduced in ``book/07_few_shot_images``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.func import functional_call, vmap

from .tasks import TaskBatch, _check_counts
from .train import EvalResult, _metric_fn

__all__ = [
    "FewShot", "maml_split", "rotate", "omniglot", "evaluate_one_query_at_a_time",
    "evaluate_protocols", "SPLIT_SEED", "SPLIT_SIZES",
]

SPLIT_SEED = 1
SPLIT_SIZES = {"train": 1100, "val": 100, "test": 423}


def maml_split(num_characters: int = 1623, seed: int = SPLIT_SEED) -> dict:
    """Character indices of the MAML split: ``{"train": [1100], "val": [100],
    "test": [423]}`` (int64 tensors), from a fixed permutation (module doc).
    Introduced in ``book/07_few_shot_images``."""
    if num_characters != sum(SPLIT_SIZES.values()):
        raise ValueError(f"the MAML split needs all {sum(SPLIT_SIZES.values())} "
                         f"Omniglot characters, got {num_characters}")
    order = torch.from_numpy(np.random.RandomState(seed).permutation(num_characters))
    a = SPLIT_SIZES["train"]
    b = a + SPLIT_SIZES["val"]
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


def rotate(images: torch.Tensor) -> torch.Tensor:
    """Rotations as new classes: ``[C, M, H, W]`` -> ``[4C, M, H, W]``, class
    ``4c + r`` being class ``c`` rotated by ``r`` x 90 degrees. Introduced in
    ``book/07_few_shot_images``."""
    rotated = [torch.rot90(images, r, dims=(-2, -1)) for r in range(4)]
    return torch.stack(rotated, 1).flatten(0, 1)  # [C, 4, M, H, W] -> [4C, M, H, W]


class FewShot:
    """A distribution of ``n_way``-way classification episodes over ``images``.

    ``images``: ``[classes, per_class, H, W]`` or ``[classes, per_class, C, H,
    W]``, uint8 (divided by 255) or float. ``sample`` returns a
    :class:`mlbook.TaskBatch` with ``x_support [T, n_way*k_support, C, H, W]``
    float32 and ``y_support [T, n_way*k_support]`` int64 in 0..n_way-1, and
    the same for the query set. Examples are **ordered by label**
    (``y = 0,..,0, 1,..,1, ...``); which class gets which label is random.
    ``info["classes"]`` ``[T, n_way]`` holds the class index behind each
    label. Sampling only indexes the preloaded tensor (on the CPU, from
    ``generator``, so a seed gives the same episodes on every device) and moves
    the episode to ``device`` at the end. Introduced in
    ``book/07_few_shot_images``.
    """

    def __init__(self, images: torch.Tensor, n_way: int):
        if images.dim() == 4:
            images = images.unsqueeze(2)  # [classes, per_class, 1, H, W]
        if images.dim() != 5:
            raise ValueError(
                "images must be [classes, per_class, H, W] or [classes, per_class, "
                f"C, H, W], got {tuple(images.shape)}")
        if not isinstance(n_way, int) or not 2 <= n_way <= images.shape[0]:
            raise ValueError(f"n_way must be an int in 2..{images.shape[0]} (the "
                             f"number of classes), got {n_way!r}")
        self.images = images
        self.n_way = n_way

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> str:
        """``n_way``, the images' shape and dtype and a hash of their bytes:
        what ``meta_train`` compares before resuming a checkpoint, so a run
        is not continued on other classes, another split or other
        rotations. Hashed once per distribution (Omniglot's training classes:
        0.2 s on a 2-core CPU)."""
        images = self.images
        cached = getattr(self, "_digest", None)
        if cached is None or cached[0] is not images:  # (images replaced)
            data = images.detach().cpu().contiguous()
            digest = hashlib.blake2b(
                data.view(torch.uint8).numpy().data, digest_size=8
            ).hexdigest()
            self._digest = cached = (images, digest)
        return (
            f"{self.n_way}-way, images {list(images.shape)} {images.dtype}, "
            f"blake2b {cached[1]}"
        )

    @property
    def per_class(self) -> int:
        return self.images.shape[1]

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()

    def sample(self, num_tasks: int, k_support: int, k_query: int, generator=None,
               device=None) -> TaskBatch:
        """``num_tasks`` episodes, ``k_support`` + ``k_query`` images per class."""
        _check_counts(num_tasks, k_support, k_query)
        n, k = self.n_way, k_support + k_query
        if k > self.per_class:
            raise ValueError(f"k_support + k_query = {k} but each class has only "
                             f"{self.per_class} images")
        # N distinct classes per task, K+Q distinct images per class: the first
        # columns of random permutations (argsort of uniform noise). For the
        # classes, the N smallest of the noise by topk: the same indices in the
        # same order as argsort's first N (ties aside, where either order is
        # arbitrary), without sorting Omniglot's 4,800 classes per task: 32
        # 5-way tasks took 13.4 ms to sample on our CPU with argsort, 2.7 ms
        # with topk, while a graphed 5-way MAML step takes 4.5 ms on an H200
        # and the training loop samples the next episodes during it.
        noise = torch.rand(num_tasks, self.num_classes, generator=generator)
        classes = noise.topk(n, 1, largest=False).indices  # [T, N]
        draws = torch.rand(num_tasks, n, self.per_class,
                           generator=generator).argsort(2)[..., :k]  # [T, N, K+Q]
        x = self.images[classes[..., None], draws]  # [T, N, K+Q, C, H, W]
        if device is not None:
            x = x.to(device)  # move the compact (uint8) tensor, then convert
        x = self._to_float(x)
        y = torch.arange(n, device=x.device)[None, :, None].expand(num_tasks, n, k)

        def part(t, lo, hi):  # [T, N, K+Q, ...] -> [T, N*(hi-lo), ...]
            return t[:, :, lo:hi].flatten(1, 2)

        return TaskBatch(part(x, 0, k_support), part(y, 0, k_support),
                         part(x, k_support, k), part(y, k_support, k),
                         {"classes": classes.to(x.device)})


def omniglot(split: str = "train", n_way: int = 5, rotations: bool = True, data=None,
             root=None, cache=None) -> FewShot:
    """Omniglot episodes of one split of the MAML protocol (module doc).

    ``split``: ``"train"`` (1,100 characters), ``"val"`` (100), ``"test"``
    (423), or ``"train+val"`` (the 1,200 the MAML paper trains on).
    ``data``: an already loaded :class:`mlbook.data.omniglot.Omniglot` (else
    ``omniglot.load(root, cache)``). With ``rotations`` each character gives
    four classes. Introduced in ``book/07_few_shot_images``.
    """
    from .data import omniglot as omniglot_data

    data = omniglot_data.load(root, cache) if data is None else data
    splits = maml_split(len(data))
    parts = split.split("+")
    unknown = [p for p in parts if p not in splits]
    if unknown:
        raise ValueError(f"unknown split {split!r}; use train, val, test or train+val")
    images = data.images[torch.cat([splits[p] for p in parts])]  # [C, 20, 28, 28]
    return FewShot(rotate(images) if rotations else images, n_way)


def evaluate_one_query_at_a_time(learner, tasks, steps=(0, 1, 10),
                                 num_tasks: int = 600, k_support: int = 1,
                                 k_query: int = 1, seed: int = 12345,
                                 chunk: int = 100, device=None) -> EvalResult:
    """Non-transductive accuracy: each query image is classified on its own.

    :func:`mlbook.evaluate` passes a task's whole query set through the model
    at once, so batch normalisation mixes statistics of all query images
    (transduction). Here, as in the Reptile paper's non-transductive protocol,
    each query image is put in one batch with the support set, the model is
    run on these ``n_way*k_support + 1`` images, and only the last prediction
    is kept: no query image sees another. Adaptation is the same (SGD on the
    support set with the learner's ``inner_lr``); the tasks are the same as
    ``mlbook.evaluate`` draws with the same arguments. Returns accuracy.
    Introduced in ``book/07_few_shot_images``.
    """
    return evaluate_protocols(learner, tasks, steps, num_tasks, k_support, k_query,
                              seed, chunk, device)["one_query_at_a_time"]


def evaluate_protocols(learner, tasks, steps=(0, 1, 10), num_tasks: int = 600,
                       k_support: int = 1, k_query: int = 1, seed: int = 12345,
                       chunk: int = 100, device=None, one_query_steps=None,
                       one_query_tasks=None) -> dict:
    """Transductive and one-query-at-a-time accuracy from one adaptation.

    Returns ``{"transductive": EvalResult, "one_query_at_a_time": EvalResult}``.
    The transductive result is what ``mlbook.evaluate(..., metric="accuracy")``
    gives with the same arguments (same tasks, same steps). The second protocol
    (see :func:`evaluate_one_query_at_a_time`) runs one forward pass per query
    image, so it can be limited to ``one_query_steps`` (default: ``steps``) and
    to the first ``one_query_tasks`` tasks (default: all). The Omniglot
    records of ``book/07_few_shot_images`` come from it.
    """
    steps = sorted(set(steps))
    single_steps = steps if one_query_steps is None else sorted(set(one_query_steps))
    if not set(single_steps) <= set(steps):
        raise ValueError("one_query_steps must be a subset of steps")
    single_tasks = num_tasks if one_query_tasks is None else one_query_tasks
    score = _metric_fn(learner, "accuracy")
    model = learner.model
    device = torch.device(device) if device is not None else \
        next(model.parameters()).device
    buffers = dict(model.named_buffers())
    generator = torch.Generator().manual_seed(seed)
    sizes = [min(chunk, num_tasks - i) for i in range(0, num_tasks, chunk)]

    def one(params, x_support, x_one):  # one task, one query image
        x = torch.cat([x_support, x_one[None]])  # [N*K + 1, C, H, W]
        return functional_call(model, (params, buffers), (x,))[-1]  # [n_way]

    trans, single, seen = [], [], 0
    with torch.no_grad():  # adapt() turns autograd on for its own steps
        for n in sizes:
            batch = tasks.sample(n, k_support, k_query, generator=generator,
                                 device=device)
            m = max(0, min(n, single_tasks - seen))  # tasks of this chunk to score
            seen += n
            fast, done, rows, rows1 = None, 0, [], []
            for s in steps:
                if s > done:
                    fast = learner.adapt(batch.x_support, batch.y_support,
                                         steps=s - done, params=fast)
                    done = s
                params = fast if fast is not None else learner.params()
                rows.append(score(learner.predict(params, batch.x_query),
                                  batch.y_query))  # [T]
                if s in single_steps and m > 0:
                    in_p = 0 if fast is not None else None
                    sub = {k: v[:m] for k, v in params.items()} if in_p == 0 \
                        else params
                    per_task = vmap(one, in_dims=(in_p, 0, 0))  # over tasks
                    # one query position at a time keeps memory at m*(N*K+1) images
                    logits = torch.stack([
                        per_task(sub, batch.x_support[:m], batch.x_query[:m, j])
                        for j in range(batch.x_query.shape[1])], 1)  # [m, Q, n_way]
                    rows1.append(score(logits, batch.y_query[:m]))  # [m]
            trans.append(torch.stack(rows).float().cpu())  # [steps, T]
            if rows1:
                single.append(torch.stack(rows1).float().cpu())  # [steps1, m]
    return {"transductive": EvalResult(steps, "accuracy", torch.cat(trans, 1)),
            "one_query_at_a_time": EvalResult(single_steps, "accuracy",
                                              torch.cat(single, 1))}
