"""Trains the same MLP as tandem-model (tandem-bench `training`) with PyTorch on the CPU, or with
scikit-learn's MLPClassifier when torch is not installed, and prints one JSON object with the
timing: {"framework", "version", "threads", "seconds", "samples_per_second", "test_accuracy",
"final_loss"}.

Input: the directory written by tandem-bench, holding train_x.f32 / test_x.f32 (row-major
little-endian float32, already standardized), train_y.u32 / test_y.u32 (little-endian uint32)
and meta.json ({"num_features", "num_classes"}). Only the training loop is timed.
"""

import argparse
import array
import json
import os
import sys
import time


def read_array(path, typecode):
    values = array.array(typecode)
    with open(path, "rb") as f:
        values.frombytes(f.read())
    if sys.byteorder != "little":
        values.byteswap()
    return values


def load(data_dir):
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    sets = {}
    for name in ("train", "test"):
        x = read_array(os.path.join(data_dir, f"{name}_x.f32"), "f")
        y = read_array(os.path.join(data_dir, f"{name}_y.u32"), "I")
        sets[name] = (x, y)
    return meta, sets


def run_torch(args, meta, sets):
    import torch

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    nf, nc = meta["num_features"], meta["num_classes"]

    def tensors(name):
        x, y = sets[name]
        return (torch.tensor(x, dtype=torch.float32).reshape(-1, nf), torch.tensor(y, dtype=torch.int64))

    train_x, train_y = tensors("train")
    test_x, test_y = tensors("test")
    widths = [nf] + args.hidden + [nc]
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    # burn's Adam defaults: betas (0.9, 0.999), epsilon 1e-5.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=1e-5)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)
    n = train_x.shape[0]

    # Warm-up, untimed: one epoch of a throwaway copy pays torch's first-call costs (lazy
    # imports, allocator, kernel selection), as tandem-bench's warm-up burn run does for burn.
    import copy

    warm_model = copy.deepcopy(model)
    warm_optimizer = torch.optim.Adam(warm_model.parameters(), lr=args.learning_rate, eps=1e-5)
    for start in range(0, n, args.batch_size):
        warm_loss = loss_fn(warm_model(train_x[start : start + args.batch_size]), train_y[start : start + args.batch_size])
        warm_optimizer.zero_grad()
        warm_loss.backward()
        warm_optimizer.step()

    started = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, args.batch_size):
            index = order[start : start + args.batch_size]
            x, y = train_x[index], train_y[index]
            logits = model(x)
            loss = loss_fn(logits, y)
            # The same per-batch bookkeeping as tandem-model's loop (loss and accuracy read back).
            correct += int((logits.detach().argmax(1) == y).sum().item())
            loss_sum += loss.item() * len(index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started

    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return {
        "framework": "PyTorch",
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "samples_per_second": n * args.epochs / seconds,
        "test_accuracy": accuracy,
        "final_loss": loss_sum / n,
    }


def run_sklearn(args, meta, sets):
    import sklearn
    from sklearn.neural_network import MLPClassifier
    import numpy as np

    nf = meta["num_features"]
    train_x = np.frombuffer(sets["train"][0].tobytes(), dtype="<f4").reshape(-1, nf)
    train_y = np.frombuffer(sets["train"][1].tobytes(), dtype="<u4")
    test_x = np.frombuffer(sets["test"][0].tobytes(), dtype="<f4").reshape(-1, nf)
    test_y = np.frombuffer(sets["test"][1].tobytes(), dtype="<u4")
    model = MLPClassifier(
        hidden_layer_sizes=tuple(args.hidden),
        solver="adam",
        batch_size=args.batch_size,
        learning_rate_init=args.learning_rate,
        max_iter=args.epochs,
        n_iter_no_change=args.epochs + 1,
        tol=0.0,
        alpha=0.0,
        epsilon=1e-5,
        shuffle=True,
        random_state=args.seed,
    )
    started = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(train_x, train_y)
    seconds = time.perf_counter() - started
    n = train_x.shape[0]
    return {
        "framework": "scikit-learn MLPClassifier",
        "version": sklearn.__version__,
        "threads": None,
        "seconds": seconds,
        "samples_per_second": n * args.epochs / seconds,
        "test_accuracy": float((model.predict(test_x) == test_y).mean()),
        "final_loss": float(model.loss_),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--hidden", type=int, nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args()
    meta, sets = load(args.data)
    try:
        import torch  # noqa: F401

        result = run_torch(args, meta, sets)
    except ImportError:
        result = run_sklearn(args, meta, sets)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
