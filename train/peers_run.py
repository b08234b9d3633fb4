"""The peer loaders' side of ``python -m train.bench --loader-only``, run by the peers' own
virtual environment (:mod:`train.peer_bench`), never imported by the project.

``python peers_run.py convert SHARDS_DIR MDS_DIR LITDATA_DIR``: our tar shards, once, into
MosaicML Streaming's MDS (``MDSWriter``: a fixed-shape ``ndarray:uint8:640,640`` column, read
with ``np.frombuffer`` and no header, and a ``json`` column) and LitData's chunks
(``optimize``: the image's raw bytes and the JSON text, each read back without a copy).

``python peers_run.py read {mds,litdata} DIR --batch 32 --size 640 [--no-shuffle]``: one epoch through
the peer's documented loader in this process (Streaming: ``StreamingDataset`` + a torch
``DataLoader``; LitData: ``StreamingDataset(batch_decode=1)`` + ``StreamingDataLoader``),
``num_workers=0``, shuffled unless told, each sample's JSON parsed and every batch stacked
(each image read in full); prints one JSON line: samples, seconds, CPU seconds, seconds to the
first batch.

LitData's ``batch_decode`` is set to 1, the value its documentation gives for images (each row
decoded once): its ``"auto"`` does not count a numpy or bytes leaf as an image and, for samples
of 410 KB, deserializes an aligned window of 39 samples at once. Its shuffle permutes samples
in blocks of 256, across several such windows, so a shuffled epoch dropped most windows after
one sample: about 15 samples deserialized (and, for a numpy leaf, copied) per sample read.

Only numpy, torch and the peers are imported here: the peers need numpy < 2.2, which the
project's environment does not have.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
import types
import warnings
from pathlib import Path


THREADS = 1
"""torch's intra-op threads in every loader of the bench (see :mod:`train.peer_bench`)."""


def _without_torchvision() -> None:
    """Streaming imports torchvision at import time for its vision datasets, which are not
    used here; a stand-in keeps torchvision (and the CUDA build of torch it pulls) out of the
    peers' environment. transformers (which Streaming imports too) looks for torchvision
    once, when it is imported: it is imported first and finds none."""
    import transformers.utils.import_utils  # noqa: F401

    tv = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    datasets.VisionDataset = type("VisionDataset", (), {})  # type: ignore[attr-defined]
    datasets.CIFAR10 = datasets.VisionDataset  # type: ignore[attr-defined]

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed in the peers' environment")

    functional.to_tensor = unavailable  # type: ignore[attr-defined]
    tv.datasets, tv.transforms, transforms.functional = datasets, transforms, functional  # type: ignore[attr-defined]
    for name, mod in {"torchvision": tv, "torchvision.datasets": datasets, "torchvision.transforms": transforms,
                      "torchvision.transforms.functional": functional}.items():
        sys.modules.setdefault(name, mod)


def _samples(shards: Path):
    """(image, JSON text) of every sample of our shards, in file order."""
    import numpy as np

    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            image = None
            for m in tar.getmembers():
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                if m.name.endswith(".npy"):
                    image = np.load(io.BytesIO(data), allow_pickle=False)
                else:
                    yield image, data.decode()


def _litdata_item(sample):
    """A LitData sample: the image's C-order bytes (``BytesSerializer``, handed back as a view
    of the chunk) and the JSON text (``StringSerializer``); the numpy serializer copies every
    image once more on reading."""
    image, meta = sample
    return {"image": image.tobytes(), "meta": meta}


def convert(shards: Path, mds: Path, lit: Path) -> None:
    _without_torchvision()
    from litdata import optimize
    from streaming import MDSWriter

    samples = list(_samples(shards))
    size = samples[0][0].shape
    with MDSWriter(out=str(mds), columns={"image": f"ndarray:uint8:{size[0]},{size[1]}", "meta": "json"},
                   size_limit=64 << 20) as w:
        for image, meta in samples:
            w.write({"image": image, "meta": json.loads(meta)})
    optimize(fn=_litdata_item, inputs=samples, output_dir=str(lit), chunk_bytes="64MB", num_workers=1,
             mode="overwrite")


def read(which: str, root: Path, batch: int, *, size: int = 640, shuffle: bool = True) -> dict:
    _without_torchvision()
    # The peers hand out read-only views of their files; the batches are stacked copies, never written.
    warnings.filterwarnings("ignore", message="The given (NumPy array|buffer) is not writable")
    import torch

    torch.set_num_threads(THREADS)
    if which == "mds":
        from streaming import StreamingDataset
        from torch.utils.data import DataLoader

        class Images(StreamingDataset):
            def __getitem__(self, i):
                s = super().__getitem__(i)
                return torch.from_numpy(s["image"]), s["meta"]["target"]

        t0, c0 = time.perf_counter(), time.process_time()
        loader = DataLoader(Images(local=str(root), batch_size=batch, shuffle=shuffle, shuffle_seed=0),
                            batch_size=batch, num_workers=0)
    else:
        from litdata import StreamingDataLoader, StreamingDataset

        class Images(StreamingDataset):
            def __getitem__(self, i):
                s = super().__getitem__(i)
                image = torch.frombuffer(s["image"], dtype=torch.uint8).view(size, size)
                return image, json.loads(s["meta"])["target"]

        t0, c0 = time.perf_counter(), time.process_time()
        loader = StreamingDataLoader(Images(str(root), shuffle=shuffle, seed=0, batch_decode=1), batch_size=batch,
                                     num_workers=0)
    n, first = 0, None
    for images, _ in loader:
        if first is None:
            first = time.perf_counter() - t0
        n += len(images)
    return {"samples": n, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "first_batch_s": first}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("shards", type=Path)
    c.add_argument("mds", type=Path)
    c.add_argument("litdata", type=Path)
    r = sub.add_parser("read")
    r.add_argument("which", choices=["mds", "litdata"])
    r.add_argument("dir", type=Path)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--size", type=int, default=640, help="the images' side (LitData holds their bytes alone)")
    r.add_argument("--no-shuffle", action="store_true", help="read in the peer's stored order")
    args = p.parse_args()
    if args.cmd == "convert":
        convert(args.shards, args.mds, args.litdata)
    else:
        print(json.dumps(read(args.which, args.dir, args.batch, size=args.size, shuffle=not args.no_shuffle)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
